"""Removing the MLP blocks ADA-DEFT switched off, exactly.

With α_l = 0 the input of the down projection is exactly zero, so the block's output is the
constant ``down(0)`` (the bias, plus whatever an adapter on the down projection adds to it; zero
for bias-free T5). :func:`skip_sites` replaces ``first`` and ``mult`` by
:class:`~deft.adaptive.modules.ZeroProjection` (an expanded zero view: no weights, no
allocation), the activation by :class:`~deft.adaptive.modules.SkippedActivation` (passes the
zeros through) and ``down`` by :class:`~deft.adaptive.modules.ConstantProjection` (``down(0)``
broadcast). The residual path is untouched, the replaced modules lose their last reference and
their weights are freed. The skipped model is *exactly* the unskipped model with that block's
α = 0 (tests check every family).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..core.layers import float_dtype, module_device, set_module, unwrap_model
from ..core.sites import ActivationSite, SiteMap, UnsupportedModelError, find_sites, require_dense
from .alphas import AdaptiveError, adaptive_weights, sites_at_act
from .modules import ConstantProjection, ScaledActivation, SkippedActivation, ZeroProjection

#: Default skip threshold on |α|. Chosen from the measured metric-vs-threshold curves of
#: ``benchmarks/ada_bench.py`` (README, "ADA-DEFT"): blocks the density loss switches off
#: end with |α| of the order of the optimizer's step (≲ 1e-2), blocks that matter stay
#: ≳ 0.1, and the metric is flat up to this value.
DEFAULT_SKIP_THRESHOLD = 0.05


def skipped_sites(model: nn.Module) -> list[ActivationSite]:
    """Sites whose block has been removed (by :func:`skip_sites`, or in a loaded export), read
    from the model's structure; ``activation`` names the removed activation."""
    base = unwrap_model(model)
    try:
        sites = find_sites(model, "act").sites
    except ValueError:
        return []
    out = []
    for site in sites:
        module = base.get_submodule(site.module)
        if isinstance(module, SkippedActivation):
            out.append(replace(site, activation=type(module.inner).__name__))
    return out


def skip_sites(model: nn.Module, sites: Sequence[ActivationSite]) -> list[ActivationSite]:
    """Remove these MLP blocks (σ-output sites): exactly the model with their α = 0 (module doc).

    Works on any model whose sites know ``first`` and ``down`` (every family rule; the
    generic fallback when it found a down projection), with or without α.
    """
    base = unwrap_model(model)
    handle = adaptive_weights(model)
    alphas = handle.alphas() if handle else {}
    done = []
    for site in sites:
        if site.point != "act":
            raise AdaptiveError(f"skip_sites takes sites at σ's output (point 'act'), got {site.point!r}")
        try:
            require_dense(site, "skipping a block")
        except UnsupportedModelError as err:
            raise AdaptiveError(str(err)) from None
        act = base.get_submodule(site.module)
        if isinstance(act, SkippedActivation):
            continue
        first, down = base.get_submodule(site.first), base.get_submodule(site.down)
        mult = base.get_submodule(site.mult) if site.mult else None
        dtype, device = float_dtype(down, first), module_device(down, first)
        # The block's output when the down projection's input is zero: bias (+ adapter) or 0.
        was_training = down.training
        down.eval()
        with torch.no_grad():
            constant = down(torch.zeros(1, site.width, dtype=dtype, device=device)).reshape(-1)
        down.train(was_training)
        set_module(base, site.first, ZeroProjection(0, site.first_width, dtype, device))  # both halves if fused
        if site.mult and site.mult != site.first:
            set_module(base, site.mult, ZeroProjection(0, site.width, dtype, device))
        scaled = isinstance(act, ScaledActivation)
        inner = act.inner if scaled else act
        set_module(base, site.module, SkippedActivation(
            inner, alpha=alphas.get(site.module, 0.0) if handle is not None else None,
            initial=act.initial if scaled else None))
        set_module(base, site.down, ConstantProjection(constant, site.width))
        del first, down, mult, act, inner  # the last references: their weights are freed here
        done.append(site)
    return done


def skip_blocks(model: nn.Module, sites: SiteMap | Sequence[ActivationSite] | None = None,
                threshold: float = DEFAULT_SKIP_THRESHOLD) -> list[ActivationSite]:
    """Remove every MLP block whose |α| < ``threshold``; returns the removed sites."""
    if threshold is None or not threshold >= 0:
        raise AdaptiveError(f"skip threshold must be a number >= 0, got {threshold}")
    handle = adaptive_weights(model)
    if handle is None:
        raise AdaptiveError("this model has no ADA weights α, so no block can be chosen for skipping: "
                            "train with --ada (ADA-PEFT / ADA-DEFT) first")
    wanted = {s.module for s in sites_at_act(model, sites)}
    return skip_sites(model, [s for s in handle.below(threshold) if s.module in wanted])


@dataclass(frozen=True)
class ThresholdPoint:
    """The metric with every block of |α| < ``threshold`` switched off."""

    threshold: float
    blocks_skipped: int
    skipped: tuple[str, ...]
    mlp_params_removed: int
    metric: float


def _block_params(model: nn.Module, site: ActivationSite) -> int:
    base = unwrap_model(model)
    total = 0
    for path in site.parts:  # a fused gate/up layer once
        total += sum(p.numel() for p in base.get_submodule(path).parameters())
    return total


def threshold_curve(model: nn.Module, evaluate: Callable[[], float], thresholds: Sequence[float]) -> list[ThresholdPoint]:
    """Metric vs skip threshold: for each threshold, the blocks under it are switched off by
    forcing their α to 0 (exactly what skipping computes, without destroying the model) and
    ``evaluate()`` is called. The model is left as it was."""
    handle = adaptive_weights(model)
    if handle is None:
        raise AdaptiveError("threshold_curve needs a model with ADA weights (apply_adaptive / a --ada run)")
    points = []
    for threshold in sorted(thresholds):
        below = handle.below(threshold)
        with handle.forced({s.module: 0.0 for s in below}):
            metric = float(evaluate())
        points.append(ThresholdPoint(float(threshold), len(below), tuple(s.module for s in below),
                                     sum(_block_params(model, s) for s in below), metric))
    return points


def pick_threshold(curve: Sequence[ThresholdPoint], max_drop: float) -> ThresholdPoint:
    """The point that skips the most blocks with its metric within ``max_drop`` of the no-skip
    metric (the curve's first point should be threshold 0); among points skipping the same
    blocks, the smallest threshold (the margin below the next block's |α| is largest)."""
    reference = curve[0].metric
    ok = [p for p in curve if p.metric >= reference - max_drop]
    return max(ok, key=lambda p: (p.blocks_skipped, -p.threshold)) if ok else curve[0]
