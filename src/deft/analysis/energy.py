"""Energy of a zero-skipping ASIC vs. a dense one (METHOD.md §5).

The DEFT paper reports the *energy consumption ratio* of Lazzaro et al. (2023), which uses
the hardware model of Shumailov et al. (2021), "Sponge examples: energy-latency attacks on
neural networks" (public estimator: ``energy_estimator/analyse.py`` in the
``iliaishacked/sponge_examples`` repository). This module is an independent implementation
of that cost model for what transformers run; the constants and the accounting rules follow
the sponge estimator, the per-operation counting is finer (see below).

Cost model (per operation = one call of a counted module, or one attention product):

* every parameter value is read from memory once per call;
* every input activation value is read once, every output value written once;
* every multiply–accumulate (MAC) costs ``mac_pj``; elementwise operations ``elementwise_pj``.

The **dense** ASIC pays for every value and every MAC. The **zero-skipping** ASIC
(sponge's ``HardwareModel(optim=True)``) reads/writes only non-zero values (compressed
storage, no (de)compression overhead) and skips a MAC when either operand is zero. Where
the sponge estimator scales the MAC count by (weight density × input density), assuming
zeros spread uniformly, this module counts the MACs with both operands non-zero exactly,
per layer (weight non-zeros are counted per layer, not pooled over the model).
``energy_ratio`` = zero-skipping energy / dense energy ≤ 1.

What is counted, per kind:

* ``linear`` — ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored (in, out)): parameter
  reads, input reads, output writes, ``tokens × in × out`` MACs (exact non-zero pairs for the
  zero-skipping ASIC). peft LoRA layers are counted through their inner ``nn.Linear`` leaves
  (base layer, A, B), so an unmerged adapter costs what it computes.
* ``embedding`` — ``nn.Embedding``: a lookup. Only the looked-up rows are read (the sponge
  estimator also charges the whole table on every call, which would drown everything else in
  a 50k-row vocabulary); the indices are read as they are (an index is not data, it is never
  skipped); the output is written; no MACs.
* ``norm`` — LayerNorm/RMSNorm-like modules (``nn.LayerNorm``, ``nn.RMSNorm``, any class whose
  name ends in ``LayerNorm``/``RMSNorm``/``GroupNorm``): parameter reads, input reads, output
  writes and ``norm_ops_per_element`` elementwise operations per element. The operations are
  never skipped (normalising a zero does not give zero).
* ``activation`` — ReLU/GELU/SiLU/tanh-like modules: input reads, output writes, one
  operation per element, skipped for zero inputs (these functions map 0 to 0).
* ``attention_qk`` / ``attention_av`` — the two matrix products of attention, QKᵀ and AV. They
  are not modules; their operands are captured by hooks on the query/key/value projections
  (``query/key/value``, ``q/k/v``, ``q_proj/k_proj/v_proj``, ``q_lin/k_lin/v_lin``, GPT-2's fused
  ``c_attn``) and counted over the (query, key) pairs the attention mask allows (causal
  attention: keys up to the query's position). Approximations: the attention probabilities
  are taken as dense (softmax is positive wherever the mask allows), so a QKᵀ MAC is skipped
  when the query or key element is zero and an AV MAC when the value element is zero; the
  scores, probabilities and the AV output are counted as dense values in both ASICs (their
  zeros are not observed); softmax, scaling, rotary embeddings and prefix-tuning's virtual
  keys are not counted. Grouped-query attention maps each query head onto its key/value head.

Not counted at all: residual additions, dropout (identity at inference), other parameter-free
glue. Leaf modules with parameters of an unknown kind are listed in ``EnergyReport.skipped``,
as are linear layers whose weights cannot be read as a matrix (counted as dense weights;
bitsandbytes 4-bit weights are dequantized when bitsandbytes is importable). With a KV cache
(incremental decoding) only the new positions' keys and values are observed, so the
attention products of cached positions are not counted: estimate over full forward passes.

Padding: only real tokens (``attention_mask`` of the batch; for encoder–decoder models
``decoder_attention_mask`` or, without it, the non ``-100`` labels) enter the activation and
MAC counts. Parameters are read once per model call whatever the batch, as in the sponge
estimator — so the ratio depends on the batch size (the sponge/Lazzaro setting is one input
per call: batch size 1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import fields
from functools import partial

import torch
from torch import nn

from ..core.batches import call_model, model_device, move_batch
from ..core.experts import refuse_routed
from ..core.layers import is_conv1d, unwrap_model
from ..core.masks import TokenMasks, in_decoder
from .energy_costs import (HOROWITZ_45NM_PJ, KINDS, SPONGE_COMPUTE_PJ, SPONGE_MEMORY_PJ, SPONGE_ZERO_THRESHOLD_FP32,
                           EnergyConfig, EnergyReport, OpCounts, energy_change, module_kind)

# --- Attention projections --------------------------------------------------------------------
_QKV_NAMES = (("query", "key", "value"), ("q", "k", "v"), ("q_proj", "k_proj", "v_proj"),
              ("q_lin", "k_lin", "v_lin"), ("to_q", "to_k", "to_v"))
_FUSED_QKV = ("c_attn",)  # GPT-2 family: one projection, output split into equal thirds
_CROSS_NAME = re.compile(r"encdec|cross|encoder_attn", re.IGNORECASE)


def _weight_out_in(module: nn.Module, n_in: int, n_out: int) -> torch.Tensor | None:
    """A dense layer's weight as (out, in) (GPT-2's Conv1D stores (in, out)); ``None`` when the
    stored weight is not a plain matrix (packed 4-bit weights that cannot be dequantized)."""
    w = module.weight.detach()
    if is_conv1d(module):
        w = w.t()
    if tuple(w.shape) == (n_out, n_in):
        return w
    quant_state = getattr(module.weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit (QLoRA): compare what the layer computes with
        try:
            import bitsandbytes.functional as bnbf

            w = bnbf.dequantize_4bit(module.weight.data, quant_state)
            return w if tuple(w.shape) == (n_out, n_in) else None
        except Exception:  # noqa: BLE001 - any failure: fall back to dense counting
            return None
    return None


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return next((t for t in x if isinstance(t, torch.Tensor)), None)
    if isinstance(x, Mapping):
        return next((t for t in x.values() if isinstance(t, torch.Tensor)), None)
    return getattr(x, "last_hidden_state", None)


def _attention_triples(model: nn.Module) -> list[tuple[str, nn.Module, dict[str, str] | str]]:
    """(parent path, parent module, {"q": path, "k": path, "v": path} or fused path)."""
    found = []
    for name, mod in model.named_modules():
        children = dict(mod.named_children())
        prefix = f"{name}." if name else ""
        for q, k, v in _QKV_NAMES:
            if q in children and k in children and v in children:
                found.append((name, mod, {"q": prefix + q, "k": prefix + k, "v": prefix + v}))
                break
        else:
            for fused in _FUSED_QKV:
                if fused in children and not getattr(mod, "is_cross_attention", False):
                    found.append((name, mod, prefix + fused))
                    break
    return found


def _head_dim(parent: nn.Module, config, q_width: int) -> int:
    for attr in ("head_dim", "attention_head_size", "key_value_proj_dim", "d_head", "head_size"):
        value = getattr(parent, attr, None)
        if isinstance(value, int) and value > 0 and q_width % value == 0:
            return value
    for attr in ("num_attention_heads", "num_heads", "n_head", "n_heads"):
        heads = getattr(parent, attr, None) or getattr(config, attr, None)
        if isinstance(heads, int) and heads > 0 and q_width % heads == 0:
            return q_width // heads
    return q_width  # one head: counts that need the head split become per-model approximations


# --- The estimator ----------------------------------------------------------------------------
class _Estimator:
    def __init__(self, model: nn.Module, config: EnergyConfig):
        self.model = model
        self.cfg = config
        self.base = unwrap_model(model)
        self.model_config = getattr(self.base, "config", None)
        self.counts: dict[str, tuple[str, OpCounts]] = {}
        self.batch_counts: dict[str, OpCounts] = {}
        self.calls: dict[str, int] = {}
        self.masks = TokenMasks()
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.skipped: set[str] = set()
        self.opaque: set[str] = set()
        self.handles: list = []
        self.tokens = 0
        # What does not depend on the input is counted once: a layer's parameter reads and the
        # non-zero weights per input feature (weights do not change under no_grad), and per batch
        # the real-token rows of each activation shape.
        self.weight_stats: dict[str, tuple] = {}
        self.keep_cache: dict[tuple, torch.Tensor | None] = {}
        self.recent: dict[tuple, tuple] = {}
        # Data-dependent counts of one batch stay tensors until the batch ends: one conversion
        # (one device sync) per batch instead of several per module call.
        self.pending_counts: list[tuple[str, str, OpCounts]] = []
        # Modules of a peft wrapper outside the transformers model (prompt encoders) run on
        # virtual tokens only: no padding to drop there.
        inner = {id(m) for m in self.base.modules()}
        self.unmasked = {name for name, m in model.named_modules() if id(m) not in inner}

    # hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        for name, module in self.model.named_modules():
            kind = module_kind(module)
            if kind is not None:
                self.handles.append(module.register_forward_hook(partial(self._on_leaf, name, kind)))
            elif next(module.children(), None) is None and any(True for _ in module.parameters(recurse=False)):
                if not isinstance(module, nn.Dropout):
                    self.skipped.add(f"{name} ({type(module).__name__})")
        if not self.cfg.count_attention:
            return
        modules = dict(self.model.named_modules())
        for parent_name, parent, spec in _attention_triples(self.model):
            if isinstance(spec, str):
                self.handles.append(modules[spec].register_forward_hook(
                    partial(self._on_fused_qkv, parent_name, parent)))
            else:
                for role, path in spec.items():
                    self.handles.append(modules[path].register_forward_hook(
                        partial(self._on_qkv, parent_name, parent, role)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.pending.clear()

    def _defer(self, name: str, kind: str, counts: OpCounts) -> None:
        """Record ``counts`` (fields may be 0-d tensors) when the batch ends (:meth:`_flush`)."""
        self.pending_counts.append((name, kind, counts))

    def _flush(self) -> None:
        tensors = [(c, f.name) for _, _, c in self.pending_counts for f in fields(c)
                   if isinstance(getattr(c, f.name), torch.Tensor)]
        if tensors:
            device = getattr(*tensors[0]).device  # all 0-d int64 counts; moved only off another device
            values = torch.stack([getattr(c, f).to(device) for c, f in tensors]).tolist()
            for (c, f), value in zip(tensors, values):
                setattr(c, f, int(value))
        for name, kind, c in self.pending_counts:
            self._record(name, kind, c)
        self.pending_counts.clear()

    def _record(self, name: str, kind: str, counts: OpCounts) -> None:
        if name not in self.counts:
            self.counts[name] = (kind, OpCounts())
        self.counts[name][1].add(counts)
        self.batch_counts.setdefault(name, OpCounts()).add(counts)
        self.calls[name] = self.calls.get(name, 0) + 1

    # zero tests ----------------------------------------------------------------------------
    def _nz(self, t: torch.Tensor) -> torch.Tensor:
        return t.abs() > self.cfg.zero_threshold

    def _nz_act(self, t: torch.Tensor) -> torch.Tensor:
        return self._nz(t) if self.cfg.skip_zero_activations else torch.ones_like(t, dtype=torch.bool)

    def _nz_weight(self, t: torch.Tensor) -> torch.Tensor:
        return self._nz(t) if self.cfg.skip_zero_weights else torch.ones_like(t, dtype=torch.bool)

    def _rows(self, name: str, t: torch.Tensor, feature_dim: bool = True) -> torch.Tensor:
        """``t`` flattened to (rows, features) keeping only real-token rows."""
        if feature_dim and t.dim() >= 1:
            lead, flat = tuple(t.shape[:-1]), t.reshape(-1, t.shape[-1])
        else:
            lead, flat = tuple(t.shape), t.reshape(-1, 1)
        mask = None if name in self.unmasked else self.masks.for_module(name)
        key = (id(mask), lead)
        if key not in self.keep_cache:  # once per batch and shape; None when every row is real
            keep = TokenMasks.align(lead, mask)
            self.keep_cache[key] = None if keep is None or bool(keep.all()) else keep.to(flat.device)
        keep = self.keep_cache[key]
        return flat if keep is None else flat[keep]

    def _activation(self, name: str, t: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """(real-token rows, features, non-zero entries per feature) of an activation. One tensor
        feeds several modules (a linear's output its activation, a norm's output q, k and v): the
        last few counts are kept with the tensors they were taken of, so no address is reused
        while kept (in-place writes change ``_version``)."""
        mask = None if name in self.unmasked else self.masks.for_module(name)
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t._version, t.dtype, id(mask))
        if key in self.recent:
            return self.recent[key][1]
        rows = self._rows(name, t)
        per_feature = self._nz(rows).sum(dim=0) if self.cfg.skip_zero_activations else \
            torch.full((rows.shape[1],), rows.shape[0], dtype=torch.int64, device=t.device)
        counts = (rows.shape[0], rows.shape[1], per_feature)
        self.recent[key] = (t, counts)
        if len(self.recent) > 8:
            self.recent.pop(next(iter(self.recent)))
        return counts

    def _weights(self, name: str, module: nn.Module, kind: str, n_in: int = 0, n_out: int = 0) -> tuple:
        """(parameter values read by one call, non-zero ones, non-zero weights per input feature —
        ``None`` for norms and for weights that cannot be inspected) of a layer, counted once."""
        key = tuple((p.data_ptr(), p._version) for p in module.parameters(recurse=False))
        cached = self.weight_stats.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        w = _weight_out_in(module, n_in, n_out) if kind == "linear" else None
        if kind == "linear" and w is None:  # weights not inspectable: counted as dense
            bias = getattr(module, "bias", None)
            total = nz = n_out * n_in + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
        else:
            tensors = [w if pname == "weight" and w is not None else p.detach()
                       for pname, p in module.named_parameters(recurse=False)]
            total, nz = sum(t.numel() for t in tensors), sum(int(self._nz_weight(t).sum()) for t in tensors)
        stats = (total, nz, None if w is None else self._nz_weight(w).sum(dim=0).to(torch.int64))
        self.weight_stats[name] = (key, stats)
        return stats

    def _on_leaf(self, name, kind, module, inputs, output) -> None:
        x = _first_tensor(inputs)
        y = _first_tensor(output)
        if x is None or y is None:
            return
        x, y = x.detach(), y.detach()
        c = OpCounts()
        if kind == "embedding":  # the looked-up rows are read, then written out
            yr, c.inputs = self._rows(name, y), self._rows(name, x, feature_dim=False).numel()
            nz, c.params, c.outputs, c.inputs_nz = self._nz(yr).sum(), yr.numel(), yr.numel(), c.inputs
            c.params_nz = nz if self.cfg.skip_zero_weights else c.params
            c.outputs_nz = nz if self.cfg.skip_zero_activations else c.outputs
            self._defer(name, kind, c)
            return
        rows, n_in, per_feature = self._activation(name, x)  # non-zero inputs per input feature
        out_rows, n_out, out_nz = self._activation(name, y)
        c.inputs, c.inputs_nz = rows * n_in, per_feature.sum()
        c.outputs, c.outputs_nz = out_rows * n_out, out_nz.sum()
        if kind == "linear":
            c.params, c.params_nz, col_nz = self._weights(name, module, kind, n_in, n_out)
            if col_nz is None:  # weights not inspectable: counted as dense
                self.opaque.add(f"{name} ({type(module).__name__}: weights counted as dense)")
                col_nz = torch.full((n_in,), n_out, dtype=torch.int64, device=x.device)
            c.macs = rows * n_out * n_in
            c.macs_nz = (per_feature * col_nz.to(per_feature.device)).sum()  # exact in int64
        elif kind == "norm":
            c.params, c.params_nz, _ = self._weights(name, module, kind)
            c.ops = c.ops_nz = self.cfg.norm_ops_per_element * c.inputs
        else:  # activation
            c.ops, c.ops_nz = c.inputs, c.inputs_nz
        self._defer(name, kind, c)

    # attention ---------------------------------------------------------------------------
    def _on_qkv(self, parent_name, parent, role, module, inputs, output) -> None:
        t = _first_tensor(output)
        if t is None:
            return
        slot = self.pending.setdefault(parent_name, {})
        slot[role] = t.detach()
        if len(slot) == 3:
            del self.pending[parent_name]
            self._attention(parent_name, parent, slot["q"], slot["k"], slot["v"])

    def _on_fused_qkv(self, parent_name, parent, module, inputs, output) -> None:
        t = _first_tensor(output)
        if t is None or t.shape[-1] % 3:
            return
        q, k, v = t.detach().split(t.shape[-1] // 3, dim=-1)
        self._attention(parent_name, parent, q, k, v)

    def _as_bpf(self, t: torch.Tensor, batch: int | None) -> torch.Tensor:
        if t.dim() == 3:
            return t
        if t.dim() == 2:  # (B·T, F)
            rows = batch or 1
            return t.reshape(rows, -1, t.shape[-1]) if t.shape[0] % rows == 0 else t.unsqueeze(0)
        return t.reshape(t.shape[0], -1, t.shape[-1])

    def _attention(self, name: str, parent: nn.Module, q, k, v) -> None:
        q_mask_full = self.masks.for_module(name)
        batch = q_mask_full.shape[0] if q_mask_full is not None else None
        q, k, v = (self._as_bpf(t, batch) for t in (q, k, v))
        if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
            return
        cross = bool(_CROSS_NAME.search(name)) or (q.shape[1] != k.shape[1] and not getattr(parent, "is_causal", False))
        k_mask_full = self.masks.cross_keys() if cross else q_mask_full
        causal = getattr(parent, "is_causal", None)
        if not isinstance(causal, bool):
            causal = self._default_causal(name)
        causal = causal and not cross
        dev = q.device
        qm = self.masks.align_2d(tuple(q.shape[:2]), q_mask_full).to(dev)
        km = self.masks.align_2d(tuple(k.shape[:2]), k_mask_full).to(dev)
        fq, fk, fv = q.shape[-1], k.shape[-1], v.shape[-1]
        d_head = _head_dim(parent, self.model_config, fq)
        if fk % d_head or fq % fk:
            d_head = fk  # unknown layout: treat K as one group shared by all query features
        n_kv = fk // d_head
        group = fq // fk
        heads = fq // d_head
        f64 = torch.float64
        qn = (self._nz_act(q) & qm[..., None]).to(f64).reshape(*q.shape[:2], n_kv, group, d_head)
        kn = (self._nz_act(k) & km[..., None]).to(f64).reshape(*k.shape[:2], n_kv, 1, d_head)
        vn = (self._nz_act(v) & km[..., None]).to(f64)
        qmf, kmf = qm.to(f64), km.to(f64)
        tq, tk = q.shape[1], k.shape[1]
        if causal:
            offset = tk - tq  # query i sits at key position offset + i
            if offset < 0:
                return
            keys_seen = kmf.cumsum(dim=1)[:, offset:]  # (B, Tq): real keys at or before the query
            pairs = float((qmf * keys_seen).sum())
            qk_nz = float((qn * kn.cumsum(dim=1)[:, offset:]).sum())
            q_pad = torch.zeros_like(kmf)
            q_pad[:, offset:] = qmf
            queries_after = q_pad.flip(1).cumsum(1).flip(1)  # (B, Tk): real queries that see key j
            av_nz = float((queries_after * vn.sum(dim=-1)).sum()) * group
        else:
            pairs = float((qmf.sum(1) * kmf.sum(1)).sum())
            qk_nz = float((qn.sum(dim=1) * kn.sum(dim=1)).sum())
            av_nz = float((qmf.sum(1) * vn.sum(dim=(1, 2))).sum()) * group
        n_q, n_k = int(qm.sum()), int(km.sum())
        qk = OpCounts(
            inputs=n_q * fq + n_k * fk, inputs_nz=int(qn.sum()) + int(kn.sum()),
            outputs=int(pairs) * heads, outputs_nz=int(pairs) * heads,
            macs=int(pairs) * fq, macs_nz=int(round(qk_nz)))
        av = OpCounts(
            inputs=int(pairs) * heads + n_k * fv, inputs_nz=int(pairs) * heads + int(vn.sum()),
            outputs=n_q * fv * group, outputs_nz=n_q * fv * group,
            macs=int(pairs) * fv * group, macs_nz=int(round(av_nz)))
        self._defer(f"{name}:qk", "attention_qk", qk)
        self._defer(f"{name}:av", "attention_av", av)

    def _default_causal(self, name: str) -> bool:
        cfg = self.model_config
        if cfg is None:
            return False
        if getattr(cfg, "is_encoder_decoder", False):
            return in_decoder(name)
        if getattr(cfg, "is_decoder", False):
            return True
        can_generate = getattr(self.base, "can_generate", None)
        return bool(callable(can_generate) and can_generate())

    # driving -----------------------------------------------------------------------------
    def run_batch(self, batch) -> float | None:
        self.masks = TokenMasks.from_batch(self.model, batch)
        self.pending.clear()
        self.pending_counts.clear()
        self.keep_cache.clear()
        self.recent.clear()
        self.batch_counts = {}
        call_model(self.model, batch)
        self.pending.clear()
        self._flush()
        m = self.masks.encoder
        if m is not None:
            self.tokens += int(m.sum())
            if self.masks.encdec and self.masks.decoder is not None:
                self.tokens += int(self.masks.decoder.sum())
        dense = sum(c.dense_energy(self.cfg) for c in self.batch_counts.values())
        sparse = sum(c.sparse_energy(self.cfg) for c in self.batch_counts.values())
        return sparse / dense if dense else None

    def report(self, batch_ratios: list[float], n_batches: int) -> EnergyReport:
        rows = []
        for name, (kind, c) in self.counts.items():
            dense, sparse = c.dense_energy(self.cfg), c.sparse_energy(self.cfg)
            row = {"name": name, "kind": kind, "calls": self.calls[name], "dense": dense, "sparse": sparse,
                   "ratio": sparse / dense if dense else 1.0}
            row.update({f"n_{f.name}": getattr(c, f.name) for f in fields(c)})
            rows.append(row)
        return EnergyReport(
            dense_energy=sum(r["dense"] for r in rows), sparse_energy=sum(r["sparse"] for r in rows),
            per_layer=rows, batch_ratios=batch_ratios, tokens=self.tokens, batches=n_batches,
            skipped=sorted(self.skipped | self.opaque), config=self.cfg)


def estimate_energy(model: nn.Module, batches: Iterable, config: EnergyConfig | None = None) -> EnergyReport:
    """Run ``model`` (eval mode, no grad) over ``batches`` and estimate the energy of a dense and
    a zero-skipping ASIC.

    ``batches`` yields tokenized inputs: dicts passed as ``model(**batch)`` (with
    ``attention_mask`` for padded batches; labels are passed through, encoder–decoder models
    need them or decoder inputs), or tensors/tuples passed positionally (no padding then). All
    hooks are removed and the training mode restored afterwards.
    """
    cfg = config if config is not None else EnergyConfig()
    refuse_routed(model, "the energy model (it counts dense layers; the ratio would leave the experts out)")
    est = _Estimator(model, cfg)
    device = model_device(model)
    was_training = {m: m.training for m in model.modules()}
    ratios: list[float] = []
    n_batches = 0
    model.eval()
    try:
        est.attach()
        with torch.no_grad():
            for batch in batches:
                ratio = est.run_batch(move_batch(batch, device))
                n_batches += 1
                if ratio is not None:
                    ratios.append(ratio)
    finally:
        est.detach()
        for m, flag in was_training.items():
            m.training = flag
    return est.report(ratios, n_batches)


__all__ = [
    "EnergyConfig", "EnergyReport", "OpCounts", "TokenMasks", "estimate_energy", "energy_change",
    "SPONGE_MEMORY_PJ", "SPONGE_COMPUTE_PJ", "SPONGE_ZERO_THRESHOLD_FP32", "HOROWITZ_45NM_PJ", "KINDS",
]
