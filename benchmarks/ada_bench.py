"""ADA-PEFT vs ADA-DEFT: train both, then measure inference with the ADA-DEFT blocks skipped.

For every model (MiniLM and a tiny random-init seq2seq T5, both on SST-2) this trains one
ADA-PEFT run and one ADA-DEFT run per λ (same seed, data and steps), then runs
``deft.deploy.bench_inference``: ADA-DEFT skipped vs the same model unskipped vs ADA-PEFT,
side by side in one process (median wall time over the evaluation set, parameter bytes,
blocks skipped, metric) plus the metric-vs-threshold curve. Finished runs are reused.

Writes ``benchmarks/results/ada_<model>_lam<λ>.json`` (one bench each) and
``benchmarks/results/ada_<model>.json`` (the λ trade-off: α per layer, blocks skipped,
savings, metric delta). The full measurement (CPU, hours):

    python benchmarks/ada_bench.py --models minilm tiny-t5 --lambdas 1 5 20 --steps 2000 \\
        --max-train-samples 0 --ada-lr-scale 10 --repeats 5

A smoke run (a minute): ``python benchmarks/ada_bench.py --smoke``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from lib.runs import run_or_reuse

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def tiny_t5_dir(root: Path) -> str:
    """A random-init T5 (encoder-decoder, ReLU MLP) with MiniLM's vocabulary, saved once.

    No T5 weights can be installed here; this is the seq2seq architecture with a real
    tokenizer. [SEP] (102) is its eos: T5ForSequenceClassification reads the eos position.
    """
    import torch
    import transformers as T

    path = root / "tiny-t5"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = T.T5Config(vocab_size=30522, d_model=128, d_ff=512, num_layers=4, num_decoder_layers=4,
                            num_heads=4, d_kv=32, eos_token_id=102, pad_token_id=0, decoder_start_token_id=0)
        T.T5Model(config).save_pretrained(path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "tiny-t5"], help="minilm, tiny-t5, or a model dir")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1.0], help="λ of the ADA-DEFT runs")
    ap.add_argument("--eps", type=float, default=1e-2, help="ε of the l0 approximation")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ada-lr-scale", type=float, default=10.0, help="α's Adam step = this × lr")
    ap.add_argument("--lambda-warmup", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-train-samples", type=int, default=0, help="0 = the full training set")
    ap.add_argument("--max-eval-samples", type=int, default=None, help="default: the full dev set")
    ap.add_argument("--threshold", type=float, default=None, help="skip threshold (default: deft's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bench-samples", type=int, default=None, help="dev examples for the inference bench "
                    "(default: --max-eval-samples)")
    ap.add_argument("--curve", type=float, nargs="+", default=None,
                    help="thresholds of the metric-vs-threshold curve (default: deft's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("DEFT_DATA_DIR"))
    ap.add_argument("--runs-dir", default=str(HERE / "out" / "ada"))
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--reuse-bench", action="store_true",
                    help="reuse an existing results/ada_<model>_lam<λ>.json of the same run (rebuild the summary)")
    ap.add_argument("--smoke", action="store_true", help="tiny settings, to check the pipeline (not a measurement)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.max_train_samples, args.max_eval_samples, args.repeats = 4, 64, 32, 1
        args.curve = args.curve or [0.0, 0.05, 0.5]
        args.batch_size, args.max_length = 16, 32
        args.runs_dir = str(HERE / "out" / "ada-smoke")
        args.results_dir = str(HERE / "out" / "ada-smoke" / "results")
    if args.data_dir is None and (HERE.parents[1] / "shared" / "data" / "glue").is_dir():
        args.data_dir = str(HERE.parents[1] / "shared" / "data")

    from deft.adaptive import DEFAULT_SKIP_THRESHOLD
    from deft.deploy import DEFAULT_CURVE, bench_inference
    from deft.core.loss import DensityLossConfig
    from deft.training import TrainConfig

    threshold = DEFAULT_SKIP_THRESHOLD if args.threshold is None else args.threshold
    runs, results = Path(args.runs_dir), Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        model, tokenizer = (tiny_t5_dir(runs), "minilm") if name == "tiny-t5" else (name, None)
        label = Path(name).name
        # T5ForSequenceClassification names its head `classification_head`, which deft.methods does
        # not list among the task heads: without this it stays random and is re-drawn at every load.
        options = {"modules_to_save": ["classification_head"]} if name == "tiny-t5" and \
            args.method in ("lora", "qlora") else {}
        base = TrainConfig(task=args.task, method=args.method, mode="peft", model=model, tokenizer=tokenizer,
                           method_options=options,
                           density=DensityLossConfig(weight=1.0, approx="l0", eps=args.eps), max_steps=args.steps,
                           learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                           max_train_samples=args.max_train_samples or None, max_eval_samples=args.max_eval_samples,
                           lambda_warmup=args.lambda_warmup, seed=args.seed, data_dir=args.data_dir, ada=True,
                           ada_lr_scale=args.ada_lr_scale)
        peft_dir = runs / label / "ada-peft"
        peft = run_or_reuse(base, peft_dir, note="(ADA) ")
        rows = []
        for lam in args.lambdas:
            cfg = replace(base, mode="deft", density=DensityLossConfig(weight=lam, approx="l0", eps=args.eps))
            deft_dir = runs / label / f"ada-deft-lam{lam:g}"
            deft = run_or_reuse(cfg, deft_dir, note=f"(ADA) λ={cfg.density.weight:g} ")
            out = results / f"ada_{label}_lam{lam:g}.json"
            if args.reuse_bench and out.exists() and json.loads(out.read_text()).get("run") == str(deft_dir):
                bench = json.loads(out.read_text())
            else:
                bench = bench_inference(deft_dir, peft_dir, threshold=threshold, repeats=args.repeats,
                                        max_samples=args.bench_samples or args.max_eval_samples,
                                        data_dir=args.data_dir, curve=args.curve or DEFAULT_CURVE)
            bench["train"] = {"ada_peft": {k: peft[k] for k in ("metrics", "density", "alphas", "steps")},
                              "ada_deft": {k: deft[k] for k in ("metrics", "density", "alphas", "steps")}}
            out.write_text(json.dumps(bench, indent=2))
            print(f"{label} λ={lam:g}: {bench['blocks_skipped']}/{bench['blocks_total']} blocks skipped, "
                  f"time saving {bench['time_saving']:.1f}%, memory saving {bench['memory_saving']:.1f}%, "
                  f"metric Δ {bench['metric_delta']:+.2f} points -> {out}", flush=True)
            rows.append({"lambda": lam, "alphas": deft["alphas"]["per_stack"], **{k: bench[k] for k in (
                "blocks_skipped", "blocks_total", "time_saving", "memory_saving", "metric_delta",
                "time_saving_vs_unskipped", "metric_delta_vs_unskipped", "threshold_curve")},
                "metric": bench["variants"]["ada_deft_skipped"]["metric"],
                "ada_peft_metric": bench["variants"]["ada_peft"]["metric"],
                "density": deft["density"]["overall"], "bench_file": out.name})
        summary = {"model": label, "task": args.task, "method": args.method, "threshold": threshold,
                   "settings": vars(args), "ada_peft_alphas": peft["alphas"]["per_stack"],
                   "ada_peft_full_dev": peft["metrics"], "lambdas": rows}
        (results / f"ada_{label}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
