"""Dense-layer helpers shared by every layer of deft: one answer to "what is this layer's weight,
width, dtype, device", whatever wraps it.

A dense layer here is ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored (in, out)), or either one
inside a wrapper that keeps the original as ``base_layer`` (peft's LoRA layers, deft's bottleneck
adapter). bitsandbytes' 4-bit ``Linear4bit`` is an ``nn.Linear`` whose weight is packed.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def dense_layer(module: nn.Module) -> nn.Module:
    """The layer holding the weight: the ``base_layer`` inside a wrapper, else the module."""
    return getattr(module, "base_layer", module)


def out_features(module: nn.Module | None) -> int:
    """Output width of a dense layer (0 when ``module`` is None or not a dense layer)."""
    if module is None:
        return 0
    base = dense_layer(module)
    for attr in ("out_features", "nf"):  # Conv1D calls it nf
        if isinstance(getattr(base, attr, None), int):
            return getattr(base, attr)
    weight = getattr(base, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0


def in_features(module: nn.Module) -> int | None:
    """Input width of a dense layer, None when it cannot be told."""
    base = dense_layer(module)
    if isinstance(getattr(base, "in_features", None), int):
        return base.in_features
    weight = getattr(base, "weight", None)
    return int(weight.shape[0]) if is_conv1d(base) and weight is not None else None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out, in) view (a transpose view for ``Conv1D``)."""
    layer = dense_layer(module)
    return layer.weight.data.t() if is_conv1d(layer) else layer.weight.data


def set_module(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` under ``root``; returns the module it replaced."""
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


def float_dtype(*modules: nn.Module | None) -> torch.dtype:
    """The dtype activations have at these modules: their first floating-point tensor's
    (4-bit weights are uint8; their biases / compute dtype are float)."""
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.get_default_dtype()


def module_device(*modules: nn.Module | None) -> torch.device:
    """The device of the first tensor of these modules (CPU when they hold none)."""
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            return tensor.device
    return torch.device("cpu")


class ActivationWrapper(nn.Module):
    """A module standing in for a model's activation module (``inner``), e.g. ADA-DEFT's α·σ.

    Site discovery recognises subclasses as activations, so wrapping σ never hides a site.
    Unknown attribute reads are forwarded to ``inner`` (model code may inspect its activation).
    ``scales_inner``: the output is ``inner``'s output times a factor (ADA's α), so zeros placed
    inside it stay zeros; a threshold then goes inside, on σ itself.
    """

    scales_inner: ClassVar[bool] = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)
