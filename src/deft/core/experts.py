"""Routed experts (mixture-of-experts layers): which (token, expert) pair each row of an expert
activation is, so each expert is measured over the tokens routed to it.

transformers 5 keeps a layer's experts as 3-D parameters of one module (``gate_up_proj``
(E, 2w, h) or ``up_proj``, and ``down_proj`` (E, h, w); classes decorated with
``@use_experts_implementation``: Mixtral, Qwen2-MoE, ...). Its activation module ``act_fn`` only
ever sees rows that are (token, expert) pairs the router chose, in an order set by the experts
implementation (``config._experts_implementation``):

* ``eager``: one call per expert hit, experts ascending, rows ordered by (top-k slot, token);
* ``batched_mm``: one call, rows token-major (token t's k choices at rows t·k … t·k + k − 1);
* ``grouped_mm``: one call, rows sorted by expert (``torch.sort`` of the flattened choices,
  reproduced here on the same tensor).

:func:`routing_plan` rebuilds that order from the router's choice (the experts module's
``top_k_index`` argument), so every row is known by its token — real or padding, and padding
must not count — and its expert. Other implementations, expert parallelism and undecorated
expert modules are refused: their row order is unknown, and a guess would be a wrong number.

:class:`RoutedHooks` feeds :class:`~deft.core.capture.ActivationCapture` from these rows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .loss import SequenceShared
from .masks import align_mask

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


class RoutingError(ValueError):
    """The rows of a routed-experts activation cannot be told apart (module doc)."""


def is_routed_experts(module: nn.Module | None) -> bool:
    """A module holding a layer's experts as 3-D weights with one activation module."""
    down = getattr(module, "down_proj", None)
    return (isinstance(getattr(module, "num_experts", None), int)
            and isinstance(getattr(module, "act_fn", None), nn.Module)
            and isinstance(down, torch.Tensor) and down.dim() == 3)


def refuse_routed(model: nn.Module, operation: str) -> None:
    """RoutingError (one line) when ``model`` has routed experts, which ``operation`` cannot handle."""
    routed = next((n for n, m in model.named_modules() if is_routed_experts(m)), None)
    if routed is not None:
        raise RoutingError(f"{operation} is not supported for mixture-of-experts layers ({routed}: routed experts "
                           "held as 3-D weights, not dense layers)")


def expert_width(module: nn.Module) -> int:
    """Width w of one expert's MLP (``down_proj`` is (E, h, w), transposed (E, w, h))."""
    down = module.down_proj
    return int(down.shape[1] if getattr(module, "is_transposed", False) else down.shape[2])


def implementation(module: nn.Module) -> str:
    """The experts implementation ``module`` runs with; RoutingError where its row order is unknown."""
    name = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if not hasattr(module, "has_gate") or name is None:
        raise RoutingError(f"{type(module).__name__} is a mixture-of-experts module without transformers' "
                           "experts dispatch: the order of its rows is unknown, so its experts cannot be measured")
    if name not in IMPLEMENTATIONS:
        raise RoutingError(f"experts implementation {name!r} of {type(module).__name__} is not supported: "
                           f"measuring routed experts needs one of {IMPLEMENTATIONS} "
                           "(model.set_experts_implementation)")
    if getattr(module, "_is_expert_parallel", False):
        raise RoutingError("expert-parallel mixture-of-experts layers are not supported: each rank holds other experts")
    return name


@torch.no_grad()
def routing_plan(module: nn.Module, top_k_index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per call of the experts' activation module: ``(pairs, experts)`` of its rows, where
    ``pairs`` indexes the flattened (token, top-k slot) choices (token = pair // k)."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    name = implementation(module)
    if name == "batched_mm":
        return [(torch.arange(flat.numel(), device=flat.device), flat)]
    if name == "grouped_mm":
        experts, perm = torch.sort(flat)  # the same call on the same tensor: the same order
        return [(perm, experts)]
    plan = []
    for expert in flat.unique(sorted=True).tolist():  # the experts hit, ascending
        if expert >= module.num_experts:
            continue
        slot, token = torch.where(top_k_index.t() == expert)  # (slot, token) order, as the loop's torch.where
        plan.append((token * k + slot, torch.full_like(token, expert)))
    return plan


@dataclass
class _Pass:
    """One call of an experts module: its rows' plan and which tokens are real."""

    fresh: bool  # False: a recomputation under gradient checkpointing (counted nothing)
    plan: list
    top_k: int
    real: torch.Tensor  # (N,) bool per token
    positions: int  # tokens per sequence
    sequences: int
    counted: bool = False  # the pass's real tokens were handed to the meter (with its first call)


class RoutedHooks:
    """The hooks of one routed site: a pre-hook on the experts module reads the router's choice
    and the real-token mask; a hook on the activation module hands each call's rows to the
    capture as (1, S, w) with the real-row mask, the experts and the sequences of the rows."""

    def __init__(self, capture, index: int, experts: nn.Module, act: nn.Module):
        self.capture, self.index, self.experts = capture, index, experts
        self.signature = inspect.signature(experts.forward)
        self.width = expert_width(experts)
        self.current: _Pass | None = None
        implementation(experts)  # refuse before any forward
        if isinstance(capture.approx, SequenceShared):
            raise RoutingError("the sequence form of the density loss is not defined for routed experts (each "
                               "sequence reaches an expert with a different share of its tokens): use the token form")
        self.handles = [experts.register_forward_pre_hook(self._on_experts, with_kwargs=True),
                        act.register_forward_hook(self._on_act)]

    def _on_experts(self, module, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        hidden, top_k_index = bound["hidden_states"], bound["top_k_index"]
        cap = self.capture
        site = cap.sites.sites[self.index]
        _, mask = align_mask(hidden.reshape(-1, hidden.shape[-1]), cap._masks[site.stack], cap._batch_size)
        sequences, positions = mask.shape
        self.current = _Pass(cap._claim(self.index), routing_plan(module, top_k_index), top_k_index.shape[-1],
                             mask.reshape(-1), positions, sequences)

    def _on_act(self, module, inputs, output):
        p = self.current
        if p is None or not p.plan:
            raise RoutingError(f"the activation of {type(self.experts).__name__} ran outside its experts' forward "
                               "or more often than the routing says")
        pairs, experts = p.plan.pop(0)
        if output.shape[0] != pairs.numel():
            raise RoutingError(f"{type(self.experts).__name__}: {output.shape[0]} rows where the routing gives "
                               f"{pairs.numel()}; its experts implementation does not order rows as expected")
        tokens = (pairs // p.top_k).to(p.real.device)
        real = p.real[tokens]
        source = (module.forward, inputs[0].unsqueeze(0)) if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor) \
            and inputs[0].shape == output.shape else None
        new_tokens = int(p.real.sum()) if p.fresh and not p.counted else 0
        p.counted = True
        routed = Routed(experts.to(real.device), tokens // p.positions, p.sequences, self.experts.num_experts,
                        new_tokens)
        self.capture._add(self.index, output.unsqueeze(0), real.unsqueeze(0), source, p.fresh, routed)
        if not p.plan:
            self.current = None


@dataclass(frozen=True)
class Routed:
    """What a density meter needs beyond the rows of a routed activation: each row's expert and
    sequence, the batch's sequences and experts, and the real tokens first seen in this call."""

    experts: torch.Tensor  # (S,) long
    sequences: torch.Tensor  # (S,) long
    n_sequences: int
    n_experts: int
    tokens: int
