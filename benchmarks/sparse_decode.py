"""Gemma 3 270M batch-1 decoding on CPU, dense vs sparse MLPs and an int8 LM head: tokens/s end
to end, F1 on every side, and where a token's time goes.

Steps (each cached under ``--runs-dir``, so an interrupted benchmark resumes):

1. **train** a LoRA PEFT run of Gemma 3 270M on SQuAD (generative form, the ``squad_compare.py``
   gemma profile: 200 training questions, lr 1e-3, 1 epoch) — or reuse it;
2. **calibrate** uniform thresholds (``deft density-sweep``: every layer at the target density, on
   64 SQuAD training questions' windows) at each ``--sweep-densities`` value, at both points —
   the gate (CATS, ``act``) and the gated product (``product``) — and measure **F1** on the run's
   50 held-out questions; the thresholded model is what the sparse kernel computes
   (``tests/test_sparse_mlp.py`` holds them equal to 1e-5; here the greedy tokens of both are
   also compared on ``--agree-prompts`` prompts);
3. **F1 at batch size 1** with and without the int8 LM head (:func:`deft.deploy.quantize_lm_head`:
   int8 rows, float32 argmax kept exact), dense and at each timed product target: at batch 1
   every decoding step goes through the head's kernel; plus F1 with torch.ao's dynamic int8 head
   (activations quantised too), for comparison;
4. **time** ``generate()`` at batch 1 on a real SQuAD prompt, LoRA merged, at each ``--densities``
   value: dense, int8 head alone, sparse MLPs (gate thresholds), sparse MLPs (product
   thresholds), and the deployed form (product thresholds + int8 head), interleaved
   (``lib.timing``), median of ``--repeats``, at 1 and 2 threads. Decoding time per token is
   (t(N new tokens) − t(1 new token)) / (N − 1), so the prompt's prefill is left out;
   ``end_to_end_ratio`` is the ratio of whole ``generate()`` calls;
5. **shares** of a decoding step: attention, MLP, LM head, the rest — forward hooks timing each
   part on decoding steps only, for every variant (``mlp``/``lm_head`` ratios come from them).

Run it alone (no tests, no training beside it). Writes ``benchmarks/results/sparse_decode.json``::

    DEFT_DATA_DIR=../shared/data python benchmarks/sparse_decode.py [--densities 0.5 0.4] [--repeats 30]
    DEFT_DATA_DIR=../shared/data python benchmarks/sparse_decode.py --stage quality   # no timing: runs beside other work
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from lib.results import cpu_model, write_result
from lib.runs import run_or_reuse
from lib.sweeps import sweep_or_reuse
from lib.timing import interleaved_medians

from deft.core.thresholds import apply_thresholds, remove_thresholds
from deft.deploy import prepare_for_inference, quantize_lm_head, sparsify_mlps
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


def quality(run_dir: Path, args, point: str) -> dict:
    """F1 and deployed density per target density (1.0 = dense), and the thresholds at ``point``:
    the run's density sweep (the ``act`` one shared with ``deployed_density.py --gemma-run``)."""
    sweep = sweep_or_reuse(run_dir, (1.0, *args.sweep_densities), calibration_samples=args.calibration_samples,
                           data_dir=args.data_dir, point=point)
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


def ao_int8_head(model):
    """The model with its LM head as torch.ao dynamic int8 quantisation, one scale per output row:
    the library way, which quantises the activations too (scored for F1 only, not timed)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model.lm_head = quantize_dynamic(torch.nn.Sequential(model.lm_head), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                     dtype=torch.qint8)[0]
    return model


def merged_model(run_dir: Path):
    """The run's model, LoRA merged, without thresholds; and its config and tokenizer."""
    config, model, tokenizer = load_run(run_dir)
    remove_thresholds(model)
    dense, _, _ = prepare_for_inference(model, None)
    dense.eval()
    return config, dense, tokenizer


def models_at(dense, qual: dict, target: float) -> dict:
    """The timed variants at one target density (every one from the same merged weights)."""
    act = sparsify_mlps(copy.deepcopy(dense), _thresholds(qual["act"][str(target)]["taus"], target, "act"))
    product = sparsify_mlps(copy.deepcopy(dense), _thresholds(qual["product"][str(target)]["taus"], target, "product"))
    head8, deployed = copy.deepcopy(dense), copy.deepcopy(product)
    quantize_lm_head(head8)
    quantize_lm_head(deployed)
    return {"dense": dense, "int8_head": head8, "sparse_act": act, "sparse_product": product,
            "sparse_product_int8_head": deployed}


def tokens_agree(models: dict, qual: dict, target: float, prompts, new_tokens: int, pad: int, dense) -> dict:
    """Greedy tokens of each kernel variant against the float32 model it computes (the thresholded
    dense model at its point; the dense model for the int8 head alone), per prompt."""
    refs = {point: apply_thresholds(copy.deepcopy(dense), _thresholds(qual[point][str(target)]["taus"], target, point))
            for point in ("act", "product")}
    against = {"int8_head": dense, "sparse_act": refs["act"], "sparse_product": refs["product"],
               "sparse_product_int8_head": refs["product"]}
    with torch.no_grad():
        return {name: [bool(torch.equal(generate(models[name], torch.tensor([p]), new_tokens, pad),
                                        generate(ref, torch.tensor([p]), new_tokens, pad))) for p in prompts]
                for name, ref in against.items()}


def timing(run_dir: Path, qual: dict, args) -> list[dict]:
    config, dense, tokenizer = merged_model(run_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = prompt_ids(config, tokenizer, args.data_dir, args.agree_prompts)
    ids = torch.tensor([prompts[0]])
    rows = []
    for target in args.densities:
        models = models_at(dense, qual, target)
        agree = tokens_agree(models, qual, target, prompts, args.new_tokens, pad, dense)
        for threads in args.threads:
            torch.set_num_threads(threads)
            variants = {f"{name}@{n}": (lambda m=m, n=n: generate(m, ids, n, pad))
                        for name, m in models.items() for n in (1, args.new_tokens)}
            with torch.no_grad():
                med = {k: v["median"] for k, v in interleaved_medians(variants, args.repeats).items()}
                part = {name: shares(m, ids, pad, args.new_tokens, max(3, args.repeats // 10))
                        for name, m in models.items()}

            def per_token(name):
                return (med[f"{name}@{args.new_tokens}"] - med[f"{name}@1"]) / (args.new_tokens - 1)

            def ratios(name):
                return {"end_to_end": med[f"dense@{args.new_tokens}"] / med[f"{name}@{args.new_tokens}"],
                        "decode": per_token("dense") / per_token(name),
                        "mlp": part["dense"]["mlp"] * part["dense"]["step_seconds"]
                        / (part[name]["mlp"] * part[name]["step_seconds"]),
                        "lm_head": part["dense"]["lm_head"] * part["dense"]["step_seconds"]
                        / (part[name]["lm_head"] * part[name]["step_seconds"])}

            every = {name: ratios(name) for name in models if name != "dense"}
            for point in ("act", "product"):
                sparse, q = f"sparse_{point}", qual[point][str(target)]
                row = {"density": target, "point": point, "threads": threads, "prompt_tokens": ids.shape[1],
                       "new_tokens": args.new_tokens, "repeats": args.repeats,
                       "end_to_end_ratio": every[sparse]["end_to_end"], "decode_ratio": every[sparse]["decode"],
                       "mlp_ratio": every[sparse]["mlp"],
                       "shares": {k: part["dense"][k] for k in ("attention", "mlp", "lm_head", "other")},
                       "shares_sparse": {k: part[sparse][k] for k in ("attention", "mlp", "lm_head", "other")},
                       "f1_dense": qual[point]["1.0"]["f1"], "f1_sparse": q["f1"],
                       "deployed_density": q["deployed_density"],
                       "greedy_tokens_equal_thresholded": agree[sparse],
                       "tokens_per_second": {k: 1 / per_token(k) for k in models}, "ratios": every,
                       "medians_seconds": med}
                if point == "product":  # the deployed form: sparse product MLPs + the int8 head
                    row.update(end_to_end_ratio_int8_head=every["sparse_product_int8_head"]["end_to_end"],
                               decode_ratio_int8_head=every["sparse_product_int8_head"]["decode"],
                               greedy_tokens_equal_int8_head=agree["sparse_product_int8_head"],
                               f1_sparse_int8_head=qual["batch1"].get(f"product@{target}+int8"),
                               f1_sparse_batch1=qual["batch1"].get(f"product@{target}"))
                rows.append(row)
            print(f"density {target} threads {threads}: " + "; ".join(
                f"{name} end-to-end {r['end_to_end']:.3f}x decode {r['decode']:.3f}x (MLP {r['mlp']:.2f}x, "
                f"head {r['lm_head']:.2f}x)" for name, r in every.items()) + "; dense shares " +
                ", ".join(f"{k} {part['dense'][k]:.2f}" for k in ("attention", "mlp", "lm_head", "other")), flush=True)
        del models
    return rows


def _thresholds(taus: dict, target: float, point: str = "act"):
    from deft.core.thresholds import Thresholds

    return Thresholds(taus=taus, mode="uniform", target_density=target, point=point)


def batch1_quality(run_dir: Path, qual: dict, args) -> dict:
    """F1 at batch size 1 — where every decoding step goes through the int8 head's kernel — with and
    without the int8 head, dense and at each product-threshold target (cached per entry)."""
    path = Path(args.runs_dir) / "quality_batch1.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    config, dense, tokenizer = merged_model(run_dir)
    runner = task_runner(config)
    wanted = [("dense", None)] + [(f"product@{t}", t) for t in args.densities]
    for name, target in wanted:
        for head in ("", "+int8"):
            key = name + head
            if key in done:
                continue
            model = copy.deepcopy(dense)
            if target is not None:
                apply_thresholds(model, _thresholds(qual["product"][str(target)]["taus"], target, "product"))
            if head:
                quantize_lm_head(model)
            print(f"== F1 at batch 1: {key}", flush=True)
            done[key] = 100 * runner.evaluate_model(model, tokenizer, batch_size=1, progress=False).metrics["f1"]
            path.write_text(json.dumps(done, indent=2))
    return done


def ao_int8_quality(run_dir: Path, args) -> float:
    """F1 with torch.ao's dynamic int8 LM head (dense MLPs; the run's batch size)."""
    config, dense, tokenizer = merged_model(run_dir)
    ao_int8_head(dense)
    return 100 * task_runner(config).evaluate_model(dense, tokenizer, progress=False).metrics["f1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.4],
                    help="timed targets (each also in --sweep-densities)")
    ap.add_argument("--sweep-densities", nargs="+", type=float, default=[0.5, 0.4, 0.3], help="targets scored for F1")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--agree-prompts", type=int, default=4, help="prompts whose greedy tokens are compared")
    ap.add_argument("--calibration-samples", type=int, default=64)
    ap.add_argument("--data-dir", default=os.environ.get("DEFT_DATA_DIR"))
    ap.add_argument("--runs-dir", default="runs/sparse_decode")
    ap.add_argument("--stage", choices=("quality", "all"), default="all",
                    help="quality: train, calibrate and score only (no timing; can run beside other work)")
    ap.add_argument("--out", default=str(HERE / "results" / "sparse_decode.json"))
    args = ap.parse_args()
    missing = sorted(set(args.densities) - set(args.sweep_densities))
    if missing:
        raise SystemExit(f"--densities {missing} are not in --sweep-densities (their F1 would be unknown)")

    runs = Path(args.runs_dir)
    run_dir = runs / "gemma3-270m-squad-peft"
    run_or_reuse(run_config(args), run_dir, note="gemma3-270m squad ")
    qual = {point: quality(run_dir, args, point) for point in ("act", "product")}
    qual["batch1"] = batch1_quality(run_dir, qual, args)
    f1_ao = cached(runs / "quality_int8_head.json", {"scheme": "per_channel"}, lambda: ao_int8_quality(run_dir, args))
    print(f"F1 dense {qual['act']['1.0']['f1']:.2f}; at batch 1: " +
          ", ".join(f"{k} {v:.2f}" for k, v in qual["batch1"].items()) + f"; torch.ao int8 head {f1_ao:.2f}", flush=True)
    if args.stage == "quality":
        return
    rows = timing(run_dir, qual, args)
    payload = {"model": "gemma3-270m (Q4_K_M GGUF de-quantised to float32)", "task": "squad (offline_eval, 50 questions)",
               "run": str(run_dir), "kernel": kernel_unavailable_reason() or "compiled",
               "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
               "f1_torch_ao_int8_head": f1_ao, "quality": qual,
               "units": {"f1": "points", "ratios": "dense time / variant time", "shares": "fraction of a dense step"},
               "rows": rows}
    write_result(Path(args.out), payload)


if __name__ == "__main__":
    main()
