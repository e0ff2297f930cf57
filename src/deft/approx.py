"""Differentiable stand-ins for the indicator 1[a != 0] (METHOD.md §3, paper eqs. 4–5, App. A.2.1).

Each approximation is a small frozen dataclass with a ``__call__`` that maps activations to
values in [0, 1) element-wise. They are always evaluated in fp32 with autocast off: ε = 1e-7
underflows in half precision (1e-7 < fp16's smallest normal and is lost against a² in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class L0Approx:
    """ℓ0-ε form (eq. 5): a² / (a² + ε); for GELU-family and other signed activations."""

    eps: float = 1e-7

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"l0 approximation needs eps > 0, got {self.eps}")

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        sq = a * a
        return sq / (sq + self.eps)

    def masked_sum(self, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Σ f(a) over masked-in rows, with a hand-written backward (see :class:`_L0MaskedSum`)."""
        return _L0MaskedSum.apply(a, mask, self.eps)


class _L0MaskedSum(torch.autograd.Function):
    """Σ mask · a²/(a²+ε), fused.

    Autograd would keep a², a²+ε and the masked product alive until backward — three extra
    activation-sized tensors per MLP layer. Here only ``a`` is saved (the down projection keeps
    it for its own backward anyway), and the derivative 2εa/(a²+ε)² is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, a, mask, eps):
        ctx.save_for_backward(a, mask)
        ctx.eps = eps
        sq = a * a
        sq.div_(sq + eps)
        return (sq * mask.unsqueeze(-1).to(sq.dtype)).sum()

    @staticmethod
    def backward(ctx, grad):
        a, mask = ctx.saved_tensors
        den = a * a
        den.add_(ctx.eps).square_()
        out = a * (2 * ctx.eps) * grad
        out.div_(den).mul_(mask.unsqueeze(-1).to(out.dtype))
        return out, None, None


@dataclass(frozen=True)
class TanhApprox:
    """tanh form (eq. 4): tanh(β·a); meant for ReLU outputs (a ≥ 0).

    The paper's β was lost in text extraction; 1.0 is our default, not the paper's.
    """

    beta: float = 1.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"tanh approximation needs beta > 0, got {self.beta}")

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.beta * a)


@dataclass(frozen=True)
class SigmoidApprox:
    """sigmoid form (App. A.2.1): sigmoid(β·a)."""

    beta: float = 1.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"sigmoid approximation needs beta > 0, got {self.beta}")

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.beta * a)


@dataclass(frozen=True)
class L1Approx:
    """ℓ1 form (App. A.2.1): |a| — the plain magnitude penalty the paper found unstable."""

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return a.abs()


APPROXIMATIONS: dict[str, type] = {"l0": L0Approx, "tanh": TanhApprox, "sigmoid": SigmoidApprox, "l1": L1Approx}


def make_approx(name: str, **params: float):
    """Build an approximation by name; unknown names and parameters fail with the valid choices.

    Parameters that the chosen form does not take (e.g. ``beta`` for ``l0``) are ignored when
    ``None``, so a CLI can pass all of them through.
    """
    key = name.lower()
    if key not in APPROXIMATIONS:
        raise ValueError(f"unknown density approximation {name!r}; choose one of {sorted(APPROXIMATIONS)}")
    cls = APPROXIMATIONS[key]
    accepted = {f.name for f in fields(cls)}
    given = {k: v for k, v in params.items() if v is not None}
    unknown = set(given) - accepted
    if unknown:
        raise ValueError(f"approximation {key!r} takes {sorted(accepted) or 'no parameters'}, not {sorted(unknown)}")
    return cls(**given)


def apply_fp32(approx, a: torch.Tensor) -> torch.Tensor:
    """Evaluate ``approx`` on ``a`` in fp32 with autocast disabled, whatever the caller's precision."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return approx(a.float())
