"""Deployed density: DEFT and its deployment variants against training-free thresholding (TEAL /
CATS) at equal *deployed* exact density.

Every variant of a task is trained with the same budget, then thresholded afresh at each target
density (uniform per-layer thresholds calibrated on 256 training examples, ``deft density-sweep``)
and evaluated on the full dev set: the metric at the exact density a kernel would skip. Rows:

* ``peft+thresholds`` — the plain PEFT run thresholded with no training (the baseline);
* ``deft+thresholds`` — today's DEFT recipe (λ 1, ℓ0 ε 0.1);
* the deployment variants, named by their options (``deft train --help``): threshold in the loop
  (straight-through), with and without the density loss, per entry or whole neurons
  (``form=neuron``); ReLU-fication; ε annealing; the sequence-shared term; ``+distill``: also
  trained towards the outputs of this budget's ``peft+thresholds`` run (``--distill-from``), which
  therefore trains first; ``+lora_down``: LoRA also on the MLP's down projection
  (``--method-options '{"include_mlp": true, "include_mlp_down": true}'``).

Each task trains at its budget (:data:`BUDGETS`; ``--epochs`` / ``--max-train-samples`` / ``--lr``
override it), under ``--runs-dir/TASK/e{epochs}-n{examples}[-lr{lr}][-h{held out}][-s{seed}]/VARIANT``, so one variant at
two budgets keeps both runs; every row's delta is against dense PEFT at the same budget. Runs
and sweeps are reused: an interrupted benchmark picks up where it stopped. Writes
``benchmarks/results/deployed_density.json`` (+ ``.md``, ``.png``), merged with the rows earlier
invocations wrote (other tasks, budgets, variants; ``--fresh`` drops them); its ``summary`` is
the paper's headline on exact zeros (:func:`summary`). ``--seed N`` trains every run with seed N,
under ``…-sN`` (seed 0 adds no suffix); with rows of several seeds in the JSON, ``summary`` also
has per budget set the mean over the seeds (:func:`seed_mean`, the per-seed values beside it).

    DEFT_DATA_DIR=../shared/data python benchmarks/deployed_density.py [--tasks sst2 mrpc] [--variants ...] \\
        [--epochs 3] [--targets 1 0.5 0.3 0.1] [--greedy VARIANT ...]
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
# task -> its training budget (TrainConfig fields): the steps each task's PEFT baseline needs to
# leave the majority class. SST-2 learns from the main job's 2,000 examples in one epoch; MiniLM
# with 2,000 examples and one epoch stays at the majority class on MRPC, RTE and CoLA (the GLUE
# table), so those train on their full sets for several epochs (0 examples = the full set). On
# MRPC LoRA's default learning rate (5e-3) keeps the majority class for 3 full epochs; 1e-3 learns
# (76.5 % accuracy after 2 epochs against the majority's 68.4 %), and the other small tasks use it too.
BUDGETS = {"sst2": {"epochs": 1.0, "max_train_samples": 2000},
           "mrpc": {"epochs": 3.0, "max_train_samples": 0, "learning_rate": 1e-3},
           "rte": {"epochs": 3.0, "max_train_samples": 0, "learning_rate": 1e-3},
           "cola": {"epochs": 3.0, "max_train_samples": 0, "learning_rate": 1e-3},
           "stsb": {"epochs": 3.0, "max_train_samples": 0, "learning_rate": 1e-3}}
GEMMA_CALIBRATION = 64  # SQuAD training questions (each a ~256-token window)
LORA_DOWN = {"include_mlp": True, "include_mlp_down": True}  # the LoRA preset plus the MLP's down projection
# variant name → (mode, TrainConfig overrides, DensityLossConfig overrides)
VARIANTS = {
    "peft+thresholds": ("peft", {}, {}),
    "deft+thresholds": ("deft", {}, {}),
    "peft+train_density=0.1": ("peft", {"train_density": 0.1}, {}),
    "deft+train_density=0.1": ("deft", {"train_density": 0.1}, {}),
    "peft+train_density=0.4": ("peft", {"train_density": 0.4}, {}),
    "peft+activation=relu": ("peft", {"activation": "relu"}, {}),
    "deft+activation=relu+approx=tanh": ("deft", {"activation": "relu"}, {"approx": "tanh"}),
    "deft+eps_final=1e-3": ("deft", {}, {"eps_final": 1e-3}),
    "deft+density_form=sequence": ("deft", {}, {"form": "sequence"}),
    "deft+density_form=sequence+lambda=0.1": ("deft", {}, {"form": "sequence", "weight": 0.1}),
    "deft+activation=relu+approx=tanh+lambda=0.1": ("deft", {"activation": "relu"}, {"approx": "tanh", "weight": 0.1}),
    "peft+train_density=0.05": ("peft", {"train_density": 0.05}, {}),
    "peft+train_density=0.1+form=neuron": ("peft", {"train_density": 0.1, "train_density_form": "neuron"}, {}),
    "peft+train_density=0.2+form=neuron": ("peft", {"train_density": 0.2, "train_density_form": "neuron"}, {}),
    "peft+train_density=0.1+form=neuron+ste=false": ("peft", {"train_density": 0.1, "train_density_form": "neuron",
                                                             "ste": False}, {}),
    "peft+train_density=0.2+form=neuron+ste=false": ("peft", {"train_density": 0.2, "train_density_form": "neuron",
                                                             "ste": False}, {}),
    "peft+train_density=0.1+form=neuron+ste=false+rank=output": (
        "peft", {"train_density": 0.1, "train_density_form": "neuron", "ste": False, "neuron_rank": "output"}, {}),
    "peft+train_density=0.1+form=neuron+ste=false+rank=output+rank_steps=10": (
        "peft", {"train_density": 0.1, "train_density_form": "neuron", "ste": False, "neuron_rank": "output",
                 "neuron_rank_steps": 10}, {}),
    # "+distill": the loss also matches the dense PEFT run of the same budget (deft train --distill-from).
    "peft+train_density=0.4+distill": ("peft", {"train_density": 0.4, "distill": True}, {}),
    "peft+train_density=0.1+distill": ("peft", {"train_density": 0.1, "distill": True}, {}),
    "peft+train_density=0.1+form=neuron+ste=false+distill": (
        "peft", {"train_density": 0.1, "train_density_form": "neuron", "ste": False, "distill": True}, {}),
    "peft+train_density=0.1+form=neuron+ste=false+rank=output+distill": (
        "peft", {"train_density": 0.1, "train_density_form": "neuron", "ste": False, "neuron_rank": "output",
                 "distill": True}, {}),
    # "+lora_down": LoRA on every block's down projection too, so the neurons kept can be re-weighted.
    "peft+lora_down": ("peft", {"method_options": LORA_DOWN}, {}),
    "peft+train_density=0.4+lora_down": ("peft", {"train_density": 0.4, "method_options": LORA_DOWN}, {}),
    "peft+train_density=0.5+lora_down": ("peft", {"train_density": 0.5, "method_options": LORA_DOWN}, {}),
    "peft+train_density=0.1+form=neuron+ste=false+lora_down": (
        "peft", {"train_density": 0.1, "train_density_form": "neuron", "ste": False, "method_options": LORA_DOWN}, {}),
    "peft+train_density=0.1+form=neuron+ste=false+fill=mean": (
        "peft", {"train_density": 0.1, "train_density_form": "neuron", "ste": False, "neuron_fill": "mean"}, {}),
    "peft+train_density=0.2+form=neuron+ste=false+fill=mean": (
        "peft", {"train_density": 0.2, "train_density_form": "neuron", "ste": False, "neuron_fill": "mean"}, {}),
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
    chosen = dict(BUDGETS.get(task, {"epochs": 1.0, "max_train_samples": 2000}))
    if args.epochs is not None:
        chosen["epochs"] = args.epochs
    if args.max_train_samples is not None:
        chosen["max_train_samples"] = args.max_train_samples
    if args.lr is not None:
        chosen["learning_rate"] = args.lr
    if args.holdout_samples:
        chosen["holdout_samples"] = args.holdout_samples
    return chosen


def budget_tag(chosen: dict, seed: int = 0) -> str:
    """The run-directory level naming a budget and seed, so runs of one variant at two budgets or
    seeds coexist (seed 0 adds nothing: the directories of runs trained before seeds were named)."""
    tag = f"e{chosen['epochs']:g}-n{chosen['max_train_samples'] or 'all'}"
    tag += f"-lr{chosen['learning_rate']:g}" if chosen.get("learning_rate") is not None else ""
    tag += f"-h{chosen['holdout_samples']}" if chosen.get("holdout_samples") else ""
    return tag + (f"-s{seed}" if seed else "")


def config_for(task: str, variant: str, args) -> TrainConfig:
    mode, overrides, density = VARIANTS[variant]
    chosen = budget(task, args)
    if overrides.get("distill"):  # the teacher: this budget's dense PEFT run, trained first
        overrides = {**{k: v for k, v in overrides.items() if k != "distill"},
                     "distill_from": str(Path(args.runs_dir) / task / budget_tag(chosen, args.seed) / "peft+thresholds")}
    long_run = {"save_steps": 50} if (chosen["max_train_samples"] or 10**9) > 2000 else {}  # resume mid-way
    base = TrainConfig(task=task, mode=mode, model=args.model, data_dir=args.data_dir, seed=args.seed,
                       **{**chosen, "max_train_samples": chosen["max_train_samples"] or None}, **long_run)
    return replace(base, density=DensityLossConfig(**density), **overrides)  # fresh: tanh takes no ε


def rows_of(sweep: dict, *, task: str, variant: str, dense: float, steps: int, learned: bool, model: str,
            mode: str, budget: dict | None = None, heldout: dict | None = None, seed: int = 0) -> list[dict]:
    """One row per target of ``sweep`` (dev); with ``heldout`` (the same run's sweep on its held-out
    training examples) each row carries the held-out metric and density too."""
    aside = {p["target_density"]: p for p in heldout["points"]} if heldout else {}
    return [{"task": task, "model": model, "variant": variant, "threshold_mode": mode, **(budget or {}), "seed": seed,
             "target_density": p["target_density"], "deployed_density": p["deployed_density"],
             "metric": 100 * p["metric"], "dense_peft_metric": dense, "metric_delta_vs_dense_peft": 100 * p["metric"] - dense,
             "steps": steps, "union_density": p["union_density"], "learned": learned,
             "main_metric": sweep["main_metric"],
             **({"heldout_metric": 100 * aside[p["target_density"]]["metric"],
                 "heldout_deployed_density": aside[p["target_density"]]["deployed_density"]}
                if p["target_density"] in aside else {})} for p in sweep["points"]]


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


# The budget sets the headline is averaged at: the tasks' budgets, and the same with SST-2 trained
# for 3 epochs like the other tasks (its target is read at both; neither is chosen after the fact).
SUMMARY_BUDGETS = {"budgets": BUDGETS, "sst2 at 3 epochs": {**BUDGETS, "sst2": {"epochs": 3.0, "max_train_samples": 2000}}}


def holdout_budgets(rows: list[dict]) -> dict:
    """A budget set per held-out size in ``rows``: every task at 3 epochs (SST-2 on its 2,000
    examples, the rest on their full sets) with that many training examples set aside."""
    sizes = sorted({r["holdout_samples"] for r in rows if r.get("holdout_samples")})
    base = SUMMARY_BUDGETS["sst2 at 3 epochs"]
    return {f"3 epochs, {n} held out": {t: {**b, "holdout_samples": n} for t, b in base.items()} for n in sizes}


def at_budget(row: dict, budgets: dict) -> bool:
    """Whether ``row`` was trained at its task's budget in ``budgets`` (held-out examples included)."""
    want = budgets.get(row["task"], {})
    return (all(row.get(k) == v for k, v in want.items()) and row.get("learning_rate") == want.get("learning_rate")
            and row.get("holdout_samples", 0) == want.get("holdout_samples", 0))


def summary(rows: list[dict], budgets: dict | None = None, name: str = "budgets", seed: int = 0) -> list[dict]:
    """The paper's headline on exact zeros: per variant and target, the average over the tasks whose
    PEFT baseline learned (at the task's budget in ``budgets``, default :data:`BUDGETS`) of the
    deployed-density change against dense PEFT (eq. 10: (D_PEFT − D) / D_PEFT) and of the metric's
    change, for the runs trained with ``seed``. Each entry names its budget set and carries the
    per-task budgets."""
    budgets = BUDGETS if budgets is None else budgets
    mine = [r for r in rows if r["model"] == "minilm" and r["learned"] and at_budget(r, budgets)
            and r.get("seed", 0) == seed]
    dense_density = {r["task"]: r["deployed_density"] for r in mine
                     if r["variant"] == "peft+thresholds" and r["target_density"] == 1.0}
    tasks = sorted(dense_density)
    out = []
    for variant, target in dict.fromkeys((r["variant"], r["target_density"]) for r in mine):
        per_task = {r["task"]: r for r in mine if r["variant"] == variant and r["target_density"] == target}
        if sorted(per_task) != tasks:
            continue  # averages only over the same tasks as the baseline's
        change = sum((dense_density[t] - per_task[t]["deployed_density"]) / dense_density[t] for t in tasks) / len(tasks)
        delta = sum(per_task[t]["metric_delta_vs_dense_peft"] for t in tasks) / len(tasks)
        out.append({"variant": variant, "target_density": target, "tasks": tasks, "budget_set": name, "seed": seed,
                    "budgets": {t: budgets[t] for t in tasks}, "steps": {t: per_task[t]["steps"] for t in tasks},
                    "avg_density_change": change, "avg_metric_delta": delta,
                    "meets_target": change >= 0.5 and delta >= -0.5})
    return out


def seed_mean(rows: list[dict], budgets: dict, name: str) -> list[dict]:
    """The headline averaged over seeds (``--seed``): for each variant and target that :func:`summary`
    scores at every seed trained at ``budgets``, the mean of its per-seed averages — each seed's
    deltas against the dense PEFT run of that seed — with the per-seed values beside it. Single-seed
    noise (a few points per task on the small GLUE sets) is larger than the headline's 0.5-point
    tolerance; only this entry can tell a real gap from a lucky or unlucky seed. Empty with one seed."""
    mine = [r for r in rows if r["model"] == "minilm" and r["learned"] and at_budget(r, budgets)]
    baselines = {}  # seed -> the tasks with a dense PEFT run at that seed
    for r in mine:
        if r["variant"] == "peft+thresholds" and r["target_density"] == 1.0:
            baselines.setdefault(r.get("seed", 0), set()).add(r["task"])
    # Only seeds trained for every task seed 0 has: a seed run on one task says nothing about the average.
    seeds = sorted(s for s, tasks in baselines.items() if tasks == baselines.get(0))
    if len(seeds) < 2:
        return []
    per_seed = {s: {(e["variant"], e["target_density"]): e for e in summary(rows, budgets, name, s)} for s in seeds}
    out = []
    for key in [k for k in per_seed[seeds[0]] if all(k in per_seed[s] for s in seeds)]:
        entries = [per_seed[s][key] for s in seeds]  # over the same tasks: the seeds were chosen so
        change = sum(e["avg_density_change"] for e in entries) / len(seeds)
        delta = sum(e["avg_metric_delta"] for e in entries) / len(seeds)
        out.append({**entries[0], "budget_set": f"{name}, mean of seeds {', '.join(map(str, seeds))}",
                    "seed": seeds, "per_seed": [{"seed": s, "avg_density_change": e["avg_density_change"],
                                                 "avg_metric_delta": e["avg_metric_delta"]}
                                                for s, e in zip(seeds, entries)],
                    "avg_density_change": change, "avg_metric_delta": delta,
                    "meets_target": change >= 0.5 and delta >= -0.5})
    return out


# A task's operating point: the lowest held-out deployed density whose held-out metric is within this
# many points of dense PEFT's held-out metric — the headline's tolerance, applied per task, fixed
# before any held-out run was scored.
SELECTION_TOLERANCE = 0.5


def selection(rows: list[dict], budgets: dict, name: str, tolerance: float = SELECTION_TOLERANCE) -> dict | None:
    """The headline with one operating point per task, chosen where dev is not seen: on each run's
    held-out training examples (``--holdout-samples``), among every target of the variants trained
    for every task at ``budgets``; then scored on dev (eq. 10 against dense PEFT's dev density, metric against dense
    PEFT's dev metric), averaged over the tasks that learned. None without held-out rows."""
    mine = [r for r in rows if r["model"] == "minilm" and r["learned"] and at_budget(r, budgets) and "heldout_metric" in r
            and r.get("seed", 0) == 0]
    dense = {r["task"]: r for r in mine if r["variant"] == "peft+thresholds" and r["target_density"] == 1.0}
    if not dense:
        return None
    # The candidates: the variants trained for every task (one candidate set, whatever else a task has).
    variants = set.intersection(*({r["variant"] for r in mine if r["task"] == t} for t in dense))
    per_task = {}
    for task, base in sorted(dense.items()):
        fine = [r for r in mine if r["task"] == task and r["variant"] in variants
                and r["heldout_metric"] >= base["heldout_metric"] - tolerance]
        pick = min(fine, key=lambda r: (r["heldout_deployed_density"], -r["heldout_metric"]))
        per_task[task] = {"variant": pick["variant"], "target_density": pick["target_density"], "steps": pick["steps"],
                          "heldout_metric": pick["heldout_metric"], "heldout_dense_peft_metric": base["heldout_metric"],
                          "heldout_deployed_density": pick["heldout_deployed_density"],
                          "deployed_density": pick["deployed_density"], "metric": pick["metric"],
                          "dense_peft_metric": base["metric"], "dense_peft_density": base["deployed_density"],
                          "density_change": 1 - pick["deployed_density"] / base["deployed_density"],
                          "metric_delta": pick["metric"] - base["metric"]}
    change = sum(p["density_change"] for p in per_task.values()) / len(per_task)
    delta = sum(p["metric_delta"] for p in per_task.values()) / len(per_task)
    return {"budget_set": name, "budgets": {t: budgets[t] for t in per_task}, "tolerance": tolerance,
            "candidate_variants": sorted(variants),
            "tasks": per_task, "avg_density_change": change, "avg_metric_delta": delta,
            "meets_target": change >= 0.5 and delta >= -0.5}


def per_seed_note(entry: dict) -> str:
    """A seed-mean entry's per-seed values, for its table cell; nothing for one seed's entry."""
    return "" if "per_seed" not in entry else " (per seed: " + "; ".join(
        f"{p['seed']}: {100 * p['avg_density_change']:.1f}% {p['avg_metric_delta']:+.2f}" for p in entry["per_seed"]) + ")"


def markdown(rows: list[dict], headline: list[dict] = (), chosen: list[dict] = ()) -> str:
    lines = []
    for entry in chosen:  # per-task operating points chosen on held-out training examples, scored on dev
        lines += [f"Operating points chosen on held-out training examples ({entry['budget_set']}; tolerance "
                  f"{entry['tolerance']:g} point), scored on dev: average deployed-density change "
                  f"{100 * entry['avg_density_change']:.1f}%, average Δ metric {entry['avg_metric_delta']:+.2f} "
                  f"(meets target: {'yes' if entry['meets_target'] else 'no'})", "",
                  "| task | variant | target | held-out metric (dense) | dev density | dev metric (dense) | Δ |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {t} | {p['variant']} | {p['target_density']:.2f} | {p['heldout_metric']:.2f} "
                  f"({p['heldout_dense_peft_metric']:.2f}) | {100 * p['deployed_density']:.2f}% | {p['metric']:.2f} "
                  f"({p['dense_peft_metric']:.2f}) | {p['metric_delta']:+.2f} |" for t, p in entry["tasks"].items()]
        lines.append("")
    if headline:  # the summary first: what a reader checks the target against
        lines += ["| budget set | variant | target | tasks (steps) | avg deployed-density change | avg Δ metric | meets target |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['budget_set']}{per_seed_note(e)} | {e['variant']} | {e['target_density']:.2f} | "
                  + ", ".join(f"{t} ({n})" for t, n in e["steps"].items())
                  + f" | {round(100 * e['avg_density_change'], 1) + 0.0:.1f}% | {e['avg_metric_delta']:+.2f} | {'yes' if e['meets_target'] else 'no'} |"
                  for e in headline]
        lines.append("")
    lines += ["| model | task | steps | seed | variant | target | deployed density | metric | Δ vs dense PEFT | union/seq | learned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {r['steps']} | {r.get('seed', 0)} | {r['variant']} | {r['target_density']:.2f} | {100 * r['deployed_density']:.2f}% "
                     f"| {r['metric']:.2f} | {r['metric_delta_vs_dense_peft']:+.2f} | {100 * r['union_density']:.2f}% "
                     f"| {'yes' if r['learned'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({(r["model"], r["task"]) for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 8.0), squeeze=False)
    for ax, (model, task) in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task and r["model"] == model and r.get("seed", 0) == 0]
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 curves, each its own colour
        budgets = sorted({r["steps"] for r in mine})
        for variant, steps in dict.fromkeys((r["variant"], r["steps"]) for r in mine):
            pts = sorted((r for r in mine if r["variant"] == variant and r["steps"] == steps),
                         key=lambda r: r["deployed_density"])
            label = variant if len(budgets) == 1 else f"{variant} ({steps} steps)"
            style = ("k" if steps == budgets[0] else "b") + "--o" if variant == "peft+thresholds" else "o-"
            ax.plot([100 * p["deployed_density"] for p in pts], [p["metric"] for p in pts], style,
                    label=label, markersize=4)
        for steps in budgets:
            dense = next(r["dense_peft_metric"] for r in mine if r["steps"] == steps)
            ax.axhline(dense, color="gray", lw=0.8, ls=":", label="dense PEFT" + (f" ({steps} steps)" if len(budgets) > 1 else ""))
        ax.set_xscale("log")
        ax.set_xlabel("deployed exact density (%, log)")
        ax.set_ylabel(f"{get_task(task).main_metric} (points)")
        ax.set_title(f"{model} · {task}: metric at deployed density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: curves stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows that ``new`` did not measure again, then ``new``: a row is replaced only by one
    of the same run (model, task, variant, steps, held-out size, learning rate, seed)."""
    def key(r):
        return (r["model"], r["task"], r["variant"], r["steps"], r.get("holdout_samples", 0), r.get("learning_rate"),
                r.get("seed", 0))
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--epochs", type=float, default=None, help="default: the task's budget (BUDGETS)")
    ap.add_argument("--max-train-samples", type=int, default=None,
                    help="0 = the full training set; default: the task's budget (BUDGETS)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's budget, else the method's)")
    ap.add_argument("--targets", nargs="+", type=float, default=list(TARGETS),
                    help="per-layer target densities of the sweeps (1 = untouched)")
    ap.add_argument("--holdout-samples", type=int, default=0,
                    help="set this many training examples of each task aside (deft train --holdout-samples), sweep "
                         "each run on them too, and choose each task's operating point there (the summary's "
                         "'selection'); 0 = none")
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
    ap.add_argument("--fresh", action="store_true", help="drop the rows of earlier invocations from --out")
    args = ap.parse_args()

    rows = []
    for task in args.tasks:
        chosen = budget(task, args)
        variants = ["peft+thresholds", *[v for v in args.variants if v != "peft+thresholds"]]
        sweeps, steps, heldout = {}, {}, {}
        for variant in variants:
            run_dir = Path(args.runs_dir) / task / budget_tag(chosen, args.seed) / variant
            results = run_or_reuse(config_for(task, variant, args), run_dir, note=f"{variant} ")
            steps[variant] = results["steps"]
            sweeps[variant] = sweep_or_reuse(run_dir, args.targets, calibration_samples=args.calibration_samples,
                                             data_dir=args.data_dir)
            if args.holdout_samples:
                heldout[variant] = sweep_or_reuse(run_dir, args.targets, calibration_samples=args.calibration_samples,
                                                  data_dir=args.data_dir, split="heldout")
            print(f"== {task} {variant}: " + ", ".join(
                f"{p['target_density']:.2f}→{100 * p['deployed_density']:.1f}%:{100 * p['metric']:.2f}"
                for p in sweeps[variant]["points"]), flush=True)
            # Greedy per-layer allocation on the variants named: "+greedy" rows beside the uniform ones.
            if variant in args.greedy:
                sweeps[f"{variant}+greedy"] = sweep_or_reuse(run_dir, args.targets, calibration_samples=args.calibration_samples,
                                                             mode="greedy", data_dir=args.data_dir)
                steps[f"{variant}+greedy"] = results["steps"]
        # The baseline of this budget: every row's delta is against dense PEFT trained for the same steps.
        dense = 100 * next(p["metric"] for p in sweeps["peft+thresholds"]["points"] if p["target_density"] == 1.0)
        did_learn = learned(task, dense, args.data_dir)
        for variant, sweep in sweeps.items():
            rows += rows_of(sweep, task=task, variant=variant, dense=dense, steps=steps[variant], learned=did_learn,
                            model=args.model, mode="greedy" if variant.endswith("+greedy") else "uniform",
                            budget=chosen, heldout=heldout.get(variant), seed=args.seed)
    if args.gemma_run:
        rows += gemma_rows(Path(args.gemma_run), args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Rows of earlier invocations (other tasks, other budgets) stay unless this one measured them again.
    old = [] if args.fresh or not out.with_suffix(".json").is_file() else json.loads(out.with_suffix(".json").read_text())["rows"]
    rows = merge_rows(old, rows)
    budget_sets = {**SUMMARY_BUDGETS, **holdout_budgets(rows)}
    headline = [e for name, b in budget_sets.items() for e in summary(rows, b, name)]
    headline += [e for name, b in budget_sets.items() for e in seed_mean(rows, b, name)]
    chosen_points = [e for name, b in budget_sets.items() if (e := selection(rows, b, name))]
    payload = {"budgets": BUDGETS, "calibration_samples": args.calibration_samples,
               "gemma_calibration_samples": GEMMA_CALIBRATION, "seed": args.seed,
               "units": {"metric": "points (0-100; correlations x 100)", "densities": "fractions in [0, 1]"},
               "summary": headline, "selection": chosen_points, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, headline, chosen_points))
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    print(f"wrote {out.with_suffix('.json')}, .md and .png")


if __name__ == "__main__":
    main()
