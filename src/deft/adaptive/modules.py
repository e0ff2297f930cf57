"""The modules ADA-DEFT puts into a model: α·σ (:class:`ScaledActivation`) and the stand-ins of a
removed MLP block (:class:`SkippedActivation`, :class:`ZeroProjection`, :class:`ConstantProjection`).

They carry what the α handle reports (α, its initial value, the config), so that state lives
with the modules it describes and survives ``merge_and_unload`` without being re-attached.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.layers import ActivationWrapper


class ScaledActivation(ActivationWrapper):
    """``α · inner(x)``: the activation of one MLP block, scaled by its trainable weight.

    The parameter ``theta`` holds ``α / lr_scale`` (see :class:`AdaptiveConfig`); read and set
    α through :attr:`alpha` / :meth:`set_alpha`. α is kept in fp32 and cast to the
    activation's dtype in the forward.
    """

    scales_inner = True  # α · inner(x): a threshold on σ goes inside

    def __init__(self, inner: nn.Module, alpha: float, lr_scale: float = 1.0, device=None, *,
                 initial: float | None = None, config=None):
        super().__init__()
        self.inner = inner
        self.lr_scale = float(lr_scale)
        self.theta = nn.Parameter(torch.tensor(float(alpha) / self.lr_scale, dtype=torch.float32, device=device))
        # Plain attributes (not state): what the α handle reports, kept with the α they describe.
        self.initial = float(alpha) if initial is None else initial
        self.config = config

    @property
    def alpha(self) -> torch.Tensor:
        return self.theta * self.lr_scale

    @torch.no_grad()
    def set_alpha(self, value: float) -> None:
        self.theta.fill_(float(value) / self.lr_scale)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out * self.alpha.to(out.dtype)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4f}, lr_scale={self.lr_scale:g}"


class SkippedActivation(ActivationWrapper):
    """The activation of a skipped block: its input is already the zeros of :class:`ZeroProjection`."""

    def __init__(self, inner: nn.Module, alpha: float | None = None, initial: float | None = None):
        super().__init__()
        self.inner = inner  # kept (stateless) so the site still reports its activation type
        self.alpha = alpha  # α when the block was removed (None: removed without α)
        self.initial = initial

    def forward(self, x, *args, **kwargs):
        return x


class _NoWeights(nn.Module):
    """Base of the replacement projections: dense-layer attributes, but no weights.

    ``weight`` is an empty placeholder tensor (a plain attribute, not in any state dict):
    model code reads it (T5 casts its hidden states to ``wo.weight.dtype``; transformers'
    ``_init_weights`` initialises ``wi.weight``), and an empty tensor satisfies both.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = torch.empty(0, dtype=dtype, device=device)
        self.bias = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, skipped"


class ZeroProjection(_NoWeights):
    """Stands in for ``first`` / ``mult`` of a skipped block: zeros of the right shape, as an
    expanded view of one scalar (no weights, no (B, T, h) allocation)."""

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


class ConstantProjection(_NoWeights):
    """Stands in for ``down`` of a skipped block: ``down(0)``, broadcast over the positions.

    ``constant`` is a persistent buffer, so exports carry it and :func:`load_exported` restores it.
    """

    def __init__(self, constant: torch.Tensor, in_features: int):
        super().__init__(in_features, constant.numel(), constant.dtype, constant.device)
        self.register_buffer("constant", constant.detach().reshape(-1).clone())

    def forward(self, x, *args, **kwargs):
        return self.constant.expand(*x.shape[:-1], self.out_features)
