"""``deft bench-inference``: ADA-DEFT with its blocks removed vs the same model unskipped vs an
ADA-PEFT run, side by side in one process: time, memory, metric."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..adaptive import DEFAULT_SKIP_THRESHOLD, AdaptiveError, adaptive_weights, pick_threshold, threshold_curve
from ..core.sites import find_sites
from ..tasks.runners import GlueRunner, runner_for
from ..training import load_run
from .export import export_run, prepare_for_inference
from .measure import model_bytes, peak_memory_of_export, timed_pass


def _pct_saving(baseline: float, value: float) -> float | None:
    return (baseline - value) / baseline * 100.0 if baseline else None


DEFAULT_CURVE = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def bench_inference(run_dir: str | Path, baseline_dir: str | Path | None = None, *,
                    threshold: float = DEFAULT_SKIP_THRESHOLD, repeats: int = 5, batch_size: int = 64,
                    max_samples: int | None = None, data_dir: str | None = None,
                    curve: Sequence[float] | None = DEFAULT_CURVE, progress: bool = True,
                    peak_memory: bool = True) -> dict:
    """ADA-DEFT skipped vs the same model unskipped vs an ADA-PEFT run, side by side in one process.

    Every variant is put in its inference form (:func:`prepare_for_inference`: LoRA merged, α
    folded; QLoRA stays unmerged for all alike) and timed over the same pre-tokenised
    evaluation batches, interleaved in a rotating order so machine noise hits all alike; the
    median of ``repeats`` passes is reported (after one warm-up pass each). Memory is the
    resident bytes of parameters and buffers. The ADA-PEFT baseline goes through the same
    threshold (it normally skips nothing). ``curve``: thresholds for :func:`threshold_curve`
    on the ADA-DEFT run (None: no curve). ``peak_memory``: also export every variant and measure
    its load + one pass in a fresh process (:func:`peak_memory_of_export`); not for QLoRA, whose
    export is refused.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    config, deft_model, tokenizer = load_run(run_dir)
    if adaptive_weights(deft_model) is None:
        raise AdaptiveError(f"{run_dir} was trained without --ada: it has no α to skip blocks by")
    runner = runner_for(config)
    task = runner.task
    if not isinstance(runner, GlueRunner):
        raise AdaptiveError(f"bench-inference measures GLUE runs; {config.task!r} is a {task.kind} task")
    data, loader = runner.loader(tokenizer, task.dev_split, max_samples=max_samples, batch_size=batch_size,
                                 data_dir=data_dir)
    batches = list(loader)
    labels = torch.cat([b["labels"] for b in batches]).numpy()

    def metric_of(logits: torch.Tensor) -> float:
        return 100.0 * runner.metrics(logits.numpy(), labels)[task.main_metric]

    payload: dict = {"run": str(run_dir), "baseline": str(baseline_dir) if baseline_dir else None,
                     "task": task.name, "split": task.dev_split, "eval_samples": len(data),
                     "metric_name": task.main_metric, "threshold": threshold, "repeats": repeats,
                     "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
                     "method": config.method, "mode": config.mode, "model": config.model}
    if curve:
        points = threshold_curve(deft_model, lambda: metric_of(timed_pass(deft_model, batches)[1]), curve)
        payload["threshold_curve"] = [asdict(p) for p in points]
        payload["largest_threshold_within_1_point"] = asdict(pick_threshold(points, 1.0))
    merge = config.method != "qlora"
    variants: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}
    variants["ada_deft_unskipped"], _, info["ada_deft_unskipped"] = prepare_for_inference(deft_model, None, merge=merge)
    _, skip_model, _ = load_run(run_dir)
    variants["ada_deft_skipped"], _, info["ada_deft_skipped"] = prepare_for_inference(skip_model, threshold, merge=merge)
    if baseline_dir is not None:
        base_config, base_model, _ = load_run(baseline_dir)
        if base_config.task != config.task or base_config.model != config.model:
            raise AdaptiveError(f"baseline {baseline_dir} is {base_config.model}/{base_config.task}, "
                                f"not {config.model}/{config.task}")
        if adaptive_weights(base_model) is None:
            raise AdaptiveError(f"baseline {baseline_dir} was trained without --ada: an ADA-PEFT run is expected")
        variants["ada_peft"], _, info["ada_peft"] = prepare_for_inference(
            base_model, threshold, merge=base_config.method != "qlora")
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    logits: dict[str, torch.Tensor] = {}
    for name in names:  # warm-up (first-call allocations, lazy inits)
        logits[name] = timed_pass(variants[name], batches)[1]
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seconds, logits[name] = timed_pass(variants[name], batches)
            times[name].append(seconds)
        if progress:
            print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    results = {}
    for name in names:
        model = variants[name]
        results[name] = {
            "median_seconds": statistics.median(times[name]), "all_seconds": times[name],
            "param_bytes": model_bytes(model), "parameters": sum(p.numel() for p in model.parameters()),
            "blocks_skipped": len(info[name]["skipped"]), "skipped": info[name]["skipped"],
            "metric": metric_of(logits[name]), "alphas": info[name]["alphas"],
        }
    payload["variants"] = results
    skipped, unskipped = results["ada_deft_skipped"], results["ada_deft_unskipped"]
    reference = results.get("ada_peft")
    payload["blocks_skipped"] = skipped["blocks_skipped"]
    payload["blocks_total"] = len(find_sites(variants["ada_deft_unskipped"], "act"))
    payload["time_saving_vs_unskipped"] = _pct_saving(unskipped["median_seconds"], skipped["median_seconds"])
    payload["memory_saving_vs_unskipped"] = _pct_saving(unskipped["param_bytes"], skipped["param_bytes"])
    payload["metric_delta_vs_unskipped"] = skipped["metric"] - unskipped["metric"]
    if reference is not None:
        payload["time_saving"] = _pct_saving(reference["median_seconds"], skipped["median_seconds"])
        payload["memory_saving"] = _pct_saving(reference["param_bytes"], skipped["param_bytes"])
        payload["metric_delta"] = skipped["metric"] - reference["metric"]
    else:
        payload["time_saving"] = payload["memory_saving"] = payload["metric_delta"] = None
    payload["memory_note"] = "param_bytes = parameters + buffers resident after loading"
    if peak_memory and config.method != "qlora":
        sources = {"ada_deft_unskipped": (run_dir, None), "ada_deft_skipped": (run_dir, threshold)}
        if baseline_dir is not None:
            sources["ada_peft"] = (baseline_dir, threshold)
        with tempfile.TemporaryDirectory(prefix="deft-peak-") as tmp:
            batches_file = Path(tmp) / "batches.pt"
            torch.save([dict(b) for b in batches], batches_file)  # plain dicts: the child loads weights_only
            for name, (source, skip) in sources.items():
                export_run(source, Path(tmp) / name, skip)
                results[name]["peak_memory"] = peak_memory_of_export(Path(tmp) / name, batches_file)
                if progress:
                    print(f"peak memory {name}: {results[name]['peak_memory']['peak_bytes'] / 2**20:.1f} MiB", flush=True)
        peak = {n: results[n]["peak_memory"]["peak_bytes"] for n in sources}
        payload["peak_memory_saving_vs_unskipped"] = _pct_saving(peak["ada_deft_unskipped"], peak["ada_deft_skipped"])
        payload["peak_memory_saving"] = _pct_saving(peak["ada_peft"], peak["ada_deft_skipped"]) \
            if "ada_peft" in peak else None
        payload["memory_note"] += ("; peak_memory = a fresh process loading the exported model (`deft export`, "
                                   "skipped blocks never allocated) and running one pass over the same batches: "
                                   "peak resident set during the pass minus the resident set before loading "
                                   "(also resident_bytes after loading and load_peak_bytes while loading)")
    return payload

