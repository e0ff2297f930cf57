"""Our Table 1: PEFT vs DEFT on MiniLM over GLUE tasks, for LoRA and the bottleneck adapter.

Runs ``deft.training.compare`` for every task × method (finished runs are reused, so an
interrupted table resumes), then writes

* ``benchmarks/results/glue_table.json`` — one row per task × method with ``task``, ``method``,
  ``density_change`` (%, exact), ``density_change_threshold`` (%, |a| > τ),
  ``metric_delta`` (DEFT − PEFT, metric points), both sides' metric and densities, settings;
* ``benchmarks/results/glue_table.md`` — the Markdown table the README quotes.

    python benchmarks/glue_table.py [--tasks sst2 mrpc rte cola stsb] [--methods lora adapter]
        [--seeds 0] [--max-train-samples 2000] [--epochs 1] [--runs-dir runs/glue_table]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from deft.core.approx import DEFAULT_L0_EPS
from deft.core.loss import DensityLossConfig
from deft.training import TrainConfig, compare

RESULTS = Path(__file__).parent / "results"


def trajectory(run_dir: Path, metric: str) -> list[dict]:
    """Metric and densities (%) at every evaluation of a finished run, from its ``history.json``."""
    seen, points = set(), []
    for entry in json.loads((run_dir / "history.json").read_text()):
        if f"eval_{metric}" not in entry or entry["step"] in seen:  # the final evaluation repeats the last one
            continue
        seen.add(entry["step"])
        points.append({"step": entry["step"], "metric": 100 * entry[f"eval_{metric}"],
                       "density": 100 * entry["eval_density"], "density_threshold": 100 * entry["eval_density_threshold"]})
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "rte", "cola", "stsb"])
    ap.add_argument("--methods", nargs="+", default=["lora", "adapter"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-train-samples", type=int, default=2000)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default: TrainConfig's per-method preset (lora 5e-3, adapter 1e-2)")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0)
    ap.add_argument("--eps", type=float, default=DEFAULT_L0_EPS)
    ap.add_argument("--lambda-warmup", type=float, default=None, help="default: TrainConfig's per-method preset (adapter 0.5, else 0)")
    ap.add_argument("--evals-per-epoch", type=int, default=4, help="density and metric against the step (history.json)")
    ap.add_argument("--lora-options", default='{"include_mlp": true}')
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs-dir", default="runs/glue_table")
    ap.add_argument("--name", default="glue_table", help="stem of the result files")
    args = ap.parse_args()

    rows = []
    for method in args.methods:
        for task in args.tasks:
            config = TrainConfig(
                task=task, method=method, model=args.model,
                method_options=json.loads(args.lora_options) if method in ("lora", "qlora") else {},
                density=DensityLossConfig(weight=args.lam, approx="l0", eps=args.eps),
                epochs=args.epochs, learning_rate=args.lr,
                max_length=args.max_length, max_train_samples=args.max_train_samples,
                max_eval_samples=args.max_eval_samples, evals_per_epoch=args.evals_per_epoch,
                lambda_warmup=args.lambda_warmup,
                data_dir=args.data_dir)
            out = Path(args.runs_dir) / f"{method}-{task}"
            payload = compare(config, args.seeds, out, progress=False)
            s = payload["summary"]
            main_metric = payload["runs"]["peft"][0]["main_metric"]
            row = {
                "task": task, "method": method, "metric": s["peft"]["metric_name"],
                "peft_metric": s["peft"]["metric"]["mean"], "deft_metric": s["deft"]["metric"]["mean"],
                "metric_delta": s["metric_delta"],
                "peft_density": s["peft"]["density"]["mean"], "deft_density": s["deft"]["density"]["mean"],
                "density_change": s["density_change"]["density"],
                "peft_density_threshold": s["peft"]["density_threshold"]["mean"],
                "deft_density_threshold": s["deft"]["density_threshold"]["mean"],
                "density_change_threshold": s["density_change"]["density_threshold"],
                "density_change_union": s["density_change"]["union_density"],
                "steps": payload["runs"]["deft"][0]["steps"],
                "learning_rate": config.learning_rate, "lambda_warmup": config.lambda_warmup,
                "trajectory": {m: trajectory(out / f"{m}-seed{args.seeds[0]}", main_metric) for m in ("peft", "deft")},
                "train_seconds": {m: statistics.fmean(r["train_seconds"] for r in payload["runs"][m])
                                  for m in ("peft", "deft")},
            }
            rows.append(row)
            print(f"{method:8s} {task:6s} {row['metric']}: PEFT {row['peft_metric']:.2f} DEFT {row['deft_metric']:.2f} "
                  f"({row['metric_delta']:+.2f}) | density {row['peft_density']:.2f} -> {row['deft_density']:.2f} "
                  f"({row['density_change']:.2f}%) | |a|>tau {row['peft_density_threshold']:.2f} -> "
                  f"{row['deft_density_threshold']:.2f} ({row['density_change_threshold']:.2f}%)", flush=True)

    averages = {}
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        averages[method] = {k: statistics.fmean(r[k] for r in mine)
                            for k in ("metric_delta", "density_change", "density_change_threshold",
                                      "peft_metric", "deft_metric")}
    settings = {k: v for k, v in vars(args).items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": settings, "rows": rows,
                                                           "averages": averages}, indent=2))
    # a bare `|` inside a cell would end it in Markdown: |a| is escaped
    lines = ["| method | task | metric | PEFT | DEFT | Δ pts | density PEFT → DEFT (%) | change % | "
             "\\|a\\|>0.01 PEFT → DEFT (%) | change % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['task']} | {r['metric']} | {r['peft_metric']:.2f} | {r['deft_metric']:.2f} | "
                     f"{r['metric_delta']:+.2f} | {r['peft_density']:.2f} → {r['deft_density']:.2f} | "
                     f"{r['density_change']:.2f} | {r['peft_density_threshold']:.2f} → "
                     f"{r['deft_density_threshold']:.2f} | {r['density_change_threshold']:.2f} |")
    for method, a in averages.items():
        lines.append(f"| {method} | **avg** | | {a['peft_metric']:.2f} | {a['deft_metric']:.2f} | "
                     f"{a['metric_delta']:+.2f} | | {a['density_change']:.2f} | | {a['density_change_threshold']:.2f} |")
    lines += ["", f"Against the training step (seed {args.seeds[0]}; metric / |a|>0.01 density, %):", "",
              "| method | task | step | PEFT | DEFT |", "|---|---|---|---|---|"]
    for r in rows:
        for p, d in zip(r["trajectory"]["peft"], r["trajectory"]["deft"]):
            lines.append(f"| {r['method']} | {r['task']} | {d['step']} | {p['metric']:.2f} / {p['density_threshold']:.2f} | "
                         f"{d['metric']:.2f} / {d['density_threshold']:.2f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
