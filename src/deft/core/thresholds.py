"""Activation thresholds as part of a model: |a| ≤ τ_l becomes exactly 0 (TEAL / CATS).

A threshold sits on σ's output of each MLP block (for gated MLPs the gate σ(X W_g), CATS'
choice): :class:`ThresholdedActivation` wraps the activation module, so every consumer — the
down projection, the capture hooks, a sparse kernel — sees the exact zeros. With ADA-DEFT's α on
the block, the threshold wraps σ inside α (τ in σ's units; α·0 = 0).

The thresholds of a run are data (:class:`Thresholds`, saved as ``thresholds.json`` in the run
directory): they are calibrated offline (:mod:`deft.deploy.sparsify`) and re-applied whenever
the run is loaded, so evaluation, density, energy, pruning and export all see the deployed model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .layers import ActivationWrapper, set_module, unwrap_model
from .sites import SITE_POINTS, find_sites

THRESHOLDS_FILE = "thresholds.json"
MODES = ("uniform", "global", "greedy", "tau", "trained")
#: Magnitudes kept per layer (a random subset beyond this): quantiles from 2M samples are exact
#: to well under a density point, and memory stays bounded on wide models.
MAX_VALUES_PER_SITE = 2_000_000


class ThresholdedActivation(ActivationWrapper):
    """``inner(x)`` with every entry of magnitude ≤ ``tau`` set to exactly 0, and — given ``keep``
    (a bool vector over the block's neurons) — every entry of a neuron outside ``keep`` too; given
    ``fill`` (a vector over the neurons, used outside ``keep`` only), a neuron outside ``keep``
    is that constant on every token instead of 0 (``--neuron-fill mean``: a constant neuron folds
    into the down bias when ``deft shrink`` removes it)."""

    def __init__(self, inner: nn.Module, tau: float, summary: dict | None = None, keep: torch.Tensor | None = None,
                 fill: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.tau = float(tau)
        self.summary = summary  # how τ was chosen (Thresholds.summary()), for density reports
        # Plain attributes, not buffers: state dicts (merges, exports) stay those of the model.
        self.keep = None if keep is None else torch.as_tensor(keep, dtype=torch.bool)
        if fill is not None and self.keep is None:
            raise ValueError("a neuron fill needs a neuron mask (keep)")
        self.fill = None if fill is None else torch.as_tensor(fill, dtype=torch.float32).masked_fill(self.keep, 0)

    def forward(self, *args, **kwargs):
        a = self.inner(*args, **kwargs)
        if self.tau <= 0 and self.keep is None:
            return a  # τ = 0 zeroes only what is 0 already: a shrunk neuron-form run pays no mask
        drop = a.abs() <= self.tau
        if self.keep is not None:
            self.keep = self.keep.to(a.device)
            drop = drop | ~self.keep
        out = a.masked_fill(drop, 0)
        return out if self.fill is None else out + self.fill.to(device=a.device, dtype=a.dtype)

    def kept_fill(self) -> list[float] | None:
        return None if self.fill is None else self.fill.tolist()

    def kept_neurons(self) -> list[int] | None:
        return None if self.keep is None else self.keep.nonzero().reshape(-1).tolist()

    def extra_repr(self) -> str:
        kept = "" if self.keep is None else f", neurons={int(self.keep.sum())}/{self.keep.numel()}"
        return f"tau={self.tau:.6g}{kept}"


@dataclass
class Thresholds:
    """Per-site thresholds of a model (site path → τ) and how they were chosen.

    ``mode``: ``uniform`` (every layer at ``target_density``: τ_l the (1 − d) quantile of |a_l|),
    ``global`` (one τ for all layers, chosen so the mean layer density is ``target_density``) or
    ``tau`` (one τ given by hand) or ``trained`` (the in-loop thresholds a run trained with).
    ``calibration``: what the calibration measured (samples,
    tokens, the density each layer had at its τ). ``neurons`` (site path → kept neuron indices,
    ``--train-density-form neuron``): every other neuron of that block is 0 on every token — or,
    with ``fill`` (site path → one value per neuron of the block, ``--neuron-fill mean``), that
    constant.
    """

    taus: dict[str, float]
    mode: str
    target_density: float | None = None
    point: str = "act"
    calibration: dict = field(default_factory=dict)
    neurons: dict[str, list[int]] | None = None
    fill: dict[str, list[float]] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown threshold mode {self.mode!r}; choose one of {MODES}")
        if self.point not in SITE_POINTS:
            raise ValueError(f"unknown threshold point {self.point!r}; choose one of {SITE_POINTS}")
        bad = {k: v for k, v in self.taus.items() if not v >= 0}
        if bad:
            raise ValueError(f"thresholds must be >= 0, got {bad}")
        if self.neurons is not None:
            if self.point != "act":
                raise ValueError("neuron masks sit on σ's output (point 'act'), not on the gated product")
            if set(self.neurons) - set(self.taus):
                raise ValueError("neuron masks for sites without a threshold: give each masked site a τ (0 for none)")
            self.neurons = {p: sorted(int(i) for i in v) for p, v in self.neurons.items()}
        if self.fill is not None:
            if set(self.fill) - set(self.neurons or {}):
                raise ValueError("a neuron fill for sites without a neuron mask: fill applies to removed neurons only")
            self.fill = {p: [float(x) for x in v] for p, v in self.fill.items()}

    def masks_only(self) -> "Thresholds | None":
        """The neuron masks (and fills) alone, τ 0 everywhere: what stays of a neuron-form run when
        its thresholds are calibrated afresh (its removed neurons stay removed). None without masks."""
        if not self.neurons:
            return None
        return Thresholds(taus={p: 0.0 for p in self.neurons}, mode="trained", neurons=self.neurons,
                          fill=self.fill)

    def summary(self) -> dict:
        """What a density report says about the thresholds it was measured under."""
        return {"mode": self.mode, "target_density": self.target_density, "point": self.point}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / THRESHOLDS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Thresholds | None":
        path = Path(directory) / THRESHOLDS_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def threshold_path(base: nn.Module, path: str) -> str:
    """Where a threshold goes for the site at ``path``: on σ's output, inside wrappers that only
    scale it (ADA's α); around anything else (a ReLU-fied σ, a skipped block)."""
    module = base.get_submodule(path)
    while isinstance(module, ActivationWrapper) and module.scales_inner:
        path, module = f"{path}.inner", module.inner
    return path


class InputThreshold:
    """A down projection's input (the gated product, ``point="product"``) with every entry of
    magnitude ≤ ``tau`` set to exactly 0: a forward pre-hook registered first, so the layer and
    every capture hook after it see the zeros. Kept on the layer as ``_deft_input_threshold``
    (a hook, not a module: the layer, its LoRA and its weights stay where everything expects them)."""

    ATTR = "_deft_input_threshold"

    def __init__(self, module: nn.Module, tau: float, summary: dict | None = None):
        self.tau = float(tau)
        self.summary = summary
        self.hook_id = module.register_forward_pre_hook(self, prepend=True).id
        setattr(module, self.ATTR, self)

    def __call__(self, module, args):
        if not args:
            return None
        x = args[0]
        return (x.masked_fill(x.abs() <= self.tau, 0), *args[1:])

    def detach(self, module: nn.Module) -> None:
        module._forward_pre_hooks.pop(self.hook_id, None)
        delattr(module, self.ATTR)


def thresholded_modules(model: nn.Module) -> dict[str, ThresholdedActivation | InputThreshold]:
    """Site path → its threshold (``.tau``, ``.summary``), for the sites of ``model`` that have one:
    the activation's path for σ-output thresholds, the down projection's for product ones."""
    base = unwrap_model(model)
    found = {name: t for name, m in base.named_modules() if (t := getattr(m, InputThreshold.ATTR, None)) is not None}
    for site in find_sites(model, "act"):
        module = base.get_submodule(threshold_path(base, site.module))
        if isinstance(module, ThresholdedActivation):
            found[site.module] = module
    return found


def apply_thresholds(model: nn.Module, thresholds: Thresholds) -> nn.Module:
    """Put ``thresholds`` into ``model`` (in place; replaces thresholds already there)."""
    base = unwrap_model(model)
    sites = {s.module: s for s in find_sites(model, thresholds.point)}
    unknown = sorted(set(thresholds.taus) - set(sites))
    if unknown:
        raise ValueError(f"thresholds for {unknown[:3]} do not fit this model (its sites: {sorted(sites)[:3]} ...)")
    remove_thresholds(model)
    for path, tau in thresholds.taus.items():
        if thresholds.point == "product":
            InputThreshold(base.get_submodule(path), tau, thresholds.summary())
            continue
        inner_path = threshold_path(base, path)
        keep = fill = None
        if thresholds.neurons is not None and path in thresholds.neurons:
            keep = torch.zeros(sites[path].width, dtype=torch.bool)
            keep[torch.as_tensor(thresholds.neurons[path], dtype=torch.long)] = True
        if thresholds.fill is not None and path in thresholds.fill:
            fill = torch.tensor(thresholds.fill[path], dtype=torch.float32)
            if fill.numel() != sites[path].width:
                raise ValueError(f"the neuron fill of {path} has {fill.numel()} values for {sites[path].width} neurons")
        set_module(base, inner_path, ThresholdedActivation(base.get_submodule(inner_path), tau, thresholds.summary(),
                                                           keep, fill))
    return model


def remove_thresholds(model: nn.Module) -> nn.Module:
    """The model without thresholds (in place)."""
    base = unwrap_model(model)
    for path, threshold in thresholded_modules(model).items():
        if isinstance(threshold, InputThreshold):
            threshold.detach(base.get_submodule(path))
            continue
        inner_path = threshold_path(base, path)
        set_module(base, inner_path, base.get_submodule(inner_path).inner)
    return model


def current_thresholds(model: nn.Module) -> Thresholds | None:
    """The thresholds ``model`` runs with, as data (None: none)."""
    modules = thresholded_modules(model)
    if not modules:
        return None
    summary = next(iter(modules.values())).summary or {}
    neurons = {p: kept for p, m in modules.items()
               if isinstance(m, ThresholdedActivation) and (kept := m.kept_neurons()) is not None}
    fill = {p: values for p, m in modules.items()
            if isinstance(m, ThresholdedActivation) and (values := m.kept_fill()) is not None}
    return Thresholds(taus={p: m.tau for p, m in modules.items()}, mode=summary.get("mode") or "tau",
                      target_density=summary.get("target_density"), point=summary.get("point") or "act",
                      neurons=neurons or None, fill=fill or None)


def applied_thresholds(model: nn.Module) -> dict | None:
    """The summary of the thresholds ``model`` runs with (None: none) — for density reports."""
    modules = thresholded_modules(model)
    if not modules:
        return None
    return next(iter(modules.values())).summary or {"mode": "unknown", "target_density": None, "point": "act"}


@torch.no_grad()
def quantile_of_magnitudes(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of ``values`` (1-D, |a| samples) by order statistic: the share of values
    strictly above the result is at most 1 − q."""
    if values.numel() == 0:
        return 0.0
    k = min(values.numel(), max(1, int(round(q * values.numel()))))
    return float(values.kthvalue(k).values)


class MagnitudeSampler:
    """Collects |a| on real tokens per site; fed by :class:`~deft.core.capture.ActivationCapture`
    in place of a density meter."""

    def __init__(self, n_sites: int, scale: Sequence[float] | None = None):
        self.values: list[list[torch.Tensor]] = [[] for _ in range(n_sites)]
        self.scale = list(scale) if scale is not None else [1.0] * n_sites
        self.tokens = 0

    @torch.no_grad()
    def update(self, index: int, act: torch.Tensor, mask: torch.Tensor) -> None:
        values = act[mask].abs().float().reshape(-1)
        self.values[index].append((values / self.scale[index]).cpu())
        if index == 0:
            self.tokens += int(mask.sum())

    @torch.no_grad()
    def update_routed(self, index: int, act: torch.Tensor, real: torch.Tensor, routed) -> None:
        """Routed experts' rows (S, w): magnitudes of the real (token, expert) pairs; tokens, not pairs, counted."""
        self.values[index].append((act[real].abs().float().reshape(-1) / self.scale[index]).cpu())
        if index == 0:
            self.tokens += routed.tokens

    def end_sequences(self) -> None:  # the capture's meter protocol; nothing per sequence here
        pass

    def result(self, seed: int = 0) -> list[torch.Tensor]:
        """One 1-D tensor of magnitudes per site (a random subset if there are too many)."""
        out = []
        generator = torch.Generator().manual_seed(seed)
        for chunks in self.values:
            values = torch.cat(chunks) if chunks else torch.zeros(0)
            if values.numel() > MAX_VALUES_PER_SITE:
                values = values[torch.randperm(values.numel(), generator=generator)[:MAX_VALUES_PER_SITE]]
            out.append(values)
        return out
