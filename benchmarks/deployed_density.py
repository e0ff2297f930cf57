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
from lib.sweeps import sweep_or_reuse

from deft.core.loss import DensityLossConfig
from deft.tasks import get_task, load_glue
from deft.training import TrainConfig

TARGETS = (1.0, 0.5, 0.4, 0.3, 0.2, 0.1)
GEMMA_TARGETS = (1.0, 0.5, 0.4, 0.3)
# task -> (epochs, training examples; 0 = the full set): the steps each task's PEFT baseline needs to
# leave the majority class. SST-2 learns from the main job's 2,000 examples in one epoch; MiniLM
# with 2,000 examples and one epoch stays at the majority class on MRPC, RTE and CoLA (the GLUE
# table), so those train on their full sets for several epochs.
BUDGETS = {"sst2": (1.0, 2000), "mrpc": (3.0, 0), "rte": (3.0, 0), "cola": (3.0, 0), "stsb": (3.0, 0)}
GEMMA_CALIBRATION = 64  # SQuAD training questions (each a ~256-token window)
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


def budget(task: str, args) -> dict:
    """Training budget of ``task``: the command line's where given, else :data:`BUDGETS`."""
    epochs, samples = BUDGETS.get(task, (1.0, 2000))
    extra = {"save_steps": 50} if task in BUDGETS and task != "sst2" else {}  # long runs resume mid-way
    return {"epochs": args.epochs if args.epochs is not None else epochs,
            "max_train_samples": (args.max_train_samples if args.max_train_samples is not None else samples) or None,
            **extra}


def config_for(task: str, variant: str, args) -> TrainConfig:
    mode, overrides, density = VARIANTS[variant]
    base = TrainConfig(task=task, mode=mode, model=args.model, data_dir=args.data_dir, seed=args.seed,
                       **budget(task, args))
    return replace(base, density=DensityLossConfig(**density), **overrides)  # fresh: tanh takes no ε


def rows_of(sweep: dict, *, task: str, variant: str, dense: float, steps: int, learned: bool, model: str,
            mode: str) -> list[dict]:
    return [{"task": task, "model": model, "variant": variant, "threshold_mode": mode,
             "target_density": p["target_density"], "deployed_density": p["deployed_density"],
             "metric": 100 * p["metric"], "dense_peft_metric": dense, "metric_delta_vs_dense_peft": 100 * p["metric"] - dense,
             "steps": steps, "union_density": p["union_density"], "learned": learned,
             "main_metric": sweep["main_metric"]} for p in sweep["points"]]


def gemma_rows(run_dir: Path, args) -> list[dict]:
    """The training-free rows for Gemma 3 270M: CATS-style gate thresholds (uniform, and greedy per
    layer) on its LoRA PEFT SQuAD run (``benchmarks/sparse_decode.py`` trains it), F1 on the run's
    held-out questions."""
    results = json.loads((run_dir / "results.json").read_text())
    rows = []
    for mode, variant in (("uniform", "peft+thresholds"), ("greedy", "peft+thresholds+greedy")):
        sweep = sweep_or_reuse(run_dir, GEMMA_TARGETS, calibration_samples=GEMMA_CALIBRATION, mode=mode,
                               data_dir=args.data_dir)
        dense = 100 * next(p["metric"] for p in sweep["points"] if p["target_density"] == 1.0)
        rows += rows_of(sweep, task="squad", variant=variant, dense=dense, steps=results["steps"],
                        learned=dense > 5.0, model="gemma3-270m", mode=mode)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | task | variant | target | deployed density | metric | Δ vs dense PEFT | union/seq | learned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {r['variant']} | {r['target_density']:.2f} | {100 * r['deployed_density']:.2f}% "
                     f"| {r['metric']:.2f} | {r['metric_delta_vs_dense_peft']:+.2f} | {100 * r['union_density']:.2f}% "
                     f"| {'yes' if r['learned'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({(r["model"], r["task"]) for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.4), squeeze=False)
    for ax, (model, task) in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task and r["model"] == model]
        for variant in dict.fromkeys(r["variant"] for r in mine):
            pts = sorted((r for r in mine if r["variant"] == variant),
                         key=lambda r: r["deployed_density"])
            if pts:
                style = "k--o" if variant == "peft+thresholds" else "o-"
                ax.plot([100 * p["deployed_density"] for p in pts], [p["metric"] for p in pts], style,
                        label=variant, markersize=4)
        dense = mine[0]["dense_peft_metric"]
        ax.axhline(dense, color="gray", lw=0.8, ls=":", label="dense PEFT")
        ax.set_xscale("log")
        ax.set_xlabel("deployed exact density (%, log)")
        ax.set_ylabel(f"{get_task(task).main_metric} (points)")
        ax.set_title(f"{model} · {task}: metric at deployed density")
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
    ap.add_argument("--epochs", type=float, default=None, help="default: the task's budget (BUDGETS)")
    ap.add_argument("--max-train-samples", type=int, default=None,
                    help="0 = the full training set; default: the task's budget (BUDGETS)")
    ap.add_argument("--calibration-samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs-dir", default="runs/deployed_density")
    ap.add_argument("--greedy", nargs="*", default=["peft+thresholds", "peft+train_density=0.1"],
                    help="variants also swept with greedy per-layer thresholds (rows named VARIANT+greedy)")
    ap.add_argument("--gemma-run", default=None,
                    help="Gemma 3 270M LoRA PEFT SQuAD run (runs/sparse_decode/gemma3-270m-squad-peft): add its "
                         "training-free rows")
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
            sweeps[variant] = sweep_or_reuse(run_dir, TARGETS, calibration_samples=args.calibration_samples,
                                             data_dir=args.data_dir)
            print(f"== {task} {variant}: " + ", ".join(
                f"{p['target_density']:.2f}→{100 * p['deployed_density']:.1f}%:{100 * p['metric']:.2f}"
                for p in sweeps[variant]["points"]), flush=True)
            # Greedy per-layer allocation on the variants named: "+greedy" rows beside the uniform ones.
            if variant in args.greedy:
                sweeps[f"{variant}+greedy"] = sweep_or_reuse(run_dir, TARGETS, calibration_samples=args.calibration_samples,
                                                             mode="greedy", data_dir=args.data_dir)
                steps[f"{variant}+greedy"] = results["steps"]
        dense = 100 * next(p["metric"] for p in sweeps["peft+thresholds"]["points"] if p["target_density"] == 1.0)
        did_learn = learned(task, dense, args.data_dir)
        for variant, sweep in sweeps.items():
            rows += rows_of(sweep, task=task, variant=variant, dense=dense, steps=steps[variant], learned=did_learn,
                            model=args.model, mode="greedy" if variant.endswith("+greedy") else "uniform")
    if args.gemma_run:
        rows += gemma_rows(Path(args.gemma_run), args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "budgets": {t: budget(t, args) for t in args.tasks},
               "calibration_samples": args.calibration_samples, "gemma_calibration_samples": GEMMA_CALIBRATION,
               "seed": args.seed,
               "units": {"metric": "points (0-100; correlations x 100)", "densities": "fractions in [0, 1]"},
               "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown(rows))
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    print(f"wrote {out.with_suffix('.json')}, .md and .png")


if __name__ == "__main__":
    main()
