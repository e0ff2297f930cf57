"""ReLU-fication: the MLP activation σ replaced by ReLU (or a shifted ReLU) before training, so
exact zeros are the natural state of an activation ("ReLU strikes back", ProSparse).

A GELU model's activations are almost never exactly 0; after ReLU-fication about half of them
are, and the shifted ReLU ``max(0, x − b)`` zeroes more. The PEFT modules (LoRA on the MLP's first
dense layer, by default) let the model adapt to the new function. The replacement keeps the
original module as ``inner`` (an :class:`~deft.core.layers.ActivationWrapper`), so sites are
found at the same paths and report what was replaced.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ActivationWrapper, set_module, unwrap_model
from .sites import find_sites

ACTIVATIONS = ("relu", "shifted-relu")


class ReLUfied(ActivationWrapper):
    """``max(0, x − shift)`` in place of the wrapped activation ``inner`` (which is not called)."""

    def __init__(self, inner: nn.Module, shift: float = 0.0):
        super().__init__()
        self.inner = inner
        self.shift = float(shift)

    def forward(self, x, *args, **kwargs):
        return torch.relu(x - self.shift) if self.shift else torch.relu(x)

    def extra_repr(self) -> str:
        return f"shift={self.shift:g}, replaces {type(self.inner).__name__}"


def check_activation(name: str | None, shift: float = 0.0) -> None:
    if name is not None and name not in ACTIVATIONS:
        raise ValueError(f"unknown --activation {name!r}; choose one of {ACTIVATIONS}")
    if name == "relu" and shift:
        raise ValueError("--activation-shift needs --activation shifted-relu")
    if name == "shifted-relu" and not shift > 0:
        raise ValueError(f"--activation shifted-relu needs --activation-shift > 0, got {shift}")


def relufy(model: nn.Module, name: str | None, shift: float = 0.0) -> nn.Module:
    """Replace every MLP activation of ``model`` (in place); ``name`` None leaves it as it is."""
    check_activation(name, shift)
    if name is None:
        return model
    base = unwrap_model(model)
    for site in find_sites(model, "act"):
        current = base.get_submodule(site.module)
        if isinstance(current, ActivationWrapper):
            raise ValueError(f"cannot ReLU-fy {site.module}: it is already wrapped ({type(current).__name__}); "
                             "ReLU-fy before adding ADA weights or thresholds")
        set_module(base, site.module, ReLUfied(current, shift if name == "shifted-relu" else 0.0))
    return model
