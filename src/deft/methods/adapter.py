"""Bottleneck adapters in the Pfeiffer placement (Pfeiffer et al. 2021), as the paper trains them.

One adapter per MLP block, on the output of the MLP's down projection — after the
feed-forward computation, before dropout, the residual addition and the LayerNorm:

    h = W2 · σ(...)            (the frozen down projection, ``site.down`` of find_sites)
    h' = h + up(act(down(h)))  (the adapter; ``up`` starts at zero, so h' = h at init)

with bottleneck width ``hidden // reduction_factor`` (at least 1).

Why implemented here: no maintained library offers bottleneck adapters for transformers 5.x.
AdapterHub's ``adapters`` package pins transformers 4.57, and huggingface/peft has no
bottleneck adapter. The implementation is a small :class:`BottleneckAdapter` module that
replaces the down-projection module in place (same path), so every family of
:mod:`deft.core.sites` is covered, encoder and decoder, ``nn.Linear`` and GPT-2's ``Conv1D`` alike.
The wrapped layer stays reachable as ``base_layer`` (like peft's LoRA layers) and the
wrapper forwards ``weight``, ``bias``, ``in_features``, ``out_features``, ``nf`` ... to it, so
code that inspects the down projection (T5 reads ``wo.weight.dtype``) keeps working.
The non-linearity is applied functionally — no activation module inside the adapter, so
activation-site discovery and hooks never mistake it for an MLP activation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..core.layers import in_features, out_features
from ..core.sites import find_sites, unwrap_model
from .base import MethodConfig, PeftMethod, UnsupportedCombinationError, register_method, task_head_names

NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
WEIGHTS_FILE = "bottleneck_adapters.safetensors"
CONFIG_FILE = "bottleneck_adapters.json"


@dataclass
class AdapterMethodConfig(MethodConfig):
    """Bottleneck-adapter hyper-parameters (paper: reduction factor 16, ReLU).

    Attributes:
        reduction_factor: bottleneck width = hidden size // reduction_factor (at least 1).
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
    """

    name = "adapter"

    reduction_factor: int = 16
    non_linearity: str = "relu"

    def __post_init__(self):
        if self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {sorted(NON_LINEARITIES)}, got {self.non_linearity!r}")


def _dense_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of an ``nn.Linear``-like layer or GPT-2's ``Conv1D``."""
    n_in, n_out = in_features(layer), out_features(layer)
    if n_in is None or not n_out:
        raise TypeError(f"cannot put an adapter on {type(layer).__name__}: not a dense layer")
    return int(n_in), int(n_out)


class BottleneckAdapter(nn.Module):
    """``base_layer`` followed by the residual bottleneck ``h + up(act(down(h)))``."""

    def __init__(self, base_layer: nn.Module, reduction_factor: int = 16, non_linearity: str = "relu"):
        super().__init__()
        self.base_layer = base_layer
        _, hidden = _dense_dims(base_layer)
        bottleneck = max(1, hidden // reduction_factor)
        weight = getattr(base_layer, "weight", None)
        device = weight.device if weight is not None else None
        # Adapter weights are kept in fp32 whatever the base dtype (they are what trains).
        self.adapter_down = nn.Linear(hidden, bottleneck, device=device, dtype=torch.float32)
        self.adapter_up = nn.Linear(bottleneck, hidden, device=device, dtype=torch.float32)
        # AdapterHub's default ("bert") init: small normal weights, zero biases; the up
        # projection all zero, so the adapter starts as the identity.
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.non_linearity = non_linearity
        self.reduction_factor = reduction_factor

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        z = h.to(self.adapter_down.weight.dtype)
        z = self.adapter_up(NON_LINEARITIES[self.non_linearity](self.adapter_down(z)))
        return h + z.to(h.dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"reduction_factor={self.reduction_factor}, non_linearity={self.non_linearity}"


def adapter_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """Path → adapter wrapper, for every adapter in ``model`` (paths of the unwrapped model)."""
    return {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, BottleneckAdapter)}


def add_adapters(model: nn.Module, config: AdapterMethodConfig) -> dict[str, BottleneckAdapter]:
    """Wrap the down projection of every activation site of ``model`` in a new adapter."""
    base = unwrap_model(model)
    sites = find_sites(base)
    routed = [s.module for s in sites if s.routed]
    if routed:
        raise UnsupportedCombinationError(f"bottleneck adapters wrap an MLP's down projection; the routed experts at "
                                          f"{routed[0]} have none (3-D expert weights): use LoRA, prefix or prompt tuning")
    missing = [s.module for s in sites if not s.down]
    if missing:
        raise ValueError(f"no down projection found for activation site(s) {missing}; cannot place adapters")
    added = {}
    for site in sites:
        parent_path, _, attr = site.down.rpartition(".")
        parent = base.get_submodule(parent_path) if parent_path else base
        layer = getattr(parent, attr)
        if isinstance(layer, BottleneckAdapter):
            raise ValueError(f"{site.down} already has an adapter")
        wrapper = BottleneckAdapter(layer, config.reduction_factor, config.non_linearity)
        setattr(parent, attr, wrapper)
        added[site.down] = wrapper
    return added


@register_method
class AdapterMethod(PeftMethod):
    """Pfeiffer bottleneck adapters after every MLP block; base frozen, adapters + task head train."""

    name = "adapter"
    config_cls = AdapterMethodConfig

    def apply(self, model, config=None, task_type="SEQ_CLS"):
        config = self.resolve_config(config)
        task_type = self._check_task_type(task_type)
        if unwrap_model(model) is not model:
            raise ValueError("adapter applies to a plain transformers model, got a peft-wrapped model")
        if adapter_modules(model):
            raise ValueError("model already has bottleneck adapters")
        model.requires_grad_(False)
        add_adapters(model, config)
        for head in task_head_names(model, task_type):
            getattr(model, head).requires_grad_(True)
        return self._record(model, config, task_type)

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}

    def save(self, model, directory):
        from safetensors.torch import save_file

        record = self._applied(model)
        directory = Path(directory)
        self._write_metadata(record, directory)
        state = {n: t.contiguous().cpu() for n, t in self.trainable_state_dict(model).items()}
        if not state:
            raise ValueError("nothing to save: the model has no trainable parameters")
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps({
            "method": self.name, "task_type": record.task_type,
            "reduction_factor": record.config.reduction_factor, "non_linearity": record.config.non_linearity,
            "adapted_modules": sorted(adapter_modules(model)), "saved_parameters": sorted(state),
        }, indent=2))

    def load(self, base_model, directory, is_trainable=False):
        from safetensors.torch import load_file

        directory = Path(directory)
        config, task_type = self._read_metadata(directory)
        model = self.apply(base_model, config, task_type)
        state = load_file(str(directory / WEIGHTS_FILE))
        expected = set(self.trainable_state_dict(model))
        lacking = sorted(expected - set(state))
        params = dict(model.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown or lacking:
            raise ValueError(f"adapter checkpoint {directory} does not fit this model: "
                             f"unknown parameters {unknown[:5]}, parameters not in the checkpoint {lacking[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model
