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


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(results: dict[str, list[dict]]) -> dict:
    """Mean ± std of metric and densities per mode, and the density changes (eq. 10)."""
    summary = {}
    for mode, runs in results.items():
        main = runs[0]["main_metric"]
        summary[mode] = {
            "metric_name": main,
            "metric": _mean_std([100 * r["metrics"][main] for r in runs]),
            **{kind: _mean_std([100 * get(r["density"]) for r in runs]) for kind, get in DENSITY_KINDS},
            "per_layer": [statistics.fmean(r["density"]["per_layer"][i]["density"] for r in runs)
                          for i in range(len(runs[0]["density"]["per_layer"]))],
            "per_layer_threshold": [statistics.fmean(r["density"]["per_layer"][i]["density_threshold"] for r in runs)
                                    for i in range(len(runs[0]["density"]["per_layer"]))],
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
               "summary": summary, "runs": results}
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
        ax.plot(layers, [100 * v for v in summary[mode]["per_layer"]], "o-", color=color, label=f"{mode.upper()} exact")
        ax.plot(layers, [100 * v for v in summary[mode]["per_layer_threshold"]], "s--", color=color,
                label=f"{mode.upper()} |a|>τ")
    ax.set_xlabel("layer")
    ax.set_ylabel("activation density (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
