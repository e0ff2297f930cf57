"""Forward hooks on the activation sites, aligned with the attention mask.

One :class:`ActivationCapture` serves both consumers of the activations:

* the **loss**: each hook reduces its activation to ``(Σ f(a) over real tokens, count)`` at
  once (so no activation outlives its forward), collected per stack until
  :meth:`ActivationCapture.pop_terms`;
* the **metric**: each hook feeds a :class:`~deft.metrics.DensityMeter` under ``no_grad``.

Alignment rules, so the same code is right for every model and PEFT method:

* masks come from the model call itself (a pre-hook on the transformers model, and on the
  encoder of encoder–decoder models, which ``generate()`` calls on its own);
* an activation with fewer positions than the mask keeps the mask's *last* positions — prefix
  tuning's virtual keys and incremental decoding (new tokens at the end of the mask) both fit;
* an activation with more positions than the mask has virtual tokens prepended (prompt
  tuning without a peft-extended mask): they are counted, since the MLP computes them;
* a flattened (B·T, h) activation (OPT) is reshaped with the batch size of the call.

Each site is counted once per model call: a hook firing again before the next call is the
recomputation of gradient checkpointing and is ignored.
"""

from __future__ import annotations

import inspect
from collections import Counter
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .loss import site_term
from .metrics import DensityMeter
from .sites import STACKS, SiteMap, find_sites, unwrap_model


def align_mask(act: torch.Tensor, mask: torch.Tensor | None, batch_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring ``act`` to (B, T, h) and ``mask`` to a (B, T) bool real-token mask (see module doc)."""
    width = act.shape[-1]
    if act.dim() == 2:  # OPT: (B·T, h)
        rows = batch_size or (mask.shape[0] if mask is not None else 1)
        if act.shape[0] % rows:
            raise RuntimeError(f"cannot unflatten activation of shape {tuple(act.shape)} into batch {rows}")
        act = act.reshape(rows, -1, width)
    elif act.dim() != 3:
        act = act.reshape(act.shape[0], -1, width)
    batch, positions = act.shape[:2]
    if mask is None:
        return act, torch.ones(batch, positions, dtype=torch.bool, device=act.device)
    mask = mask.to(device=act.device, dtype=torch.bool)
    if mask.shape[0] != batch:
        if batch % mask.shape[0]:
            raise RuntimeError(f"activation batch {batch} does not match attention mask batch {mask.shape[0]}")
        mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)  # beam search expands the batch
    length = mask.shape[1]
    if length >= positions:
        mask = mask[:, length - positions:]
    else:
        mask = torch.cat([mask.new_ones(batch, positions - length), mask], dim=1)
    return act, mask


class ActivationCapture:
    """Hooks every activation site of ``model``; use as a context manager or attach()/detach().

    ``approx`` (from :mod:`deft.approx`) enables loss terms, collected only when gradients are
    on; ``meter`` enables density statistics. Either may be ``None``.
    """

    def __init__(self, model: nn.Module, sites: SiteMap | None = None, *, approx=None,
                 meter: DensityMeter | None = None):
        self.model = model
        self.base = unwrap_model(model)
        self.sites = sites if sites is not None else find_sites(model)
        self.approx = approx
        self.meter = meter
        self.calls: Counter[int] = Counter()  # accepted hook calls per site
        self.recomputed: Counter[int] = Counter()  # ignored re-fires (gradient checkpointing)
        self._handles: list = []
        self._masks: dict[str, torch.Tensor | None] = dict.fromkeys(STACKS)
        self._batch_size: int | None = None
        self._fired: set[int] = set()
        self._terms: dict[str, list] = {s: [] for s in STACKS}
        self._grouped = 0
        self._encdec = bool(getattr(self.base.config, "is_encoder_decoder", False))

    # -- lifecycle -----------------------------------------------------------------------
    def attach(self) -> "ActivationCapture":
        if self._handles:
            return self
        modules = dict(self.base.named_modules())
        for index, site in enumerate(self.sites):
            module = modules.get(site.module)
            if module is None:
                raise KeyError(f"activation site {site.module!r} not found in the model")
            if site.point == "act":
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
        self._fired.clear()
        self._terms = {s: [] for s in STACKS}  # drop graph references of an unconsumed pass

    def _bind(self, signature, args, kwargs) -> dict:
        try:
            return signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return dict(kwargs)

    @staticmethod
    def _mask_2d(mask):
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _on_model_call(self, signature, module, args, kwargs):
        bound = self._bind(signature, args, kwargs)
        self._reset_pass()
        if self.meter is not None and not self._grouped:
            self.meter.end_sequences()
        batch = next((bound[k] for k in ("input_ids", "inputs_embeds", "pixel_values", "decoder_input_ids")
                      if isinstance(bound.get(k), torch.Tensor)), None)
        self._batch_size = int(batch.shape[0]) if batch is not None else None
        mask = self._mask_2d(bound.get("attention_mask"))
        if not self._encdec:
            self._masks = dict.fromkeys(STACKS, mask)
            return
        if bound.get("encoder_outputs") is None:
            self._masks["encoder"] = mask
        decoder_mask = self._mask_2d(bound.get("decoder_attention_mask"))
        labels = bound.get("labels")
        if decoder_mask is None and isinstance(labels, torch.Tensor) and labels.dim() == 2 and \
                bound.get("decoder_input_ids") is None and bound.get("decoder_inputs_embeds") is None:
            decoder_mask = labels != -100  # decoder inputs are the shifted labels; -100 marks padding
        self._masks["decoder"] = decoder_mask

    def _on_encoder_call(self, module, args, kwargs):
        # generate() runs the encoder on its own, outside the model's forward.
        bound = self._bind(inspect.signature(module.forward), args, kwargs)
        self._masks["encoder"] = self._mask_2d(bound.get("attention_mask"))
        encoder_sites = [i for i, s in enumerate(self.sites) if s.stack == "encoder"]
        self._fired.difference_update(encoder_sites)
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
        wants_loss = self.approx is not None and torch.is_grad_enabled() and act.requires_grad
        if index in self._fired:
            # Recomputation under gradient checkpointing: redo the loss ops so the checkpoint sees
            # the same saved tensors as in the forward (it checks), but count nothing.
            self.recomputed[index] += 1
            if wants_loss:
                site_term(act3, mask, self.approx, source)
            return
        self._fired.add(index)
        self.calls[index] += 1
        if wants_loss:
            self._terms[site.stack].append(site_term(act3, mask, self.approx, source))
        if self.meter is not None:
            self.meter.update(index, act3.detach(), mask)
