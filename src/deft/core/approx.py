"""Differentiable stand-ins for the indicator 1[a != 0] (METHOD.md §3, paper eqs. 4–5, App. A.2.1).

Each approximation is a small frozen dataclass with a ``__call__`` that maps activations
element-wise to a value that is 0 exactly at a = 0 and grows with |a|: into [0, 1) for ℓ0-ε,
tanh and sigmoid, into [0, ∞) for ℓ1. tanh and sigmoid are taken of |a|: the paper states them
for ReLU outputs (a ≥ 0), where |a| = a; on signed activations (GELU, SiLU) tanh(β·a) would go
negative and sigmoid(0) = 0.5, so the loss would reward negative activations instead of zeros.
They are always evaluated in fp32 with autocast off: ε = 1e-7 underflows in half precision
(1e-7 < fp16's smallest normal and is lost against a² in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


#: ε of the paper (eq. 5). It barely moves GELU models in a short run.
PAPER_L0_EPS = 1e-7
#: deft's default ε: the best metric/density trade-off of our short-run probes (README, GLUE table).
DEFAULT_L0_EPS = 0.1


@dataclass(frozen=True)
class L0Approx:
    """ℓ0-ε form (eq. 5): a² / (a² + ε); for GELU-family and other signed activations."""

    eps: float = DEFAULT_L0_EPS

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"l0 approximation needs eps > 0, got {self.eps}")

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        sq = a * a
        return sq / (sq + self.eps)

    def masked_sum(self, a: torch.Tensor, mask: torch.Tensor, source=None) -> torch.Tensor:
        """Σ f(a) over masked-in rows, with a hand-written backward (see :class:`_L0MaskedSum`).

        ``source = (fn, x)`` with ``a = fn(x)`` lets backward recompute ``a`` from ``x`` instead of
        keeping ``a`` alive: the activation function saves ``x`` for its own backward anyway.
        """
        fn, x = source if source is not None else (None, None)
        return _L0MaskedSum.apply(a, mask, self.eps, x, fn)


class _L0MaskedSum(torch.autograd.Function):
    """Σ mask · a²/(a²+ε), fused.

    Autograd would keep a², a²+ε and the masked product alive until backward — three extra
    activation-sized tensors per MLP layer — plus ``a`` itself, which a frozen down projection
    does not need. Here nothing activation-sized is added: with a source ``(fn, x)``, only ``x``
    (already saved by σ) is kept and ``a = fn(x)`` is recomputed in backward; the derivative
    2εa/(a²+ε)² is computed there too.
    """

    @staticmethod
    def forward(ctx, a, mask, eps, x, fn):
        ctx.eps, ctx.fn, ctx.shape, ctx.dtype = eps, fn, a.shape, a.dtype
        ctx.save_for_backward(x if fn is not None else a, mask)
        sq = a * a
        sq.div_(sq + eps)
        return (sq * mask.unsqueeze(-1).to(sq.dtype)).sum()

    @staticmethod
    def backward(ctx, grad):
        saved, mask = ctx.saved_tensors
        if ctx.fn is not None:
            with torch.no_grad(), torch.autocast(device_type=saved.device.type, enabled=False):
                a = ctx.fn(saved).to(ctx.dtype).reshape(ctx.shape)
        else:
            a = saved
        den = a * a
        den.add_(ctx.eps).square_()
        out = a * (2 * ctx.eps) * grad
        out.div_(den).mul_(mask.unsqueeze(-1).to(out.dtype))
        return out, None, None, None, None


@dataclass(frozen=True)
class TanhApprox:
    """tanh form (eq. 4): tanh(β·|a|) — the paper's tanh(β·a) on ReLU outputs (a ≥ 0), and a
    penalty on magnitude (never a reward for negative values) on signed activations.

    The paper's β was lost in text extraction; 1.0 is our default, not the paper's.
    """

    beta: float = 1.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"tanh approximation needs beta > 0, got {self.beta}")

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.beta * a.abs())


@dataclass(frozen=True)
class SigmoidApprox:
    """sigmoid form (App. A.2.1), shifted and scaled to be 0 at a = 0: 2·sigmoid(β·|a|) − 1.

    On ReLU outputs this is the paper's sigmoid(β·a) up to the affine map 2x − 1, so the
    gradient is the paper's, doubled; the raw form would charge 0.5 for every exact zero.
    """

    beta: float = 1.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"sigmoid approximation needs beta > 0, got {self.beta}")

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(self.beta * a.abs()) - 1


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
