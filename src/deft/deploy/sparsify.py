"""Calibrating activation thresholds for a trained run (``deft sparsify``): the deployed model's
exact zeros, chosen offline from the run's own training data, TEAL / CATS style.

Calibration runs the model over ``calibration_samples`` training examples of the run's task and
keeps the magnitudes |a| of every MLP activation on real tokens. Then:

* ``uniform`` — every layer at the target density d: τ_l is the (1 − d) quantile of |a_l|;
* ``global`` — one τ for all layers, chosen so that the mean layer density is d (layers whose
  activations are small end sparser, others denser);
* ``greedy`` — per-layer densities with mean d, allocated where the block output error grows
  least (TEAL's block-wise greedy idea, :mod:`deft.deploy.greedy`);
* ``tau`` — one τ given by hand.

The magnitudes are of σ's output; on an ADA-DEFT run, whose sites output α·σ, they are divided
by |α| so that τ is in σ's units. Calibration data: the run's task's training split (GLUE
sentences; SQuAD training windows, for the generative form prompt and answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..adaptive import adaptive_weights
from ..core.batches import call_model, model_device, move_batch
from ..core.capture import ActivationCapture
from ..core.sites import find_sites
from ..core.thresholds import (MagnitudeSampler, Thresholds, apply_thresholds, current_thresholds,
                               quantile_of_magnitudes, remove_thresholds)
from ..training import RunDir, TrainConfig, load_run, task_runner
from .greedy import RowSampler, greedy_taus

DEFAULT_CALIBRATION_SAMPLES = 256
MODES = ("uniform", "global", "greedy")


def check_request(density: float | None, tau: float | None, mode: str, calibration_samples: int,
                  point: str = "act") -> None:
    """One-line errors for what ``deft sparsify`` cannot do, before anything is loaded."""
    if point not in ("act", "product"):
        raise ValueError(f"unknown --point {point!r}; choose act or product")
    if (density is None) == (tau is None):
        raise ValueError("give --density D (a target) or --tau T (one threshold), not both")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"--density is a share of active entries in (0, 1], got {density}")
    if tau is not None and not tau >= 0:
        raise ValueError(f"--tau must be >= 0, got {tau}")
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    if calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {calibration_samples}")


def neuron_masks(model: nn.Module) -> Thresholds | None:
    """The neuron masks (and fills) ``model``'s thresholds carry (a ``--train-density-form neuron``
    run) as thresholds of τ 0, if any (:meth:`Thresholds.masks_only`)."""
    current = current_thresholds(model)
    return current.masks_only() if current is not None else None


def reset_thresholds(model: nn.Module, masks: Thresholds | None) -> nn.Module:
    """``model`` without thresholds, but with its neuron masks: those neurons are gone from the
    model the run trained, so calibrating afresh starts from them (τ = 0 elsewhere)."""
    remove_thresholds(model)
    if masks is not None:
        apply_thresholds(model, masks)
    return model


class Calibration:
    """What one calibration pass measured: site paths, |a| per site (in σ's units), real tokens,
    and — when asked for — rows of A and of the down projection's input per site (greedy mode)."""

    def __init__(self, paths, magnitudes, tokens, sites=None, acts=None, inputs=None):
        self.paths, self.magnitudes, self.tokens = paths, magnitudes, tokens
        self.sites, self.acts, self.inputs = sites, acts, inputs


@torch.no_grad()
def calibrate(model: nn.Module, tokenizer, config: TrainConfig, *, samples: int = DEFAULT_CALIBRATION_SAMPLES,
              batch_size: int = 32, data_dir: str | None = None, rows: bool = False, point: str = "act") -> Calibration:
    """One pass over ``samples`` training examples of the run's task, measuring the model as given
    (remove thresholds first to calibrate afresh). ``rows``: also keep block rows for greedy."""
    runner = task_runner(config)
    sites = find_sites(model, point)  # product: the down projections' inputs, in the model's own units
    handle = adaptive_weights(model)
    alphas = handle.alphas() if handle is not None and point == "act" else {}
    scale = [max(abs(alphas.get(s.module, 1.0)), 1e-12) for s in sites]
    sampler = MagnitudeSampler(len(sites), scale)
    captures = [ActivationCapture(model, sites, meter=sampler)]
    if rows:
        products = {(s.stack, s.layer): s for s in find_sites(model, "product")}
        missing = [s.module for s in sites if (s.stack, s.layer) not in products]
        if missing:
            raise ValueError(f"greedy allocation needs each block's down projection; none found for {missing[:3]}")
        product_sites = type(sites)(tuple(products[(s.stack, s.layer)] for s in sites), sites.family,
                                    sites.model_type, "product")
        act_rows, input_rows = RowSampler(len(sites)), RowSampler(len(sites))
        captures += [ActivationCapture(model, product_sites if point == "product" else sites, meter=act_rows),
                     ActivationCapture(model, product_sites, meter=input_rows)]
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for capture in captures:
            capture.attach()
        for batch in runner.calibration_batches(tokenizer, model, samples=samples, batch_size=batch_size,
                                                data_dir=data_dir):
            call_model(model, move_batch(batch, device))
    finally:
        for capture in captures:
            capture.detach()
        model.train(was_training)
    result = Calibration([s.module for s in sites], sampler.result(config.seed), sampler.tokens, sites)
    if rows:
        result.acts = [a / k for a, k in zip(act_rows.result(), scale)]
        result.inputs = input_rows.result()
    return result


def collect_magnitudes(model: nn.Module, tokenizer, config: TrainConfig, *, samples: int = DEFAULT_CALIBRATION_SAMPLES,
                       batch_size: int = 32, data_dir: str | None = None) -> tuple[list[str], list[torch.Tensor], int]:
    """(site paths, |a| per site, real tokens) over ``samples`` training examples of the run's task."""
    c = calibrate(model, tokenizer, config, samples=samples, batch_size=batch_size, data_dir=data_dir)
    return c.paths, c.magnitudes, c.tokens


def density_at(values: torch.Tensor, tau: float) -> float:
    """Share of ``values`` with magnitude above ``tau`` (what survives the threshold)."""
    return float((values > tau).float().mean()) if values.numel() else 0.0


def global_tau(values: Sequence[torch.Tensor], density: float, iterations: int = 60) -> float:
    """The one τ at which the mean layer density is ``density`` (bisection: density falls with τ)."""
    low, high = 0.0, max(float(v.max()) for v in values if v.numel())
    sorted_values = [v.sort().values for v in values]

    def mean_density(tau: float) -> float:
        return sum(1 - int(torch.searchsorted(v, torch.tensor(tau), right=True)) / v.numel()
                   for v in sorted_values) / len(sorted_values)

    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_density(mid) > density else (low, mid)
    return high


def choose_thresholds(paths: Sequence[str], values: Sequence[torch.Tensor], *, density: float | None = None,
                      tau: float | None = None, mode: str = "uniform", tokens: int = 0, samples: int = 0,
                      model: nn.Module | None = None, calibration: Calibration | None = None,
                      point: str = "act", masks: Thresholds | None = None) -> Thresholds:
    """Thresholds for these sites from their calibration magnitudes (module doc); ``greedy`` also
    needs the model and a calibration with rows. ``masks``: a neuron-form run's masks and fills
    (:func:`neuron_masks`), carried into the result."""
    if tau is not None:
        taus, mode = {p: float(tau) for p in paths}, "tau"
    elif mode == "uniform":
        taus = {p: quantile_of_magnitudes(v, 1 - density) for p, v in zip(paths, values)}
    elif mode == "greedy":
        if model is None or calibration is None or calibration.acts is None:
            raise ValueError("greedy thresholds need the model and a calibration with rows (calibrate(rows=True))")
        chosen, _ = greedy_taus(model, calibration.sites, values, calibration.acts, calibration.inputs, density)
        taus = dict(zip(paths, chosen))
    else:
        one = global_tau(values, density)
        taus = {p: one for p in paths}
    calibrated = {p: density_at(v, taus[p]) for p, v in zip(paths, values)}
    return Thresholds(taus=taus, mode=mode, target_density=density, point=point,
                      neurons=masks.neurons if masks else None, fill=masks.fill if masks else None, calibration={
        "samples": samples, "tokens": tokens, "per_layer_density": calibrated,
        "density": sum(calibrated.values()) / len(calibrated) if calibrated else None})


def evaluation_summary(runner, model, tokenizer, **options) -> dict:
    """Main metric and densities of one evaluation of ``model`` by the task's runner."""
    return runner.evaluate_model(model, tokenizer, **options).summary(runner.task.main_metric)


def sparsify_run(run: str, output: str, *, density: float | None = None, tau: float | None = None,
                 mode: str = "uniform", calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES, force: bool = False,
                 max_samples: int | None = None, batch_size: int | None = None, data_dir: str | None = None,
                 progress: bool = True, point: str = "act") -> dict:
    """``deft sparsify``: calibrate thresholds for ``run``, evaluate before and after, and write
    the thresholded run to ``output`` (every part of ``run`` plus ``thresholds.json``). ``point``:
    ``act`` (σ's output; for gated MLPs the gate) or ``product`` (the gated product, the down
    projection's input); density after is measured at that point."""
    check_request(density, tau, mode, calibration_samples, point)
    source = RunDir(run).check()
    if (source / RunDir.THRESHOLDS).is_file() and not force:
        raise ValueError(f"{run} already has thresholds ({RunDir.THRESHOLDS}); --force calibrates them afresh")
    out = RunDir(output)
    if out.path.resolve() == source.path.resolve():
        raise ValueError(f"--output {output} is the source run itself: choose a new directory")
    config, model, tokenizer = load_run(source)
    runner = task_runner(config)
    options = dict(max_samples=max_samples, batch_size=batch_size, data_dir=data_dir, progress=progress)
    before = evaluation_summary(runner, model, tokenizer, **options)
    masks = neuron_masks(model)
    reset_thresholds(model, masks)
    calibration = calibrate(model, tokenizer, config, samples=calibration_samples, data_dir=data_dir,
                            rows=mode == "greedy" and tau is None, point=point)
    thresholds = choose_thresholds(calibration.paths, calibration.magnitudes, density=density, tau=tau, mode=mode,
                                   tokens=calibration.tokens, samples=calibration_samples, model=model,
                                   calibration=calibration, point=point, masks=masks)
    apply_thresholds(model, thresholds)
    after = evaluation_summary(task_runner(replace(config, site_point=point)), model, tokenizer, **options)
    source.derive(output)
    thresholds.save(out.path)
    payload = {"source_run": str(run), "task": config.task, "main_metric": runner.task.main_metric,
               "thresholds": {**thresholds.summary(), "calibration": thresholds.calibration, "taus": thresholds.taus},
               "before": before, "after": after}
    out.write_json("sparsify.json", payload)
    return payload
