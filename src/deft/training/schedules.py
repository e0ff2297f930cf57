"""Training for deployment: what changes over the steps of a run besides the learning rate.

* **threshold in the loop** (FATReLU / ProSparse style) — the forward uses the thresholded
  activation (|a| ≤ τ_l → 0, :class:`InLoopThreshold`), the backward passes the gradient straight
  through the zeroed entries (or blocks it, ``ste=False``). τ_l is re-calibrated every
  ``every`` steps from that step's own activations (real tokens only) to a target density that
  ramps linearly from ``start`` to ``target`` over the first ``ramp`` share of the steps
  (:class:`ThresholdSchedule`). The final τ are saved with the run, so the trained run loads as a
  thresholded one — the deployed model is the one that trained.
* **ε annealing** — the ℓ0-ε term's ε goes geometrically from ``eps`` to ``eps_final``
  (:class:`EpsilonSchedule`): a large ε pulls on every activation early, a small one pushes the
  last ones to zero.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..core.capture import ActivationCapture
from ..core.layers import set_module, unwrap_model
from ..core.sites import SiteMap
from ..core.thresholds import (MagnitudeSampler, ThresholdedActivation, Thresholds, quantile_of_magnitudes,
                               threshold_path)


class _StraightThrough(torch.autograd.Function):
    """Forward: ``a`` with the entries under ``keep`` = False set to 0; backward: identity."""

    @staticmethod
    def forward(ctx, a, keep):
        return a * keep

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class InLoopThreshold(ThresholdedActivation):
    """σ with |a| ≤ τ set to 0 in the forward; the gradient passes straight through the zeroed
    entries when ``ste`` (else it is blocked there, as a ReLU blocks it). τ = 0: σ unchanged."""

    def __init__(self, inner: nn.Module, ste: bool = True, target: float | None = None):
        super().__init__(inner, 0.0, {"mode": "in-loop", "target_density": target, "point": "act"})
        self.ste = ste

    def forward(self, *args, **kwargs):
        a = self.inner(*args, **kwargs)
        if self.tau <= 0:
            return a
        keep = (a.abs() > self.tau).to(a.dtype)
        return _StraightThrough.apply(a, keep) if self.ste and self.training else a * keep

    def extra_repr(self) -> str:
        return f"tau={self.tau:.6g}, ste={self.ste}"


def add_in_loop_thresholds(model: nn.Module, sites: SiteMap, ste: bool = True,
                           target: float | None = None) -> dict[str, InLoopThreshold]:
    """Wrap σ of every site (inside ADA's α, as deployed thresholds sit) in :class:`InLoopThreshold`."""
    base = unwrap_model(model)
    out = {}
    for site in sites:
        path = threshold_path(base, site.module)
        module = InLoopThreshold(base.get_submodule(path), ste, target)
        set_module(base, path, module)
        out[site.module] = module
    return out


def to_deployed(model: nn.Module, modules: dict[str, InLoopThreshold], target: float) -> Thresholds:
    """Replace the in-loop wrappers by plain thresholds with their final τ; returns them as data."""
    base = unwrap_model(model)
    thresholds = Thresholds(taus={p: m.tau for p, m in modules.items()}, mode="trained", target_density=target)
    for site_path in modules:
        path = threshold_path(base, site_path)
        wrapper = base.get_submodule(path)
        if isinstance(wrapper, InLoopThreshold):
            set_module(base, path, ThresholdedActivation(wrapper.inner, wrapper.tau, thresholds.summary()))
    return thresholds


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def threshold_schedule(model: nn.Module, sites: SiteMap, modules: dict[str, InLoopThreshold], *, target: float,
                       start: float = 1.0, ramp: float = 0.5, every: int = 10, total_steps: int = 1):
    """A ``TrainerCallback`` re-calibrating the in-loop thresholds (module doc)."""
    inner_sites = [replace(s, module=f"{threshold_path(unwrap_model(model), s.module)}.inner") for s in sites]

    class ThresholdSchedule(_callback_base()):
        def __init__(self):
            self.capture: ActivationCapture | None = None
            self.sampler: MagnitudeSampler | None = None

        def density_at(self, step: int) -> float:
            ramp_steps = max(1, int(ramp * total_steps))
            return target + (start - target) * max(0.0, 1 - step / ramp_steps)

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                # σ's own output (inside the threshold), on real tokens of this step's batches
                self.sampler = MagnitudeSampler(len(inner_sites))
                self.capture = ActivationCapture(model, SiteMap(tuple(inner_sites), sites.family, sites.model_type,
                                                                "act"), meter=self.sampler).attach()

        def on_step_end(self, args, state, control, **kwargs):
            if self.capture is None:
                return
            self.capture.detach()
            density = self.density_at(state.global_step)
            for site, values in zip(sites, self.sampler.result(seed=state.global_step)):
                modules[site.module].tau = quantile_of_magnitudes(values, 1 - density) if density < 1 else 0.0
            self.capture = self.sampler = None

    return ThresholdSchedule()


def epsilon_schedule(capture: ActivationCapture, density, total_steps: int):
    """A ``TrainerCallback`` annealing the ℓ0 ε of ``capture``'s approximation over the steps."""

    class EpsilonSchedule(_callback_base()):
        def on_step_begin(self, args, state, control, **kwargs):
            capture.approx = density.build_approx(eps=density.eps_at(state.global_step / max(1, total_steps)))

    return EpsilonSchedule()
