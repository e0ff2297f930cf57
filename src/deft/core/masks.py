"""Which positions are real tokens: the one rule set every measurement uses.

* A model call's masks come from its own arguments: ``attention_mask`` for the encoder (and for
  decoder-only models); for encoder–decoder models the decoder uses ``decoder_attention_mask``,
  else the mask of the decoder inputs the model builds itself, the way it builds them: a
  generation model shifts ``labels`` right (``labels != -100``); without labels, or in a model
  that is no generator (BART's or T5's classifier, where labels are classes), ``input_ids``
  shifted right behind a start token — so the encoder's mask shifted right, its first position
  real (:func:`call_masks`).
* A tensor with fewer positions than its mask keeps the mask's *last* positions (prefix tuning's
  virtual keys, incremental decoding: new tokens sit at the end of the mask); one with more
  positions has real positions prepended (prompt tuning's virtual tokens, which the MLP
  computes) (:func:`align_positions`).
* An activation flattened to (B·T, h) (OPT) is unflattened with the call's batch size, and a
  beam-expanded batch repeats each mask row (:func:`align_mask`).

The capture hooks (loss and density) and the energy model both read masks through here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from .layers import unwrap_model

IGNORE_INDEX = -100  # label value of positions without a target (transformers' convention)
_DECODER_PATH = re.compile(r"(^|\.)decoder(\.|$)")


def in_decoder(module_path: str) -> bool:
    """Whether a module path lies in the decoder stack of an encoder–decoder model."""
    return bool(_DECODER_PATH.search(module_path))


def mask_2d(mask) -> torch.Tensor | None:
    """``mask`` if it is a (B, T) tensor, else None (4-D attention biases are not token masks)."""
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def labels_feed_decoder(model) -> bool:
    """Whether ``model`` (encoder–decoder) builds its decoder inputs from ``labels``: a generation
    model does (``...ForConditionalGeneration``); a classifier's labels are classes."""
    base = unwrap_model(model)
    can_generate = getattr(base, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else True


def call_masks(arguments: Mapping, encoder_decoder: bool,
               labels_to_decoder: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(encoder mask, decoder mask) of one model call from its bound arguments (module doc);
    ``labels_to_decoder``: :func:`labels_feed_decoder` of the model called."""
    mask = mask_2d(arguments.get("attention_mask"))
    if not encoder_decoder:
        return mask, mask
    decoder = mask_2d(arguments.get("decoder_attention_mask"))
    if decoder is not None or arguments.get("decoder_input_ids") is not None or \
            arguments.get("decoder_inputs_embeds") is not None:
        return mask, decoder
    labels = arguments.get("labels")
    if labels_to_decoder and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        return mask, labels != IGNORE_INDEX  # decoder inputs are the shifted labels; -100 marks padding
    if mask is not None and isinstance(arguments.get("input_ids"), torch.Tensor):
        # decoder inputs = [start] + input_ids[:-1] (BART's shift_tokens_right, T5's _shift_right)
        return mask, torch.cat([mask.new_ones(mask.shape[0], 1), mask[:, :-1]], dim=1)
    return mask, None


def align_positions(mask: torch.Tensor, positions: int) -> torch.Tensor:
    """A (B, T) mask brought to ``positions`` columns: the last ones kept, or real ones prepended."""
    batch, length = mask.shape
    if positions <= length:
        return mask[:, length - positions:]
    return torch.cat([mask.new_ones(batch, positions - length), mask], dim=1)


def align_mask(act: torch.Tensor, mask: torch.Tensor | None, batch_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring ``act`` to (B, T, h) and ``mask`` to a (B, T) bool real-token mask (module doc)."""
    width = act.shape[-1]
    if act.dim() == 2:  # OPT: (B·T, h)
        rows = batch_size or (mask.shape[0] if mask is not None else 1)
        if act.shape[0] % rows:
            raise RuntimeError(f"cannot unflatten activation of shape {tuple(act.shape)} into batch {rows}")
        act = act.reshape(rows, act.shape[0] // rows, width)  # no -1: a shrunk block may have width 0
    elif act.dim() != 3:
        act = act.reshape(act.shape[0], math.prod(act.shape[1:-1]), width)
    batch, positions = act.shape[:2]
    if mask is None:
        return act, torch.ones(batch, positions, dtype=torch.bool, device=act.device)
    mask = mask.to(device=act.device, dtype=torch.bool)
    if mask.shape[0] != batch:
        if batch % mask.shape[0]:
            raise RuntimeError(f"activation batch {batch} does not match attention mask batch {mask.shape[0]}")
        mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)  # beam search expands the batch
    return act, align_positions(mask, positions)


class TokenMasks:
    """Real-token masks of one model call, for measurements that see every module's tensors
    (the energy model): modules under a ``decoder`` path of an encoder–decoder model use the
    decoder mask, all others the encoder mask."""

    def __init__(self, encoder: torch.Tensor | None = None, decoder: torch.Tensor | None = None,
                 encdec: bool = False):
        self.encoder = encoder
        self.decoder = decoder
        self.encdec = encdec

    @classmethod
    def from_batch(cls, model, batch) -> "TokenMasks":
        base = unwrap_model(model)
        encdec = bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
        if not isinstance(batch, Mapping):
            return cls(None, None, encdec)
        enc, dec = call_masks(batch, encdec, labels_feed_decoder(base))
        return cls(enc.bool() if enc is not None else None, dec.bool() if dec is not None else None, encdec)

    def for_module(self, name: str) -> torch.Tensor | None:
        if self.encdec and in_decoder(name):
            return self.decoder
        return self.encoder

    def cross_keys(self) -> torch.Tensor | None:
        """Mask of the keys of a cross-attention (the encoder's tokens)."""
        return self.encoder

    @staticmethod
    def align(lead: tuple[int, ...], mask: torch.Tensor | None) -> torch.Tensor | None:
        """A bool mask over the ``prod(lead)`` rows of a tensor with leading shape ``lead``
        (all dims but the feature dim), or ``None`` when every row counts.

        * (B, P): :func:`align_positions`;
        * (1, T) with B > 1 (position embeddings broadcast over the batch): a position counts
          when any sequence has a real token there;
        * (B·T,) (OPT flattens tokens): the flattened mask;
        * anything else (pooled (B, h) vectors, relative position buckets): every row.
        """
        if mask is None:
            return None
        batch, length = mask.shape
        if len(lead) == 1:
            return mask.reshape(-1) if lead[0] == batch * length and length > 1 else None
        if len(lead) != 2:
            return None
        rows, positions = lead
        if rows == batch:
            return align_positions(mask, positions).reshape(-1)
        if rows == 1 and positions == length:
            return mask.any(dim=0).reshape(-1)
        return None

    def align_2d(self, lead: tuple[int, ...], mask: torch.Tensor | None) -> torch.Tensor:
        """(rows, positions) bool mask for a (B, P, ...) tensor; all-true where no mask applies."""
        flat = self.align(lead, mask)
        if flat is None:
            return torch.ones(lead, dtype=torch.bool)
        return flat.reshape(lead)
