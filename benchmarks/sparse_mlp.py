"""Sparse vs dense MLP for one decoding token on CPU: what the fused kernel buys at a given density.

For each shape — ``minilm`` (d 384, h 1536, plain GELU, biases), ``gemma3-270m`` (d 640, h 2048,
gated GELU-tanh) and ``2048x8192`` (d 2048, h 8192, gated SiLU) — at activation densities 0.5 0.3
0.2 0.1 and at 1 and 2 threads, three variants of the same MLP are timed side by side
(``lib.timing.interleaved_medians``: rotating order, median of the repetitions):

* dense: the PyTorch MLP on the thresholded activation (F.linear calls; the fair baseline),
* sparse: the gate densely, then ``deft.deploy.sparse_kernel`` (threshold + compaction + the
  active rows of W_up and W_downᵀ, fused, compiled),
* fallback: the same with the kernel's PyTorch fallback (``index_select`` + matmul),
* up + down only (``ratio_up_down``): the gate's output given, dense up and down projections on
  the thresholded activation against the kernel — the part sparsity can shrink (a gated MLP's
  gate stays dense, so the whole block's ratio is capped at 3 / (1 + 2d) for gated blocks).

Weights come from memory, not cache, as in decoding: each variant cycles through enough random
copies of the block (≥ 256 MiB of weights per shape) that a copy is evicted before it is used
again. τ is set per copy to the quantile of |a| that leaves exactly the target density.

* all active (``ratio_all_active``): the kernel itself with every unit active (τ below every
  |a|), against the kernel at the density: what the zeros buy with the code held fixed, apart
  from how fast PyTorch's dense GEMV is on this CPU.

On a CUDA device (and Triton installed) the same shapes are also timed on the GPU at batch 1,
bfloat16 weights: PyTorch's dense MLP against :func:`deft.deploy.triton_mlp.triton_sparse_mlp`
(TEAL's split-K design), CUDA-synchronised, median of the repetitions (``gpu_rows``); without one
``gpu_rows`` is empty and ``gpu_skipped`` says why.

Rows: shape, density, threads, ratio (median dense / median sparse), ratio_fallback, ratio_up_down,
ratio_all_active, max_rel_error (sparse against dense, over the copies), the medians themselves;
plus the machine (CPU model, torch threads, load average). Writes ``benchmarks/results/sparse_mlp.json``::

    python benchmarks/sparse_mlp.py [--repeats 50] [--min-mib 256] [--out PATH]
    python benchmarks/sparse_mlp.py --quick --out /tmp/sparse_quick.json   # smoke: seconds, numbers meaningless
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from lib.results import cpu_model, write_result
from lib.timing import interleaved_medians

from deft.deploy import triton_mlp
from deft.deploy.sparse_kernel import (compiled_kernel, extension_name, kernel_unavailable_reason,
                                       sparse_mlp_fallback, sparse_mlp_forward)

HERE = Path(__file__).resolve().parent
SHAPES = {  # name -> (d, h, gated, activation, biases)
    "minilm": (384, 1536, False, lambda g: F.gelu(g), True),
    "gemma3-270m": (640, 2048, True, lambda g: F.gelu(g, approximate="tanh"), False),
    "2048x8192": (2048, 8192, True, F.silu, False),
}
DENSITIES = (0.5, 0.3, 0.2, 0.1)
THREADS = (1, 2)


def make_copies(d: int, h: int, gated: bool, biases: bool, min_bytes: int, max_copies: int | None, seed: int):
    """Random copies of one block (standard layouts, plus W_downᵀ for the kernel) and one input each."""
    per_copy = (3 if gated else 2) * d * h * 4
    n = max(2, -(-min_bytes // per_copy))
    n = min(n, max_copies) if max_copies else n
    g = torch.Generator().manual_seed(seed)
    copies = []
    for _ in range(n):
        first = torch.randn(h, d, generator=g) / d ** 0.5
        down = torch.randn(d, h, generator=g) / h ** 0.5
        copies.append({
            "x": torch.randn(d, generator=g),
            "first": first, "first_b": torch.randn(h, generator=g) * 0.1 if biases else None,
            "up": torch.randn(h, d, generator=g) / d ** 0.5 if gated else None,
            "up_b": None,
            "down": down, "down_b": torch.randn(d, generator=g) * 0.1 if biases else None,
            "down_t": down.t().contiguous(),
        })
    return copies, n * (per_copy + d * h * 4)


def tau_at(a: torch.Tensor, density: float) -> float:
    """τ with exactly round(density · h) units of |a| above it."""
    s = a.abs().sort().values
    keep = max(1, round(density * s.numel()))
    return float(s[-keep - 1] + s[-keep]) / 2 if keep < s.numel() else float(s[0]) / 2


def variants(copies: list[dict], act, taus: list[float], gates: list[torch.Tensor] | None = None) -> dict:
    """The timed variants; with ``gates`` (each copy's σ output, precomputed) also the up + down
    projections alone (``dense_up_down`` / ``sparse_up_down``): what is left once the gate is paid."""
    state = {"dense": 0, "sparse": 0, "fallback": 0, "dense_up_down": 0, "sparse_up_down": 0}

    def take(name: str) -> tuple[dict, float]:
        i = state[name]
        state[name] = (i + 1) % len(copies)
        return copies[i], taus[i]

    def dense():
        c, tau = take("dense")
        a = act(F.linear(c["x"], c["first"], c["first_b"]))
        a = a.masked_fill(a.abs() <= tau, 0)
        if c["up"] is not None:
            a = a * F.linear(c["x"], c["up"], c["up_b"])
        return F.linear(a, c["down"], c["down_b"])

    def sparse_with(name: str, kernel):
        def run():
            c, tau = take(name)
            a = act(F.linear(c["x"], c["first"], c["first_b"]))
            return kernel(c["x"], a, tau, c["down_t"], c["down_b"], c["up"], c["up_b"])
        return run

    compiled = lambda *args: sparse_mlp_forward(*args, backend="compiled")  # noqa: E731
    out = {"dense": dense, "sparse": sparse_with("sparse", compiled),
           "fallback": sparse_with("fallback", sparse_mlp_fallback)}
    if gates is not None:
        def dense_up_down():
            i = state["dense_up_down"]
            state["dense_up_down"] = (i + 1) % len(copies)
            c, tau, a = copies[i], taus[i], gates[i]
            a = a.masked_fill(a.abs() <= tau, 0)
            if c["up"] is not None:
                a = a * F.linear(c["x"], c["up"], c["up_b"])
            return F.linear(a, c["down"], c["down_b"])

        def sparse_up_down():
            i = state["sparse_up_down"]
            state["sparse_up_down"] = (i + 1) % len(copies)
            c = copies[i]
            return compiled(c["x"], gates[i], taus[i], c["down_t"], c["down_b"], c["up"], c["up_b"])

        def all_active_up_down():  # the same kernel, every unit active: τ below every |a|
            i = state.setdefault("all_active_up_down", 0)
            state["all_active_up_down"] = (i + 1) % len(copies)
            c = copies[i]
            return compiled(c["x"], gates[i], -1.0, c["down_t"], c["down_b"], c["up"], c["up_b"])

        out.update(dense_up_down=dense_up_down, sparse_up_down=sparse_up_down, all_active_up_down=all_active_up_down)
    return out


def max_rel_error(copies: list[dict], act, taus: list[float], fn) -> float:
    worst = 0.0
    for c, tau in zip(copies, taus):
        run = variants([c], act, [tau])
        want, got = run["dense"]().double(), run[fn]().double()
        worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def gpu_rows(shapes: list[str], repeats: int, device: str = "cuda", dtype=torch.bfloat16) -> list[dict]:
    """Batch-1 MLP on the GPU, bfloat16 weights: PyTorch dense vs the Triton kernels, per shape and
    density (CUDA-synchronised timings, median of ``repeats`` interleaved rounds). ``device``/``dtype``
    other than the defaults only to smoke-test this code under TRITON_INTERPRET=1."""
    rows = []
    for shape in shapes:
        d, h, gated, act, biases = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        w = {"first": torch.randn(h, d, generator=g) / d ** 0.5, "down": torch.randn(d, h, generator=g) / h ** 0.5,
             "up": torch.randn(h, d, generator=g) / d ** 0.5 if gated else None}
        w = {k: v.to(device, dtype) if v is not None else None for k, v in w.items()}
        down_t = w["down"].t().contiguous()
        x = torch.randn(d, generator=g).to(device, dtype)
        a = act(F.linear(x, w["first"]))
        for density in DENSITIES:
            tau = tau_at(a.float().cpu(), density)

            def dense():
                z = act(F.linear(x, w["first"]))
                z = z.masked_fill(z.abs() <= tau, 0)
                if w["up"] is not None:
                    z = z * F.linear(x, w["up"])
                return F.linear(z, w["down"])

            def sparse():
                z = act(F.linear(x, w["first"]))
                return triton_mlp.triton_sparse_mlp(x, z, tau, down_t, None, w["up"])

            def synced(fn):
                def run():
                    out = fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    return out
                return run

            with torch.no_grad():
                err = float((sparse().float() - dense().float()).norm() / dense().float().norm())
                t = interleaved_medians({"dense": synced(dense), "sparse": synced(sparse)}, repeats=repeats,
                                        warmup=3)
            med = {k: v["median"] for k, v in t.items()}
            rows.append({"shape": shape, "density": density, "device": device, "dtype": str(dtype).split(".")[-1],
                         "ratio": med["dense"] / med["sparse"], "max_rel_error": err,
                         "median_us": {k: v * 1e6 for k, v in med.items()}, "repeats": repeats})
            print(f"{shape:>12} density {density:.1f} GPU: dense {med['dense'] * 1e6:7.1f} us  triton "
                  f"{med['sparse'] * 1e6:7.1f} us (x{rows[-1]['ratio']:.2f})  err {err:.1e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50, help="timed rounds per variant (median reported; >= 30)")
    ap.add_argument("--min-mib", type=int, default=256, help="weights per shape, over all copies (beyond L3)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 2 small copies; numbers meaningless")
    ap.add_argument("--out", default=str(HERE / "results" / "sparse_mlp.json"))
    args = ap.parse_args()
    repeats, max_copies, warmup = (3, 2, 1) if args.quick else (args.repeats, None, 3)

    torch.manual_seed(0)
    initial_threads = torch.get_num_threads()
    if compiled_kernel() is None:
        raise SystemExit(f"the compiled kernel is not available here ({kernel_unavailable_reason()}): "
                         "nothing to compare against")
    rows = []
    with torch.no_grad():
        for shape in args.shapes:
            d, h, gated, act, biases = SHAPES[shape]
            copies, nbytes = make_copies(d, h, gated, biases, args.min_mib << 20, max_copies, seed=0)
            acts = [act(F.linear(c["x"], c["first"], c["first_b"])) for c in copies]
            for density in DENSITIES:
                taus = [tau_at(a, density) for a in acts]
                err = max_rel_error(copies, act, taus, "sparse")
                err_fb = max_rel_error(copies, act, taus, "fallback")
                for threads in THREADS:
                    torch.set_num_threads(threads)
                    t = interleaved_medians(variants(copies, act, taus, acts), repeats=repeats, warmup=warmup)
                    med = {k: v["median"] for k, v in t.items()}
                    row = {"shape": shape, "density": density, "threads": threads,
                           "ratio": med["dense"] / med["sparse"], "ratio_fallback": med["dense"] / med["fallback"],
                           "ratio_up_down": med["dense_up_down"] / med["sparse_up_down"],
                           "ratio_all_active": med["all_active_up_down"] / med["sparse_up_down"],
                           "max_rel_error": err, "max_rel_error_fallback": err_fb,
                           "median_us": {k: v * 1e6 for k, v in med.items()},
                           "d": d, "h": h, "gated": gated, "copies": len(copies), "weights_mib": nbytes / 2**20,
                           "repeats": repeats}
                    rows.append(row)
                    print(f"{shape:>12} density {density:.1f} threads {threads}: dense {med['dense'] * 1e6:8.1f} us  "
                          f"sparse {med['sparse'] * 1e6:8.1f} us (x{row['ratio']:.2f})  "
                          f"fallback {med['fallback'] * 1e6:8.1f} us (x{row['ratio_fallback']:.2f})  "
                          f"up+down x{row['ratio_up_down']:.2f} (vs all active x{row['ratio_all_active']:.2f})  "
                          f"err {err:.1e}", flush=True)
            del copies, acts
    torch.set_num_threads(initial_threads)
    gpu_skipped = None if torch.cuda.is_available() else "no CUDA device"
    gpu_skipped = gpu_skipped or triton_mlp.unavailable_reason("cuda")
    gpu = [] if gpu_skipped else gpu_rows(args.shapes, repeats)
    if gpu_skipped:
        print(f"GPU (Triton) rows skipped: {gpu_skipped}")

    result = {
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": initial_threads, "threads_timed": list(THREADS),
                    "load_average": os.getloadavg(), "kernel": extension_name()},
        "quick": args.quick, "densities": list(DENSITIES), "rows": rows,
        "gpu_rows": gpu, "gpu_skipped": gpu_skipped,
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
