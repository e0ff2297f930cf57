"""The density loss (METHOD.md §3, paper eq. 6).

    L_density = (1/N) Σ_l Σ_j f(a_lj)

over real tokens × neurons × layers of one stack; encoder and decoder terms are weighted
separately and the total is scaled by the global λ (eq. 8). The per-site reduction happens
inside the capture hook (:func:`site_term`), so activations are never kept beyond their use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .approx import L0Approx, apply_fp32, make_approx


@dataclass(frozen=True)
class DensityLossConfig:
    """How DEFT penalises density.

    ``weight`` is λ of eq. 8 (0 turns DEFT into PEFT). ``approx`` names the stand-in for
    1[a ≠ 0] (``l0``, ``tanh``, ``sigmoid``, ``l1``); ``eps``/``beta`` are its parameter
    (``None`` → the form's default, :mod:`deft.core.approx`: ε = 0.1, β = 1; filled in, so a
    saved config names the value). ``encoder_weight``/``decoder_weight`` weigh the two stacks'
    terms (either may be 0).

    ``form``: ``token`` (the paper: f of every entry) or ``sequence`` — f of each neuron's
    root-mean-square over the real tokens of a sequence, which pushes a neuron to be silent for
    the whole sequence (what removing neurons or a sequence-shared sparse kernel needs).
    ``eps_final``: anneal the ℓ0 ε geometrically from ``eps`` to this value over training
    (None: constant ε).
    """

    weight: float = 1.0
    approx: str = "l0"
    eps: float | None = None
    beta: float | None = None
    encoder_weight: float = 1.0
    decoder_weight: float = 1.0
    form: str = "token"
    eps_final: float | None = None

    def __post_init__(self):
        for name in ("weight", "encoder_weight", "decoder_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.form not in FORMS:
            raise ValueError(f"unknown density-loss form {self.form!r}; choose one of {FORMS}")
        if self.eps_final is not None and (self.approx != "l0" or not self.eps_final > 0):
            raise ValueError(f"eps_final anneals the l0 approximation's ε and must be > 0, got {self.eps_final} "
                             f"with approx {self.approx!r}")
        approx = make_approx(self.approx, eps=self.eps, beta=self.beta)  # validates name and parameters early
        for name in ("eps", "beta"):
            if getattr(self, name) is None and hasattr(approx, name):
                object.__setattr__(self, name, getattr(approx, name))

    def build_approx(self, eps: float | None = None):
        """The approximation (``eps`` overrides ε, for annealing); the sequence form wrapped."""
        approx = make_approx(self.approx, eps=self.eps if eps is None else eps, beta=self.beta)
        return SequenceShared(approx) if self.form == "sequence" else approx

    def eps_at(self, progress: float) -> float | None:
        """ε at ``progress`` ∈ [0, 1] of training: geometric from ``eps`` to ``eps_final``."""
        if self.eps_final is None:
            return self.eps
        p = min(max(progress, 0.0), 1.0)
        return self.eps * (self.eps_final / self.eps) ** p

    def stack_weight(self, stack: str) -> float:
        return self.encoder_weight if stack == "encoder" else self.decoder_weight


FORMS = ("token", "sequence")


@dataclass(frozen=True)
class SequenceShared:
    """The sequence form of an approximation: f(RMS over a sequence's real tokens) per neuron."""

    inner: object

    def sequence_sum(self, act: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        with torch.autocast(device_type=act.device.type, enabled=False):
            a = act.float()
            m = mask.unsqueeze(-1).to(a.dtype)
            tokens = mask.sum(dim=1)
            live = tokens > 0
            mean_sq = (a * a * m).sum(dim=1)[live] / tokens[live].unsqueeze(-1).to(a.dtype)  # (B_live, h)
            if isinstance(self.inner, L0Approx):
                f = mean_sq / (mean_sq + self.inner.eps)  # rms² / (rms² + ε), no square root needed
            else:
                f = self.inner(torch.sqrt(mean_sq + 1e-12))
            return f.sum(), int(live.sum()) * act.shape[-1]


def site_term(act: torch.Tensor, mask: torch.Tensor, approx, source=None) -> tuple[torch.Tensor, int]:
    """Σ f(a) over the real tokens of one site, and the number of elements summed.

    ``act`` is (B, T, h), ``mask`` (B, T) bool. f is evaluated in fp32 (see :mod:`deft.core.approx`).
    ``source = (fn, x)`` with ``act = fn(x)`` lets a fused approximation recompute ``act`` in
    backward instead of keeping it.
    """
    if isinstance(approx, SequenceShared):
        return approx.sequence_sum(act, mask)
    fused = getattr(approx, "masked_sum", None)
    if fused is not None:
        with torch.autocast(device_type=act.device.type, enabled=False):
            total = fused(act.float(), mask, source if act.dtype == torch.float32 else None)
    else:
        f = apply_fp32(approx, act)
        total = (f * mask.unsqueeze(-1).to(f.dtype)).sum()
    return total, int(mask.sum()) * act.shape[-1]


def combine_terms(terms: dict[str, list[tuple[torch.Tensor, int]]], config: DensityLossConfig) -> torch.Tensor | None:
    """λ · Σ_stack w_stack · (Σ_sites Σ f) / N_stack — eq. 6 per stack, eq. 8's λ on top.

    Returns ``None`` when nothing was captured (e.g. a forward without gradients).
    """
    total = None
    for stack, items in terms.items():
        weight = config.stack_weight(stack)
        count = sum(n for _, n in items)
        if not items or count == 0 or weight == 0:
            continue
        value = weight * torch.stack([s for s, _ in items]).sum() / count
        total = value if total is None else total + value
    return None if total is None else config.weight * total
