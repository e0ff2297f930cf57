"""Training for deployment: what changes over the steps of a run besides the learning rate.

* **threshold in the loop** (FATReLU / ProSparse style) — the forward uses the thresholded
  activation (|a| ≤ τ_l → 0, :class:`InLoopThreshold`), the backward passes the gradient straight
  through the zeroed entries (or blocks it, ``ste=False``). τ_l is re-calibrated every
  ``every`` steps from that step's own activations (real tokens only) to a target density that
  ramps linearly from ``start`` to ``target`` over the first ``ramp`` share of the steps
  (:class:`ThresholdSchedule`). The final τ are saved with the run, so the trained run loads as a
  thresholded one — the deployed model is the one that trained.
  With ``form="neuron"`` the zeros are whole neurons instead of entries: each block keeps the
  neurons of largest root-mean-square over the step's real tokens, the others are 0 on every
  token (``rank="output"``: largest Σa² · ‖W_down[:, j]‖², what the neuron writes to the block's
  output, so a neuron with small activations but a large down column is not the first to go).
  The mask is re-chosen while the target ramps and fixed from the end of the ramp, so the
  rest of training adapts to the neurons the deployed model keeps; ``deft shrink`` then removes
  the others exactly — a smaller dense model at every batch size (encoders).
  With ``fill="mean"`` (plain MLPs) a removed neuron is not 0 but its mean over the step's real
  tokens, a constant that ``deft shrink`` folds into the down bias: the model starts from the
  best constant stand-in for each removed neuron instead of none, the neurons are ranked by what
  that stand-in loses (their variance), and the means keep being re-measured every ``every``
  steps after the masks are fixed, as the LoRA under them moves.
* **ε annealing** — the ℓ0-ε term's ε goes geometrically from ``eps`` to ``eps_final``
  (:class:`EpsilonSchedule`): a large ε pulls on every activation early, a small one pushes the
  last ones to zero.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..core.capture import ActivationCapture
from ..core.layers import dense_layer, is_conv1d, set_module, unwrap_model
from ..core.sites import SiteMap
from ..core.thresholds import (MagnitudeSampler, ThresholdedActivation, Thresholds, quantile_of_magnitudes,
                               threshold_path)


FORMS = ("token", "neuron")  # what the in-loop zeros are: entries |a| ≤ τ, or whole neurons
FILLS = ("zero", "mean")  # what a removed neuron outputs (neuron form): 0, or its mean over real tokens
RANKS = ("rms", "output")  # how the neuron form ranks neurons: σ's RMS, or what the neuron writes to the residual


@torch.no_grad()
def down_column_norms(model: nn.Module, site) -> torch.Tensor:
    """‖W_down[:, j]‖² per neuron j of ``site``'s block, LoRA's update on the down projection included:
    how strongly a unit of neuron j's activation reaches the block's output."""
    layer = unwrap_model(model).get_submodule(site.down)
    weight = dense_layer(layer).weight.detach().float()
    if hasattr(layer, "get_delta_weight"):  # peft LoRA: W + ΔW of the active adapters, in W's layout
        for name in getattr(layer, "active_adapters", []):
            if name in getattr(layer, "lora_A", {}):
                weight = weight + layer.get_delta_weight(name).float()
    out_in = weight.t() if is_conv1d(dense_layer(layer)) else weight
    return out_in.pow(2).sum(0).double().cpu()


class _StraightThrough(torch.autograd.Function):
    """Forward: ``a`` with the entries under ``keep`` = False set to 0; backward: identity."""

    @staticmethod
    def forward(ctx, a, keep):
        return a * keep

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class InLoopThreshold(ThresholdedActivation):
    """σ with |a| ≤ τ (and, given a neuron mask ``keep``, every neuron outside it) set to 0 in the
    forward; the gradient passes straight through the zeroed entries when ``ste`` (else it is
    blocked there, as a ReLU blocks it). τ = 0 and no mask: σ unchanged."""

    def __init__(self, inner: nn.Module, ste: bool = True, target: float | None = None):
        super().__init__(inner, 0.0, {"mode": "in-loop", "target_density": target, "point": "act"})
        self.ste = ste

    def forward(self, *args, **kwargs):
        a = self.inner(*args, **kwargs)
        if self.tau <= 0 and self.keep is None:
            return a
        keep = a.abs() > self.tau
        if self.keep is not None:
            self.keep = self.keep.to(a.device)
            keep = keep & self.keep
        keep = keep.to(a.dtype)
        out = _StraightThrough.apply(a, keep) if self.ste and self.training else a * keep
        return out if self.fill is None else out + self.fill.to(device=a.device, dtype=a.dtype)

    def extra_repr(self) -> str:
        kept = "" if self.keep is None else f", neurons={int(self.keep.sum())}/{self.keep.numel()}"
        return f"tau={self.tau:.6g}{kept}, ste={self.ste}"


class NeuronEnergy:
    """Per site and neuron: the sums of a and a² over real tokens, and the tokens counted; a meter
    fed by :class:`~deft.core.capture.ActivationCapture` (the neuron form's ranking and fill)."""

    def __init__(self, widths: list[int]):
        self.sums = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.squares = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.tokens = [0] * len(widths)

    @torch.no_grad()
    def update(self, index: int, act: torch.Tensor, mask: torch.Tensor) -> None:
        values = act[mask].double()
        self.sums[index] += values.sum(0).cpu()
        self.squares[index] += values.pow(2).sum(0).cpu()
        self.tokens[index] += values.shape[0]

    def end_sequences(self) -> None:
        pass

    def mean(self, index: int) -> torch.Tensor:
        return (self.sums[index] / max(1, self.tokens[index])).float()

    def top(self, index: int, density: float, fill: str = "zero", weight: torch.Tensor | None = None) -> torch.Tensor:
        """The bool mask keeping the ⌈density · width⌉ neurons that lose most when replaced by the
        fill (ties: lower index): largest Σa² (RMS) for a zero fill, largest Σ(a − mean)²
        (variance) for the mean; each times ``weight`` (per neuron) where given — with ‖W_down[:, j]‖²,
        the energy the neuron writes to the block's output."""
        score = self.squares[index]
        if fill == "mean":
            score = score - self.sums[index].pow(2) / max(1, self.tokens[index])
        if weight is not None:
            score = score * weight
        count = min(score.numel(), max(1, math.ceil(density * score.numel() - 1e-9)))
        keep = torch.zeros(score.numel(), dtype=torch.bool)
        keep[torch.sort(-score, stable=True).indices[:count]] = True
        return keep


def add_in_loop_thresholds(model: nn.Module, sites: SiteMap, ste: bool = True, target: float | None = None,
                           form: str = "token", fill: str = "zero") -> dict[str, InLoopThreshold]:
    """Wrap σ of every site (inside ADA's α, as deployed thresholds sit) in :class:`InLoopThreshold`."""
    if form not in FORMS:
        raise ValueError(f"unknown train-density form {form!r}; choose one of {FORMS}")
    if fill not in FILLS:
        raise ValueError(f"unknown neuron fill {fill!r}; choose one of {FILLS}")
    if fill != "zero" and form != "neuron":
        raise ValueError("--neuron-fill applies to --train-density-form neuron only")
    base = unwrap_model(model)
    out = {}
    for site in sites:
        if form == "neuron" and site.experts:
            raise ValueError(f"{site.module} holds routed experts: a neuron mask shared by every expert is not "
                             "a neuron removal; use --train-density-form token")
        if fill == "mean" and (site.mult is not None or site.fused):
            raise ValueError(f"{site.module} is a gated MLP: a removed gate neuron's mean still multiplies the up "
                             "projection, so it is no constant deft shrink could fold; use --neuron-fill zero")
        path = threshold_path(base, site.module)
        module = InLoopThreshold(base.get_submodule(path), ste, target)
        set_module(base, path, module)
        out[site.module] = module
    return out


def to_deployed(model: nn.Module, modules: dict[str, InLoopThreshold], target: float) -> Thresholds:
    """Replace the in-loop wrappers by plain thresholds with their final τ; returns them as data."""
    base = unwrap_model(model)
    neurons = {p: m.kept_neurons() for p, m in modules.items() if m.keep is not None}
    fill = {p: m.kept_fill() for p, m in modules.items() if m.fill is not None}
    thresholds = Thresholds(taus={p: m.tau for p, m in modules.items()}, mode="trained", target_density=target,
                            neurons=neurons or None, fill=fill or None)
    for site_path in modules:
        path = threshold_path(base, site_path)
        wrapper = base.get_submodule(path)
        if isinstance(wrapper, InLoopThreshold):
            set_module(base, path, ThresholdedActivation(wrapper.inner, wrapper.tau, thresholds.summary(),
                                                         wrapper.keep, wrapper.fill))
    return thresholds


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def threshold_schedule(model: nn.Module, sites: SiteMap, modules: dict[str, InLoopThreshold], *, target: float,
                       start: float = 1.0, ramp: float = 0.5, every: int = 10, total_steps: int = 1,
                       form: str = "token", fill: str = "zero", rank: str = "rms", window: int = 1):
    """A ``TrainerCallback`` re-calibrating the in-loop thresholds (module doc)."""
    if rank not in RANKS:
        raise ValueError(f"unknown neuron rank {rank!r}; choose one of {RANKS}")
    if window < 1:
        raise ValueError(f"the neuron ranking's window is >= 1 step, got {window}")
    inner_sites = [replace(s, module=f"{threshold_path(unwrap_model(model), s.module)}.inner") for s in sites]
    ramp_steps = max(1, int(ramp * total_steps))

    class ThresholdSchedule(_callback_base()):
        def __init__(self):
            self.capture: ActivationCapture | None = None
            self.meter: MagnitudeSampler | NeuronEnergy | None = None
            self.seen = False
            self.seen_once = False  # the first step re-chooses at once (a resumed run has no masks)
            self.begin_step = 0

        def density_at(self, step: int) -> float:
            return target + (start - target) * max(0.0, 1 - step / ramp_steps)

        def due(self, step: int) -> bool:
            if not self.seen:  # the first step of this process (a resumed run's τ / masks are not checkpointed)
                return True
            if form == "neuron":  # masks move while the target ramps, then stay: the model adapts to them
                ramping = step <= ramp_steps and (step % every == 0 or step == ramp_steps)
                return ramping or (fill == "mean" and step % every == 0)  # means keep being re-measured
            return step % every == 0

        def measuring(self, step: int) -> bool:
            """Whether this step's activations count toward a re-calibration: the one at its end, or
            (neuron form, ``window`` > 1) one of the next ``window`` − 1 steps' ends."""
            return any(self.due(s) for s in range(step, step + (window if form == "neuron" else 1)))

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin_step = state.global_step  # the Trainer counts the step done before on_step_end
            if self.capture is None and self.measuring(state.global_step):
                # σ's own output (inside the threshold), on real tokens of this step's batches
                self.meter = MagnitudeSampler(len(inner_sites)) if form == "token" else \
                    NeuronEnergy([s.width for s in sites])
                self.capture = ActivationCapture(model, SiteMap(tuple(inner_sites), sites.family, sites.model_type,
                                                                "act"), meter=self.meter).attach()
            self.seen = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.capture is None:
                return
            if window > 1 and form == "neuron" and not self.due(self.begin_step) and self.seen_once:
                return  # still measuring: the masks are re-chosen at the window's last step
            self.seen_once = True
            self.capture.detach()
            density = self.density_at(state.global_step)
            if form == "neuron":
                for index, site in enumerate(sites):
                    module = modules[site.module]
                    if self.begin_step <= ramp_steps or module.keep is None and density < 1:
                        weight = down_column_norms(model, site) if rank == "output" and density < 1 else None
                        module.keep = self.meter.top(index, density, fill, weight) if density < 1 else None
                    module.fill = None if fill == "zero" or module.keep is None else \
                        self.meter.mean(index).masked_fill(module.keep, 0)
            else:
                for site, values in zip(sites, self.meter.result(seed=state.global_step)):
                    modules[site.module].tau = quantile_of_magnitudes(values, 1 - density) if density < 1 else 0.0
            self.capture = self.meter = None

    return ThresholdSchedule()


def epsilon_schedule(capture: ActivationCapture, density, total_steps: int):
    """A ``TrainerCallback`` annealing the ℓ0 ε of ``capture``'s approximation over the steps."""

    class EpsilonSchedule(_callback_base()):
        def on_step_begin(self, args, state, control, **kwargs):
            capture.approx = density.build_approx(eps=density.eps_at(state.global_step / max(1, total_steps)))

    return EpsilonSchedule()
