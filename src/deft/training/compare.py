"""PEFT vs DEFT with identical settings over seeds: the paper's Table 1 rows and Fig. 2."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from ..core.metrics import density_change
from .config import TrainConfig
from .run import train

DENSITY_KINDS = (("density", lambda d: d["overall"]), ("density_threshold", lambda d: d["threshold"]["overall"]),
                 ("union_density", lambda d: d["union"]["overall"]))


# comparison.json's summary is on one scale, percent; each run under "runs" is its results.json as
# written (fractions, like every results file). Written into the file, so a reader need not guess.
UNITS = {
    "metric": "percent (the task's main metric × 100)",
    "density": "percent of MLP activation entries (density, density_threshold, union_density)",
    "per_layer": "percent, one value per MLP site (per_layer, per_layer_threshold), seed mean",
    "mean_std": "mean and sample standard deviation over seeds; std is null for a single seed, n = seeds",
    "density_change": "percent, relative: (PEFT − DEFT) / PEFT × 100 of the means (eq. 10)",
    "metric_delta": "percentage points: DEFT mean − PEFT mean",
    "runs": "each run's results.json unchanged: metrics and densities as fractions in [0, 1]",
}


def _mean_std(values: list[float]) -> dict:
    # A single seed has no spread: std is None, not 0.0, so nothing prints it as one.
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def summarize(results: dict[str, list[dict]]) -> dict:
    """Mean ± std of metric and densities per mode, and the density changes (eq. 10), in percent (:data:`UNITS`)."""
    summary = {}
    for mode, runs in results.items():
        main = runs[0]["main_metric"]
        layers = range(len(runs[0]["density"]["per_layer"]))
        summary[mode] = {
            "metric_name": main,
            "metric": _mean_std([100 * r["metrics"][main] for r in runs]),
            **{kind: _mean_std([100 * get(r["density"]) for r in runs]) for kind, get in DENSITY_KINDS},
            "per_layer": [100 * statistics.fmean(r["density"]["per_layer"][i]["density"] for r in runs)
                          for i in layers],
            "per_layer_threshold": [100 * statistics.fmean(r["density"]["per_layer"][i]["density_threshold"]
                                                           for r in runs) for i in layers],
        }
    if {"peft", "deft"} <= set(summary):
        summary["density_change"] = {kind: density_change(summary["peft"][kind]["mean"], summary["deft"][kind]["mean"])
                                     for kind, _ in DENSITY_KINDS}
        summary["metric_delta"] = summary["deft"]["metric"]["mean"] - summary["peft"]["metric"]["mean"]
    return summary


def compare(config: TrainConfig, seeds: list[int], output_dir: str | Path, *, progress: bool = True) -> dict:
    """Train PEFT and DEFT for every seed (finished runs are reused, so an interrupted compare
    picks up where it stopped), then write ``comparison.json`` and the per-layer density plot."""
    out = Path(output_dir)
    results: dict[str, list[dict]] = {"peft": [], "deft": []}
    for seed in seeds:
        for mode in ("peft", "deft"):
            run_dir = out / f"{mode}-seed{seed}"
            done = run_dir / "results.json"
            run_config = replace(config, mode=mode, seed=seed)
            if done.exists() and run_config.same_run(json.loads(done.read_text())["config"]):
                results[mode].append(json.loads(done.read_text()))
                continue
            print(f"== {mode.upper()} seed {seed} -> {run_dir}")
            results[mode].append(train(run_config, run_dir, resume=run_dir.exists(), progress=progress))
    summary = summarize(results)
    payload = {"task": config.task, "model": config.model, "method": config.method, "seeds": seeds,
               "units": UNITS, "summary": summary, "runs": results}
    (out / "comparison.json").write_text(json.dumps(payload, indent=2))
    plot_per_layer(summary, out / "density_per_layer.png",
                   title=f"{config.model} · {config.method} · {config.task}")
    return payload


def plot_per_layer(summary: dict, path: Path, title: str = "") -> None:
    """Per-layer density, PEFT vs DEFT, exact and at threshold (the paper's Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, color in (("peft", "tab:blue"), ("deft", "tab:orange")):
        if mode not in summary:
            continue
        layers = range(len(summary[mode]["per_layer"]))
        ax.plot(layers, summary[mode]["per_layer"], "o-", color=color, label=f"{mode.upper()} exact")
        ax.plot(layers, summary[mode]["per_layer_threshold"], "s--", color=color,
                label=f"{mode.upper()} |a|>τ")
    ax.set_xlabel("layer")
    ax.set_ylabel("activation density (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
