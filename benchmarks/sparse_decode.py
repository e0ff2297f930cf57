"""Gemma 3 270M batch-1 decoding on CPU, dense vs sparse MLPs: tokens/s end to end, F1 both sides,
and where a token's time goes.

Steps (each cached under ``--runs-dir``, so an interrupted benchmark resumes):

1. **train** a LoRA PEFT run of Gemma 3 270M on SQuAD (generative form, the ``squad_compare.py``
   gemma profile: 200 training questions, lr 1e-3, 1 epoch) — or reuse it;
2. **calibrate** CATS-style gate thresholds (``deft density-sweep``'s ``uniform`` mode: every
   layer's gate at the target density, on 64 SQuAD training questions' windows) at each
   ``--densities`` value, and measure **F1** on the run's 50 held-out questions, dense and
   thresholded (the thresholded
   model is what the sparse kernel computes: ``tests/test_sparse_mlp.py`` holds them equal to
   1e-5; here the greedy tokens of both are also compared on a few prompts);
3. **time** ``generate()`` at batch 1 on a real SQuAD prompt, LoRA merged: the dense model, the
   thresholded model with :func:`deft.deploy.sparsify_mlps` (fused C++ kernel), and the same
   with an int8 weight-only LM head (``torch.ao.quantization.quantize_dynamic``), interleaved
   (``lib.timing``), median of ``--repeats``, at 1 and 2 threads. Decoding time per token is
   (t(N new tokens) − t(1 new token)) / (N − 1), so the prompt's prefill (dense on both sides)
   is left out; ``end_to_end_ratio`` is the ratio of whole ``generate()`` calls.
4. **shares** of a dense decoding step: attention, MLP, LM head, the rest — forward hooks timing
   each part on decoding steps only.

Run it alone (no tests, no training beside it). Writes ``benchmarks/results/sparse_decode.json``::

    DEFT_DATA_DIR=../shared/data python benchmarks/sparse_decode.py [--densities 0.5 0.4 0.3] [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from lib.results import write_result
from lib.runs import run_or_reuse
from lib.sweeps import sweep_or_reuse
from lib.timing import interleaved_medians

from deft.core.thresholds import apply_thresholds, remove_thresholds
from deft.deploy import prepare_for_inference, sparsify_mlps
from deft.deploy.sparse_kernel import kernel_unavailable_reason
from deft.tasks.squad import default_splits, load_squad
from deft.training import TrainConfig, load_run, task_runner

HERE = Path(__file__).resolve().parent


def run_config(args) -> TrainConfig:
    return TrainConfig(task="squad", method="lora", mode="peft", model="gemma3-270m", learning_rate=1e-3,
                       batch_size=8, eval_batch_size=16, max_length=256, max_train_samples=200, max_eval_samples=50,
                       epochs=1.0, data_dir=args.data_dir, seed=0)


def cached(path: Path, key: dict, compute):
    """``compute()``'s result, stored in ``path`` with ``key`` and reused while the key matches."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    path.write_text(json.dumps({"key": key, "value": value}, indent=2))
    return value


def quality(run_dir: Path, args) -> dict:
    """F1 and deployed density per target density (1.0 = dense), and the thresholds: the run's
    density sweep (shared with ``deployed_density.py --gemma-run``)."""
    sweep = sweep_or_reuse(run_dir, (1.0, *args.densities), calibration_samples=args.calibration_samples,
                           data_dir=args.data_dir)
    return {str(p["target_density"]): {"f1": 100 * p["metric"], "deployed_density": p["deployed_density"],
                                       "union_density": p["union_density"], "questions": p["samples"],
                                       "taus": p["taus"]} for p in sweep["points"]}


def prompt_ids(config, tokenizer, data_dir: str | None, count: int) -> list[list[int]]:
    """Real prompts: the first held-out questions' windows, as the run's evaluation builds them."""
    runner = task_runner(config)
    examples = load_squad(default_splits(data_dir or config.data_dir)[1], data_dir or config.data_dir,
                          max_samples=count, seed=config.seed)
    return [w.input_ids for w in runner.windows(examples, tokenizer)[:count]]


def generate(model, ids: torch.Tensor, new_tokens: int, pad: int) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)


class PartTimer:
    """Wall time of attention, MLP and LM head modules on decoding steps (one new token)."""

    def __init__(self, model, parts: dict[str, list[torch.nn.Module]]):
        self.totals = dict.fromkeys(parts, 0.0)
        self.handles, self._start = [], {}
        for name, modules in parts.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(self._pre(name, m), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._post(name, m)))

    def _pre(self, name, m):
        def hook(module, args, kwargs):
            # attention layers take hidden_states as a keyword in transformers 5
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.shape[-2:-1] == (1,):
                self._start[id(m)] = time.perf_counter()
        return hook

    def _post(self, name, m):
        def hook(module, args, out):
            start = self._start.pop(id(m), None)
            if start is not None:
                self.totals[name] += time.perf_counter() - start
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def parts_of(model) -> dict[str, list[torch.nn.Module]]:
    layers = model.model.layers
    return {"attention": [layer.self_attn for layer in layers], "mlp": [layer.mlp for layer in layers],
            "lm_head": [model.lm_head]}


def shares(model, ids, pad: int, new_tokens: int, repeats: int) -> dict:
    """Share of a decoding step's time per part (medians over ``repeats`` generations)."""
    per_part = {k: [] for k in ("attention", "mlp", "lm_head")}
    steps = []
    for _ in range(repeats):
        timer = PartTimer(model, parts_of(model))
        t0 = time.perf_counter()
        generate(model, ids, 1, pad)
        t1 = time.perf_counter()
        timer.remove()
        timer_n = PartTimer(model, parts_of(model))
        t2 = time.perf_counter()
        generate(model, ids, new_tokens, pad)
        t3 = time.perf_counter()
        timer_n.remove()
        decode = ((t3 - t2) - (t1 - t0)) / (new_tokens - 1)
        steps.append(decode)
        for k in per_part:  # the 1-token call has no decoding step: its parts are prefill only
            per_part[k].append((timer_n.totals[k] - timer.totals[k]) / (new_tokens - 1))
    step = statistics.median(steps)
    out = {k: statistics.median(v) / step for k, v in per_part.items()}
    out["other"] = 1 - sum(out.values())
    out["step_seconds"] = step
    return out


def int8_head(model):
    """The model with its LM head as int8 dynamic quantisation, one scale per output row (torch.ao;
    a single scale for all 262,144 rows cost 6.5 F1 points)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model.lm_head = quantize_dynamic(torch.nn.Sequential(model.lm_head), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                     dtype=torch.qint8)[0]
    return model


def timing(run_dir: Path, qual: dict, args) -> list[dict]:
    config, model, tokenizer = load_run(run_dir)
    remove_thresholds(model)
    dense, _, _ = prepare_for_inference(model, None)
    dense.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = prompt_ids(config, tokenizer, args.data_dir, 4)
    ids = torch.tensor([prompts[0]])
    rows = []
    for target in args.densities:
        taus = qual[str(target)]["taus"]
        sparse = sparsify_mlps(copy.deepcopy(dense), taus)
        head8 = int8_head(copy.deepcopy(sparse))
        thresholded = apply_thresholds(copy.deepcopy(dense), _thresholds(taus, target))
        with torch.no_grad():
            agree = [bool(torch.equal(generate(sparse, torch.tensor([p]), args.new_tokens, pad),
                                      generate(thresholded, torch.tensor([p]), args.new_tokens, pad)))
                     for p in prompts]
        del thresholded
        for threads in args.threads:
            torch.set_num_threads(threads)
            variants = {}
            for name, m in (("dense", dense), ("sparse", sparse), ("sparse_int8_head", head8)):
                for n in (1, args.new_tokens):
                    variants[f"{name}@{n}"] = (lambda m=m, n=n: generate(m, ids, n, pad))
            with torch.no_grad():
                med = {k: v["median"] for k, v in interleaved_medians(variants, args.repeats).items()}
                part = {name: shares(m, ids, pad, args.new_tokens, max(3, args.repeats // 10))
                        for name, m in (("dense", dense), ("sparse", sparse))}

            def per_token(name):
                return (med[f"{name}@{args.new_tokens}"] - med[f"{name}@1"]) / (args.new_tokens - 1)

            row = {"density": target, "threads": threads, "prompt_tokens": ids.shape[1],
                   "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "end_to_end_ratio": med[f"dense@{args.new_tokens}"] / med[f"sparse@{args.new_tokens}"],
                   "decode_ratio": per_token("dense") / per_token("sparse"),
                   "end_to_end_ratio_int8_head": med[f"dense@{args.new_tokens}"] / med[f"sparse_int8_head@{args.new_tokens}"],
                   "decode_ratio_int8_head": per_token("dense") / per_token("sparse_int8_head"),
                   "tokens_per_second": {k: 1 / per_token(k) for k in ("dense", "sparse", "sparse_int8_head")},
                   "mlp_ratio": part["dense"]["mlp"] * part["dense"]["step_seconds"]
                   / (part["sparse"]["mlp"] * part["sparse"]["step_seconds"]),
                   "shares": {k: part["dense"][k] for k in ("attention", "mlp", "lm_head", "other")},
                   "shares_sparse": {k: part["sparse"][k] for k in ("attention", "mlp", "lm_head", "other")},
                   "f1_dense": qual["1.0"]["f1"], "f1_sparse": qual[str(target)]["f1"],
                   "deployed_density": qual[str(target)]["deployed_density"],
                   "greedy_tokens_equal_thresholded": agree, "medians_seconds": med}
            rows.append(row)
            print(f"density {target} threads {threads}: end-to-end {row['end_to_end_ratio']:.3f}x, decode "
                  f"{row['decode_ratio']:.3f}x (int8 head {row['decode_ratio_int8_head']:.3f}x), MLP "
                  f"{row['mlp_ratio']:.2f}x; dense shares " + ", ".join(f"{k} {v:.2f}" for k, v in row["shares"].items()),
                  flush=True)
        del sparse, head8
    return rows


def _thresholds(taus: dict, target: float):
    from deft.core.thresholds import Thresholds

    return Thresholds(taus=taus, mode="uniform", target_density=target)


def int8_quality(run_dir: Path, args) -> float:
    """F1 with the int8 LM head (dense MLPs): what the head's quantisation alone costs."""
    config, model, tokenizer = load_run(run_dir)
    remove_thresholds(model)
    merged, _, _ = prepare_for_inference(model, None)
    int8_head(merged)
    return 100 * task_runner(config).evaluate_model(merged, tokenizer, progress=False).metrics["f1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.4, 0.3])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--calibration-samples", type=int, default=64)
    ap.add_argument("--data-dir", default=os.environ.get("DEFT_DATA_DIR"))
    ap.add_argument("--runs-dir", default="runs/sparse_decode")
    ap.add_argument("--stage", choices=("quality", "all"), default="all",
                    help="quality: train, calibrate and score only (no timing; can run beside other work)")
    ap.add_argument("--out", default=str(HERE / "results" / "sparse_decode.json"))
    args = ap.parse_args()

    runs = Path(args.runs_dir)
    run_dir = runs / "gemma3-270m-squad-peft"
    run_or_reuse(run_config(args), run_dir, note="gemma3-270m squad ")
    qual = quality(run_dir, args)
    f1_int8 = cached(runs / "quality_int8_head.json", {"scheme": "per_channel"}, lambda: int8_quality(run_dir, args))
    print(f"F1 dense {qual['1.0']['f1']:.2f}, int8 LM head {f1_int8:.2f}", flush=True)
    if args.stage == "quality":
        return
    rows = timing(run_dir, qual, args)
    payload = {"model": "gemma3-270m (Q4_K_M GGUF de-quantised to float32)", "task": "squad (offline_eval, 50 questions)",
               "run": str(run_dir), "kernel": kernel_unavailable_reason() or "compiled",
               "machine": {"cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()},
               "f1_int8_head_dense_mlp": f1_int8, "quality": qual,
               "units": {"f1": "points", "ratios": "dense time / variant time", "shares": "fraction of a dense step"},
               "rows": rows}
    write_result(Path(args.out), payload)


if __name__ == "__main__":
    main()
