"""Deployed density: DEFT and its deployment variants against training-free thresholding (TEAL /
CATS) at equal *deployed* exact density.

Every variant is trained with the same budget (default: the main job's, 2,000 examples, one
epoch), then thresholded afresh at each target density (uniform per-layer thresholds calibrated
on 256 training examples, ``deft density-sweep``) and evaluated on the full dev set: the metric at
the exact density a kernel would skip. Rows:

* ``peft+thresholds`` — the plain PEFT run thresholded with no training (the baseline);
* ``deft+thresholds`` — today's DEFT recipe (λ 1, ℓ0 ε 0.1);
* the deployment variants, named by their options (``deft train --help``): threshold in the loop
  (straight-through), with and without the density loss; ReLU-fication; ε annealing; the
  sequence-shared term.

Runs and sweeps are reused (``--runs-dir``): an interrupted benchmark picks up where it stopped.
Writes ``benchmarks/results/deployed_density.json`` (+ ``.md``, ``.png``).

    DEFT_DATA_DIR=../shared/data python benchmarks/deployed_density.py [--tasks sst2 mrpc] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

from lib.runs import run_or_reuse

from deft.core.loss import DensityLossConfig
from deft.deploy import density_sweep
from deft.tasks import get_task, load_glue
from deft.training import TrainConfig

TARGETS = (1.0, 0.5, 0.4, 0.3, 0.2, 0.1)
# variant name → (mode, TrainConfig overrides, DensityLossConfig overrides)
VARIANTS = {
    "peft+thresholds": ("peft", {}, {}),
    "deft+thresholds": ("deft", {}, {}),
    "peft+train_density=0.1": ("peft", {"train_density": 0.1}, {}),
    "deft+train_density=0.1": ("deft", {"train_density": 0.1}, {}),
    "peft+activation=relu": ("peft", {"activation": "relu"}, {}),
    "deft+activation=relu+approx=tanh": ("deft", {"activation": "relu"}, {"approx": "tanh"}),
    "deft+eps_final=1e-3": ("deft", {}, {"eps_final": 1e-3}),
    "deft+density_form=sequence": ("deft", {}, {"form": "sequence"}),
    "deft+density_form=sequence+lambda=0.1": ("deft", {}, {"form": "sequence", "weight": 0.1}),
    "deft+activation=relu+approx=tanh+lambda=0.1": ("deft", {"activation": "relu"}, {"approx": "tanh", "weight": 0.1}),
    "peft+train_density=0.05": ("peft", {"train_density": 0.05}, {}),
}


def learned(task: str, dense_metric: float, data_dir: str | None) -> bool:
    """Whether the dense PEFT model learned anything: above the majority class by a point
    (accuracy tasks), or a correlation / Matthews coefficient above 0.05."""
    spec = get_task(task)
    if spec.main_metric not in ("accuracy",):
        return dense_metric > 5.0
    labels = load_glue(spec.name, spec.dev_split, data_dir=data_dir)["label"]
    majority = 100 * Counter(labels).most_common(1)[0][1] / len(labels)
    return dense_metric > majority + 1.0


def config_for(task: str, variant: str, args) -> TrainConfig:
    mode, overrides, density = VARIANTS[variant]
    base = TrainConfig(task=task, mode=mode, model=args.model, data_dir=args.data_dir, epochs=args.epochs,
                       max_train_samples=args.max_train_samples or None, seed=args.seed)
    return replace(base, density=DensityLossConfig(**density), **overrides)  # fresh: tanh takes no ε


def sweep_or_reuse(run_dir: Path, args) -> dict:
    """The density sweep of one run, cached next to it (keyed by its settings)."""
    key = {"targets": list(TARGETS), "calibration_samples": args.calibration_samples, "mode": "uniform"}
    cache = run_dir / "deployed_density_sweep.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["sweep"]
    sweep = density_sweep([str(run_dir)], TARGETS, calibration_samples=args.calibration_samples,
                          data_dir=args.data_dir, progress=False)["runs"][0]
    cache.write_text(json.dumps({"key": key, "sweep": sweep}, indent=2))
    return sweep


def markdown(rows: list[dict]) -> str:
    lines = ["| task | variant | target | deployed density | metric | Δ vs dense PEFT | union/seq | learned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['variant']} | {r['target_density']:.2f} | {100 * r['deployed_density']:.2f}% "
                     f"| {r['metric']:.2f} | {r['metric_delta_vs_dense_peft']:+.2f} | {100 * r['union_density']:.2f}% "
                     f"| {'yes' if r['learned'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for variant in VARIANTS:
            pts = sorted((r for r in rows if r["task"] == task and r["variant"] == variant),
                         key=lambda r: r["deployed_density"])
            if pts:
                style = "k--o" if variant == "peft+thresholds" else "o-"
                ax.plot([100 * p["deployed_density"] for p in pts], [p["metric"] for p in pts], style,
                        label=variant, markersize=4)
        dense = next(r["dense_peft_metric"] for r in rows if r["task"] == task)
        ax.axhline(dense, color="gray", lw=0.8, ls=":", label="dense PEFT")
        ax.set_xscale("log")
        ax.set_xlabel("deployed exact density (%, log)")
        ax.set_ylabel(f"{get_task(task).main_metric} (points)")
        ax.set_title(f"MiniLM · {task}: metric at deployed density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-train-samples", type=int, default=2000, help="0 = the full training set")
    ap.add_argument("--calibration-samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs-dir", default="runs/deployed_density")
    ap.add_argument("--out", default="benchmarks/results/deployed_density")
    args = ap.parse_args()

    rows = []
    for task in args.tasks:
        variants = ["peft+thresholds", *[v for v in args.variants if v != "peft+thresholds"]]
        sweeps, steps = {}, {}
        for variant in variants:
            run_dir = Path(args.runs_dir) / task / variant
            results = run_or_reuse(config_for(task, variant, args), run_dir, note=f"{variant} ")
            steps[variant] = results["steps"]
            sweeps[variant] = sweep_or_reuse(run_dir, args)
            print(f"== {task} {variant}: " + ", ".join(
                f"{p['target_density']:.2f}→{100 * p['deployed_density']:.1f}%:{100 * p['metric']:.2f}"
                for p in sweeps[variant]["points"]), flush=True)
        dense = 100 * next(p["metric"] for p in sweeps["peft+thresholds"]["points"] if p["target_density"] == 1.0)
        did_learn = learned(task, dense, args.data_dir)
        for variant in variants:
            for p in sweeps[variant]["points"]:
                rows.append({"task": task, "variant": variant, "target_density": p["target_density"],
                             "deployed_density": p["deployed_density"], "metric": 100 * p["metric"],
                             "dense_peft_metric": dense, "metric_delta_vs_dense_peft": 100 * p["metric"] - dense,
                             "steps": steps[variant], "union_density": p["union_density"], "learned": did_learn,
                             "main_metric": sweeps[variant]["main_metric"]})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "epochs": args.epochs, "max_train_samples": args.max_train_samples,
               "calibration_samples": args.calibration_samples, "threshold_mode": "uniform", "seed": args.seed,
               "units": {"metric": "points (0-100; correlations x 100)", "densities": "fractions in [0, 1]"},
               "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown(rows))
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    print(f"wrote {out.with_suffix('.json')}, .md and .png")


if __name__ == "__main__":
    main()
