"""``deft density-sweep``: each run thresholded afresh at each target density — the metric against
the *deployed* exact density, one curve per run. This is the race DEFT has to win: the plain PEFT
run thresholded with no training (TEAL / CATS) against DEFT's runs, at equal deployed density."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..core.thresholds import apply_thresholds
from ..training import RunDir, TrainConfig, load_run, task_runner
from .sparsify import (DEFAULT_CALIBRATION_SAMPLES, MODES, calibrate, choose_thresholds, evaluation_summary,
                       neuron_masks, reset_thresholds)

DEFAULT_DENSITIES = (1.0, 0.5, 0.4, 0.3, 0.2, 0.1)


def check_densities(densities: Sequence[float]) -> list[float]:
    if not densities:
        raise ValueError("give at least one --densities value")
    bad = [d for d in densities if not 0 < d <= 1]
    if bad:
        raise ValueError(f"--densities are shares of active entries in (0, 1], got {bad}")
    return sorted(set(float(d) for d in densities), reverse=True)


def density_sweep(runs: Sequence[str], densities: Sequence[float] = DEFAULT_DENSITIES, *, mode: str = "uniform",
                  calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES, max_samples: int | None = None,
                  batch_size: int | None = None, data_dir: str | None = None, progress: bool = True,
                  point: str = "act", split: str | None = None) -> dict:
    """The ``sweep.json`` payload: per run, per target density (1 = untouched, no thresholds), the
    metric, the deployed exact density and the union density on ``split`` (default: the run's
    evaluation split; ``heldout``: its held-out training examples)."""
    targets = check_densities(densities)
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    if point not in ("act", "product"):
        raise ValueError(f"unknown --point {point!r}; choose act or product")
    if calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {calibration_samples}")
    for run in runs:
        RunDir(run).check()
        if split:  # a split the run cannot score fails before any model loads
            runner = task_runner(TrainConfig.from_dict(RunDir(run).read_config()))
            getattr(runner, "resolve_split", lambda s: s)(split)
    entries = []
    for run in runs:
        config, model, tokenizer = load_run(run)
        runner = task_runner(config)
        masks = neuron_masks(model)  # a neuron-form run's removed neurons stay removed
        reset_thresholds(model, masks)  # each target calibrated afresh, from the untouched model
        calibration = calibrate(model, tokenizer, config, samples=calibration_samples, data_dir=data_dir,
                                rows=mode == "greedy", point=point)
        runner = task_runner(replace(config, site_point=point))  # density read where the zeros are
        options = dict(max_samples=max_samples, batch_size=batch_size, data_dir=data_dir, progress=progress,
                       **({"split": split} if split else {}))
        points = []
        for target in targets:
            reset_thresholds(model, masks)
            thresholds = None
            if target < 1:
                thresholds = choose_thresholds(calibration.paths, calibration.magnitudes, density=target, mode=mode,
                                               tokens=calibration.tokens, samples=calibration_samples, model=model,
                                               calibration=calibration, point=point, masks=masks)
                apply_thresholds(model, thresholds)
            result = evaluation_summary(runner, model, tokenizer, **options)
            points.append({"target_density": target, "deployed_density": result["density"],
                           "union_density": result["union_density"], "metric": result["metric"],
                           "calibrated_density": thresholds.calibration["density"] if thresholds else None,
                           "taus": thresholds.taus if thresholds else None, "samples": result["samples"]})
            if progress:
                print(f"{run}: target {target:.2f} -> deployed density {result['density']:.4f}, "
                      f"{runner.task.main_metric} {100 * result['metric']:.2f}", flush=True)
        entries.append({"run": str(run), "label": f"{config.mode.upper()} {config.method} ({Path(run).name})",
                        "mode": config.mode, "method": config.method, "model": config.model, "task": config.task,
                        "main_metric": runner.task.main_metric, "points": points})
    return {"threshold_mode": mode, "point": point, "calibration_samples": calibration_samples,
            "eval_max_samples": max_samples, "split": split,
            "runs": entries}


def plot_density_sweep(payload: dict, path: str | Path, title: str = "") -> None:
    """Metric (%) against deployed exact density (%), one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for entry in payload["runs"]:
        pts = sorted(entry["points"], key=lambda p: p["deployed_density"])
        ax.plot([100 * p["deployed_density"] for p in pts], [100 * p["metric"] for p in pts], "o-",
                label=entry["label"])
    metric = payload["runs"][0]["main_metric"] if payload["runs"] else "metric"
    ax.set_xlabel("deployed exact density of MLP activations (%)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title or f"metric at deployed density ({payload['threshold_mode']} thresholds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
