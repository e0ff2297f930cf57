"""WANDA pruning (:mod:`deft.analysis.prune`) applied to saved runs: prune, evaluate, save as a
loadable run (``deft prune``), and sweep sparsity levels over runs (``deft prune-sweep``, the
paper's Fig. 4)."""

from __future__ import annotations

from pathlib import Path

from ..io.models import load_tokenizer
from ..methods import merge_peft
from ..tasks.runners.glue import without_labels
from ..training import RunDir, TrainConfig, load_run
from .energy_runs import glue_runner
from .prune import PruneConfig, check_prunable, check_sparsity, parse_n_m, target_modules, wanda_prune, weight_out_in

DEFAULT_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def save_pruned_run(model, source_run: str | Path, output_dir: str | Path, info: dict) -> RunDir:
    """A loadable pruned run: every model part of the source run (method, α, ...) and the pruned
    weights of ``model`` (already passed through ``merge_peft``) with ``prune.json``."""
    out = RunDir(source_run).derive(output_dir)
    out.save_pruned(model, info)
    return out


def prune_config_from(sparsity, structure, targets, calibration_samples, seed):
    """A validated :class:`deft.analysis.prune.PruneConfig`; with N:M the sparsity is 1 − N/M, and an
    explicit ``sparsity`` that disagrees is an error rather than silently ignored."""
    if structure is not None:
        n, m = parse_n_m(structure)
        implied = 1 - n / m
        if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
            raise ValueError(f"--structure {structure} prunes {implied:.0%} of each row, but --sparsity is "
                             f"{sparsity}: drop --sparsity or make it match")
        sparsity = implied
    elif sparsity is None:
        raise ValueError("give --sparsity S (0 <= S < 1) or --structure N:M")
    return PruneConfig(sparsity=check_sparsity(sparsity), structure=structure, targets=targets,
                       calibration_samples=calibration_samples, seed=seed)


def calibration_batches(tokenizer, config, prune_config, *, data_dir=None, batch_size: int = 16) -> list:
    """``calibration_samples`` random training sequences of the run's task (the paper: 128),
    tokenized like training; padding is masked out of the activation norms."""
    _, loader = glue_runner(config, "pruning").loader(
        tokenizer, "train", max_samples=prune_config.calibration_samples, seed=prune_config.seed,
        batch_size=batch_size, data_dir=data_dir)
    return list(without_labels(loader))


def _weight_sparsity(model, targets: str) -> dict:
    zeros = total = 0
    for module in target_modules(model, targets).values():
        w = weight_out_in(module)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"zeros": zeros, "weights": total, "sparsity": zeros / total if total else 0.0}


def prune_and_evaluate(run: str | Path, prune_config, *, data_dir=None, max_samples=None, batch_size: int = 64,
                       threshold=None, calibration=None, progress: bool = True):
    """Load ``run`` fresh, merge its adapters, WANDA-prune it, evaluate it on dev.

    Returns (model, tokenizer, config, info) with ``info`` as written to ``prune.json``.
    ``calibration`` reuses batches from :func:`calibration_batches` (a sweep draws them once).
    """
    if RunDir(run).check().is_shrunk:
        # A pruned run stores full-width weights loaded before the removal is re-applied.
        raise ValueError(f"{run} is a shrunk run (deft shrink): prune the run before shrinking it")
    config, model, tokenizer = load_run(RunDir(run).check())
    check_prunable(model, prune_config)  # before merging: a refused run stays as it was
    merged = merge_peft(model)
    was_merged = merged is not model
    batches = calibration if calibration is not None else \
        calibration_batches(tokenizer, config, prune_config, data_dir=data_dir)
    achieved = wanda_prune(merged, batches, prune_config)
    runner = glue_runner(config, "pruning")
    result = runner.evaluate_model(merged, tokenizer, data_dir=data_dir, max_samples=max_samples,
                                   batch_size=batch_size, threshold=threshold,
                                   progress=progress).summary(runner.task.main_metric)
    info = {
        "source_run": str(run), "mode": config.mode, "method": config.method, "task": config.task,
        "prune": prune_config.to_dict(), "merged": was_merged,
        "sparsity": prune_config.sparsity, "structure": prune_config.structure,
        "achieved_sparsity": _weight_sparsity(merged, prune_config.targets)["sparsity"],
        "per_layer_sparsity": achieved, **result,
    }
    return merged, tokenizer, config, info


def sweep_points(sparsities, structures) -> list[tuple[float, str | None]]:
    """(sparsity, structure) points: unstructured levels, then N:M patterns at 1 − N/M."""
    points = [(check_sparsity(s), None) for s in (sparsities if sparsities is not None else
                                                  (DEFAULT_SWEEP if not structures else (0.0,)))]
    for st in structures or ():
        n, m = parse_n_m(st)
        points.append((1 - n / m, st))
    if not points:
        raise ValueError("no sparsity levels to sweep")
    return points


def prune_sweep(runs, points, *, targets: str = "mlp_first", calibration_samples: int = 128, seed: int = 0,
                data_dir=None, max_samples=None, batch_size: int = 64, threshold=None, progress: bool = True) -> dict:
    """Every run pruned afresh at every point and evaluated on dev; the ``sweep.json`` payload."""
    for run in runs:
        RunDir(run).check()
    out_runs, labels = [], []
    for run in runs:
        config = TrainConfig.from_dict(RunDir(run).read_config())
        label = config.mode.upper()
        labels.append(label)
        tokenizer = load_tokenizer(config.model, config.tokenizer)
        # One calibration sample per run, shared by its points: each point prunes a fresh copy of
        # the same trained model, so only the sparsity differs between them.
        calib = calibration_batches(tokenizer, config, PruneConfig(calibration_samples=calibration_samples, seed=seed),
                                    data_dir=data_dir)
        rows, info = [], {}
        for sparsity, structure in points:
            cfg = PruneConfig(sparsity=sparsity, structure=structure, targets=targets,
                              calibration_samples=calibration_samples, seed=seed)
            print(f"== {label} {run}: {structure or f'{sparsity:.0%}'}")
            _, _, _, info = prune_and_evaluate(run, cfg, data_dir=data_dir, max_samples=max_samples,
                                               batch_size=batch_size, threshold=threshold, calibration=calib,
                                               progress=progress)
            rows.append({k: info[k] for k in ("sparsity", "structure", "achieved_sparsity", "metric", "metrics",
                                              "density", "density_threshold", "union_density", "samples")}
                        | {"per_layer_density": [r["density"] for r in info["density_report"]["per_layer"]]})
        out_runs.append({"run": str(run), "label": label, "mode": config.mode, "method": config.method,
                         "model": config.model, "task": config.task, "main_metric": info["main_metric"],
                         "tau": info["density_report"]["threshold"]["tau"], "points": rows})
    # Two runs of the same mode (two seeds, say) are told apart by their directory.
    for entry in out_runs:
        if labels.count(entry["label"]) > 1:
            entry["label"] = f"{entry['label']} ({Path(entry['run']).name})"
    return {"targets": targets, "calibration_samples": calibration_samples, "seed": seed,
            "eval_max_samples": max_samples, "runs": out_runs}


def plot_sweep(payload: dict, path: str | Path, title: str = "") -> None:
    """The paper's Fig. 4: metric vs sparsity and activation density vs sparsity, one colour per
    run; exact density solid, threshold density dashed; N:M points as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"PEFT": "tab:blue", "DEFT": "tab:orange"}
    palette = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray"])
    for entry in payload["runs"]:
        color = colors.get(entry["label"]) or next(palette, "black")
        lines = [p for p in entry["points"] if p["structure"] is None]
        stars = [p for p in entry["points"] if p["structure"] is not None]
        xs = [100 * p["sparsity"] for p in lines]
        ax_m.plot(xs, [100 * p["metric"] for p in lines], "o-", color=color, label=entry["label"])
        ax_d.plot(xs, [100 * p["density"] for p in lines], "o-", color=color, label=f"{entry['label']} exact")
        ax_d.plot(xs, [100 * p["density_threshold"] for p in lines], "s--", color=color,
                  label=f"{entry['label']} |a|>{entry['tau']:g}")
        for p in stars:
            x = 100 * p["sparsity"]
            ax_m.plot([x], [100 * p["metric"]], "*", color=color, markersize=12)
            ax_m.annotate(p["structure"], (x, 100 * p["metric"]), textcoords="offset points", xytext=(5, 5))
            ax_d.plot([x], [100 * p["density"]], "*", color=color, markersize=12)
            ax_d.annotate(p["structure"], (x, 100 * p["density"]), textcoords="offset points", xytext=(5, 5))
    metric = next((e["main_metric"] for e in payload["runs"] if e["main_metric"]), "metric")
    ax_m.set_ylabel(f"{metric} (%)")
    ax_d.set_ylabel("activation density (%)")
    for ax in (ax_m, ax_d):
        ax.set_xlabel(f"weight sparsity of the pruned layers ({payload['targets']}, %)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
