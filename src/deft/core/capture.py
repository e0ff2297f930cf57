"""Forward hooks on the activation sites, aligned with the attention mask.

One :class:`ActivationCapture` serves both consumers of the activations:

* the **loss**: each hook reduces its activation to ``(Σ f(a) over real tokens, count)`` at
  once (so no activation outlives its forward), collected per stack until
  :meth:`ActivationCapture.pop_terms`;
* the **metric**: each hook feeds a :class:`~deft.core.metrics.DensityMeter` under ``no_grad``.

Masks come from the model call itself (a pre-hook on the transformers model, and on the
encoder of encoder–decoder models, which ``generate()`` calls on its own) and are aligned with
each activation by :mod:`deft.core.masks`, the one real-token rule set (padding, prefix/prompt
virtual tokens, incremental decoding, OPT's flattened MLP, beam search, decoder inputs a model
derives itself).

Every call of a site's module in a forward is counted: a module shared by several layers
(ALBERT) is one layer per call — the loss sums every call, and a :class:`DensityMeter` gets one
row per call (:meth:`DensityMeter.layer_row`). A call made while autograd runs a backward pass is
gradient checkpointing's recomputation of a layer already counted, and is ignored.
"""

from __future__ import annotations

import inspect
from collections import Counter
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .experts import RoutedHooks
from .layers import unwrap_model
from .loss import site_term
from .masks import align_mask, call_masks, labels_feed_decoder, mask_2d
from .metrics import DensityMeter
from .sites import STACKS, SiteMap, find_sites

__all__ = ["ActivationCapture", "align_mask"]


class ActivationCapture:
    """Hooks every activation site of ``model``; use as a context manager or attach()/detach().

    ``approx`` (from :mod:`deft.core.approx`) enables loss terms, collected only when gradients are
    on; ``meter`` enables density statistics. Either may be ``None``.

    ``meter_rows``: when set, the meter counts only the first ``meter_rows`` rows of each batch
    (the rest are not real samples, e.g. a distributed sampler's padding); the loss ignores it.
    """

    def __init__(self, model: nn.Module, sites: SiteMap | None = None, *, approx=None,
                 meter: DensityMeter | None = None):
        self.model = model
        self.base = unwrap_model(model)
        self.sites = sites if sites is not None else find_sites(model)
        self.approx = approx
        self.meter = meter
        self.calls: Counter[int] = Counter()  # counted hook calls per site (one per layer it serves)
        self.recomputed: Counter[int] = Counter()  # ignored calls in backward (gradient checkpointing)
        self._handles: list = []
        self._masks: dict[str, torch.Tensor | None] = dict.fromkeys(STACKS)
        self._batch_size: int | None = None
        self._pass_calls: Counter[int] = Counter()  # calls per site in the current model call
        self._positions: Counter[str] = Counter()  # calls per stack in the current model call
        self._meter_row: dict[int, int] = {}  # per site: the meter row of its last counted call
        self._terms: dict[str, list] = {s: [] for s in STACKS}
        self._grouped = 0
        self.meter_rows: int | None = None
        self._encdec = bool(getattr(self.base.config, "is_encoder_decoder", False))
        self._labels_to_decoder = labels_feed_decoder(self.base)

    # -- lifecycle -----------------------------------------------------------------------
    def attach(self) -> "ActivationCapture":
        if self._handles:
            return self
        modules = dict(self.base.named_modules())
        for index, site in enumerate(self.sites):
            module = modules.get(site.module)
            if module is None:
                raise KeyError(f"activation site {site.module!r} not found in the model")
            if site.routed:  # routed experts: rows are (token, expert) pairs (deft.core.experts)
                self._handles.extend(RoutedHooks(self, index, modules[site.routed], module).handles)
            elif site.point == "act":
                self._handles.append(module.register_forward_hook(partial(self._on_output, index)))
            else:
                self._handles.append(module.register_forward_pre_hook(partial(self._on_input, index)))
        # Masks are read where the model is entered. peft's prefix tuning calls the backbone
        # (e.g. ``model.bert``) directly, skipping the task model's forward, so hook both.
        entries = [self.base]
        backbone = getattr(self.base, "base_model", None)
        if isinstance(backbone, nn.Module) and backbone is not self.base and not self._encdec:
            entries.append(backbone)
        for entry in entries:
            hook = partial(self._on_model_call, inspect.signature(entry.forward))
            self._handles.append(entry.register_forward_pre_hook(hook, with_kwargs=True))
        if self._encdec:
            encoder = self.base.get_encoder()
            self._handles.append(encoder.register_forward_pre_hook(self._on_encoder_call, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset_pass()

    def __enter__(self) -> "ActivationCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextmanager
    def sequence_group(self):
        """Treat all model calls inside as the same sequences (e.g. the steps of ``generate()``),
        so union density accumulates across incremental decoding steps."""
        if self.meter is not None:
            self.meter.end_sequences()
        self._grouped += 1
        try:
            yield self
        finally:
            self._grouped -= 1
            if self.meter is not None and not self._grouped:
                self.meter.end_sequences()

    # -- loss side -----------------------------------------------------------------------
    def pop_terms(self) -> dict[str, list[tuple[torch.Tensor, int]]]:
        """The loss terms of the last model call, per stack; clears them."""
        terms, self._terms = self._terms, {s: [] for s in STACKS}
        return terms

    def pending_terms(self) -> int:
        return sum(len(v) for v in self._terms.values())

    # -- hooks ---------------------------------------------------------------------------
    def _reset_pass(self) -> None:
        self._pass_calls.clear()
        self._positions.clear()
        self._terms = {s: [] for s in STACKS}  # drop graph references of an unconsumed pass

    def _bind(self, signature, args, kwargs) -> dict:
        try:
            return signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return dict(kwargs)

    def _on_model_call(self, signature, module, args, kwargs):
        bound = self._bind(signature, args, kwargs)
        self._reset_pass()
        if self.meter is not None and not self._grouped:
            self.meter.end_sequences()
        batch = next((bound[k] for k in ("input_ids", "inputs_embeds", "pixel_values", "decoder_input_ids")
                      if isinstance(bound.get(k), torch.Tensor)), None)
        self._batch_size = int(batch.shape[0]) if batch is not None else None
        encoder_mask, decoder_mask = call_masks(bound, self._encdec, self._labels_to_decoder)
        if not self._encdec:
            self._masks = dict.fromkeys(STACKS, encoder_mask)
            return
        if bound.get("encoder_outputs") is None:
            self._masks["encoder"] = encoder_mask
        self._masks["decoder"] = decoder_mask

    def _on_encoder_call(self, module, args, kwargs):
        # generate() runs the encoder on its own, outside the model's forward.
        bound = self._bind(inspect.signature(module.forward), args, kwargs)
        self._masks["encoder"] = mask_2d(bound.get("attention_mask"))
        for i, s in enumerate(self.sites):
            if s.stack == "encoder":
                self._pass_calls.pop(i, None)
        self._positions.pop("encoder", None)
        if self.meter is not None and not self._grouped:
            self.meter.end_sequences()

    def _on_output(self, index, module, inputs, output):
        act = output[0] if isinstance(output, tuple) else output
        # σ's input lets the loss recompute σ's output in backward instead of keeping it alive;
        # ``module.forward`` (not ``module(...)``) so no hook fires during that recomputation.
        source = (module.forward, inputs[0]) if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor) \
            and inputs[0].shape == act.shape else None
        self._record(index, act, source)

    def _on_input(self, index, module, inputs):
        self._record(index, inputs[0])

    def _record(self, index: int, act: torch.Tensor, source=None) -> None:
        site = self.sites.sites[index]
        act3, mask = align_mask(act, self._masks[site.stack], self._batch_size)
        self._add(index, act3, mask, source, self._claim(index))

    def _claim(self, index: int) -> bool:
        """Count the site's call; False when autograd runs a backward pass: the recomputation of
        gradient checkpointing, which counts nothing. The n-th call of a site in one model call is
        its module serving an n-th layer (a module shared by layers): a meter row of its own."""
        if in_backward():
            self.recomputed[index] += 1
            return False
        stack = self.sites.sites[index].stack
        call, position = self._pass_calls[index], self._positions[stack]
        self._pass_calls[index] += 1
        self._positions[stack] += 1
        self.calls[index] += 1
        layer_row = getattr(self.meter, "layer_row", None)  # per-layer meters; others count per module
        self._meter_row[index] = layer_row(index, call, position) if layer_row is not None else index
        return True

    def _add(self, index: int, act3: torch.Tensor, mask: torch.Tensor, source=None, fresh: bool = True,
             routed=None) -> None:
        """Loss term and meter counts of one activation (B, T, h) with its real-token mask (B, T).
        ``routed``: a routed-experts activation (1, S, w), :class:`deft.core.experts.Routed`."""
        site = self.sites.sites[index]
        wants_loss = self.approx is not None and torch.is_grad_enabled() and act3.requires_grad
        if not fresh:
            # Redo the loss ops so the checkpoint sees the same saved tensors as in the forward (it checks).
            if wants_loss:
                site_term(act3, mask, self.approx, source)
            return
        if wants_loss:
            self._terms[site.stack].append(site_term(act3, mask, self.approx, source))
        if self.meter is not None:
            rows = routed.sequences.unsqueeze(0) if routed is not None else \
                torch.arange(mask.shape[0], device=mask.device).unsqueeze(1)
            if self.meter_rows is not None:
                mask = mask & (rows.to(mask.device) < self.meter_rows)
            if routed is not None and hasattr(self.meter, "update_routed"):
                self.meter.update_routed(index, act3[0].detach(), mask[0], routed)
            else:  # meters without a routed form take the (token, expert) rows as positions
                self.meter.update(self._meter_row.get(index, index), act3.detach(), mask)


def in_backward() -> bool:
    """Whether autograd's engine is running a backward pass. A module forward inside one is
    gradient checkpointing recomputing a layer (reentrant or not); grad mode cannot tell: the
    recomputation runs with gradients on, as a training forward does."""
    return torch._C._current_graph_task_id() != -1


@torch.no_grad()
def site_calls(model: nn.Module, sites: SiteMap | None = None) -> list[int] | None:
    """How many times each site's module runs in one forward pass (ALBERT's one MLP module serves
    every layer), from a dry run on a few dummy tokens (or one blank image); None when the model
    takes neither."""
    base = unwrap_model(model)
    sites = sites if sites is not None else find_sites(model)
    config = base.config
    name = getattr(base, "main_input_name", "input_ids")
    if name == "input_ids":
        ids = torch.arange(1, 5).clamp(max=max(1, getattr(config, "vocab_size", 5) - 1)).unsqueeze(0)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, :2]
    elif name == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        inputs = {"pixel_values": torch.zeros(1, getattr(config, "num_channels", 3), size, size)}
    else:
        return None
    counts = [0] * len(sites)
    modules = dict(base.named_modules())
    handles = [modules[s.module].register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, s in enumerate(sites)]
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        base(**{k: v.to(device) for k, v in inputs.items()})
    finally:
        base.train(was_training)
        for h in handles:
            h.remove()
    return counts
