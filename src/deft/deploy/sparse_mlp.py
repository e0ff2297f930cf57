"""A model's MLP blocks as sparse MLPs for batch-1 decoding on CPU: the speed half of DEFT.

:class:`SparseMLP` stands in for one MLP block. One new token of one sequence (the input's leading
dims multiply to 1, float32 on CPU, no gradient wanted) goes through the fused kernel of
:mod:`~deft.deploy.sparse_kernel`: only the weight rows of active units (|a_i| > τ) are read.
Anything else — prefill, batches, other dtypes or devices, autograd — takes the dense path with the
same threshold, which is the same math.

Two threshold points, as :mod:`deft.core.thresholds` has them. ``act`` (CATS): τ on the gate
σ(first(x)); the kernel then reads only the active rows of W_up and W_downᵀ (a gated block costs
1 + 2d of its dense weight reads at density d). ``product`` (``--point product``): τ on the gated
product σ(first(x)) ⊙ up(x), the down projection's input; gate and up stay dense and only the
down projection is sparse (2 + d of 3). The product point keeps far more of a gated model's
quality at the same density (Gemma 3 270M: docs/results.md), which is why it is worth its lower
ceiling, 3 / (2 + d).

What is covered: a block whose forward is ``down(act(first(x)) [* mult(x)])`` (the site table's
``first`` / ``act`` / ``mult`` / ``down``, all children of one block module), each projection an
``nn.Linear`` or GPT-2's ``Conv1D``, with or without bias — LLaMA/Mistral/Qwen/Gemma MLPs, GPT-2's
MLP, T5's DenseReluDense (plain and gated), ViT's MLP. Dropout children are allowed and dropped:
SparseMLP is the inference form (dropout is the identity in eval). Refused with a ValueError: a
block with any other child, projections split over two modules (BERT's intermediate / output),
an MLP held directly by the decoder layer (OPT), LoRA- / adapter-wrapped or 4-bit layers (merge
or dequantise first, e.g. :func:`~deft.deploy.export.prepare_for_inference`). Each block is also
checked numerically against its own forward when it is converted (``verify``), so a family whose
MLP does more than this is refused instead of silently changed.

A SparseMLP's parameters have new names (``first_weight``, ``down_weight_t``, ...): it is a
runtime form, built after loading, not saved with ``save_pretrained``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import dense_layer, is_conv1d, set_module, unwrap_model, weight_out_in
from ..core.sites import UnsupportedModelError, find_sites, require_dense
from ..core.thresholds import InputThreshold, Thresholds, ThresholdedActivation
from . import sparse_kernel, triton_mlp

__all__ = ["SparseMLP", "sparsify_mlps", "BACKENDS"]
#: ``auto``: the C++ kernel on CPU, Triton on CUDA (dense where neither can run); ``compiled`` /
#: ``fallback``: the C++ kernel or its PyTorch fallback; ``triton``: the Triton kernels, also for
#: CPU tensors under ``TRITON_INTERPRET=1`` (checking only).
BACKENDS = (*sparse_kernel.BACKENDS, "triton")
_NOTICES: set[str] = set()


def _dense_weights(role: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias)`` of a plain Linear / Conv1D layer; ValueError for anything else."""
    if dense_layer(layer) is not layer:
        raise ValueError(f"the MLP's {role} layer is wrapped ({type(layer).__name__}, e.g. LoRA or an adapter): "
                         "merge it first (deft.deploy.export.prepare_for_inference)")
    if not (type(layer) is nn.Linear or is_conv1d(layer)):
        raise ValueError(f"the MLP's {role} layer is a {type(layer).__name__}: SparseMLP takes nn.Linear or "
                         "GPT-2's Conv1D (dequantise 4-bit layers first)")
    if not layer.weight.is_floating_point():
        raise ValueError(f"the MLP's {role} layer holds {layer.weight.dtype} weights; SparseMLP needs float weights")
    bias = getattr(layer, "bias", None)
    return weight_out_in(layer), (bias.data if bias is not None else None)


def _frozen(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.contiguous(), requires_grad=False)


class SparseMLP(nn.Module):
    """``down(T_τ(act(first(x))) [* mult(x)])`` with T_τ zeroing |a| ≤ τ; one decoding token
    through the fused sparse kernel, anything else dense (see the module docstring).

    ``first`` / ``down`` / ``mult`` (gated MLPs; None for plain ones): ``nn.Linear`` or ``Conv1D``
    layers; ``act``: the activation module (unwrapped from its ThresholdedActivation: τ is applied
    here). ``backend``: one of :data:`BACKENDS` (see :mod:`~deft.deploy.sparse_kernel`, :mod:`~deft.deploy.triton_mlp`).
    """

    def __init__(self, first: nn.Module, act: nn.Module, down: nn.Module, mult: nn.Module | None = None,
                 tau: float = 0.0, backend: str = "auto", point: str = "act"):
        super().__init__()
        if not tau >= 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if point not in ("act", "product"):
            raise ValueError(f"unknown threshold point {point!r}; choose 'act' or 'product'")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        w1, b1 = _dense_weights("first", first)
        w2, b2 = _dense_weights("down", down)
        h = w1.shape[0]
        if w2.shape[1] != h:
            raise ValueError(f"down layer takes {w2.shape[1]} inputs, the first layer gives {h}")
        self.first_weight, self.first_bias = _frozen(w1), _frozen(b1)  # (h, d)
        if mult is not None:
            wu, bu = _dense_weights("mult", mult)
            if wu.shape != w1.shape:
                raise ValueError(f"up projection {tuple(wu.shape)} does not match the gate {tuple(w1.shape)}")
            self.up_weight, self.up_bias = _frozen(wu), _frozen(bu)  # (h, d)
        else:
            self.up_weight = self.up_bias = None
        # Transposed and contiguous: an active unit's down weights are one contiguous row.
        self.down_weight_t, self.down_bias = _frozen(w2.t()), _frozen(b2)  # (h, d_out)
        self.act = act
        self.tau = float(tau)
        self.point = point
        self.backend = backend

    @property
    def gated(self) -> bool:
        return self.up_weight is not None

    @classmethod
    def from_block(cls, block: nn.Module, first: str, down: str, act: str, mult: str | None = None,
                   tau: float | None = None, backend: str = "auto", verify: bool = True,
                   point: str | None = None) -> "SparseMLP":
        """The SparseMLP of ``block``, whose children ``first`` / ``act`` / ``mult`` / ``down`` (names)
        are its layers. ``tau`` None: the block's own threshold (its act is a ThresholdedActivation,
        or its down projection has a product threshold), else 0 at ``act`` (exact zeros skipped); a
        given ``tau`` replaces the block's own, at ``point`` (default: the block's own point, else
        ``act``). ``verify``: check the dense math against ``block``'s own forward on a random input
        (ValueError if it differs)."""
        names = {first, down, act} | ({mult} if mult else set())
        children = dict(block.named_children())
        missing = sorted(n for n in names if n not in children)
        if missing:
            raise ValueError(f"{type(block).__name__} has no child {missing} (children: {sorted(children)})")
        extra = {n: type(c).__name__ for n, c in children.items() if n not in names and not isinstance(c, nn.Dropout)}
        if extra:
            raise ValueError(f"{type(block).__name__} holds {extra} besides its MLP layers {sorted(names)}: "
                             "replacing it by a SparseMLP would drop them")
        act_module = children[act]
        own_point, own_tau = "act", 0.0
        product = getattr(children[down], InputThreshold.ATTR, None)
        if product is not None:
            own_point, own_tau = "product", product.tau
        if getattr(act_module, "keep", None) is not None:
            raise ValueError("the block's thresholds carry a neuron mask (--train-density-form neuron): remove those "
                             "neurons with `deft shrink` (a smaller dense model) rather than skipping them per token")
        inner = act_module
        if isinstance(act_module, ThresholdedActivation):
            inner, own_point, own_tau = act_module.inner, "act", act_module.tau
        if tau is not None:
            own_point, own_tau = point or own_point, tau
        sparse = cls(children[first], inner, children[down], children[mult] if mult else None,
                     own_tau, backend, own_point)
        if verify:
            sparse._verify(block, act_module, product)
        return sparse

    @torch.no_grad()
    def _verify(self, block: nn.Module, act_module: nn.Module, product: InputThreshold | None) -> None:
        """The dense math with the block's own activation (and product threshold) equals the block's forward."""
        was_training = block.training
        block.eval()
        try:
            weight = self.first_weight
            x = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
            want = block(x)
            got = self._dense(x, act_module, 0.0, "act") if product is None else \
                self._dense(x, act_module, product.tau, "product")
        finally:
            block.train(was_training)
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            raise ValueError(f"{type(block).__name__}'s forward does not return one tensor of shape {tuple(got.shape)}")
        tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
        diff = float((want.float() - got.float()).abs().max())
        if not diff <= tol * max(1.0, float(want.float().abs().max())):
            raise ValueError(f"{type(block).__name__}'s forward is not down(act(first(x)) [* mult(x)]) "
                             f"(differs by {diff:.3g}); SparseMLP does not cover it")

    def _dense(self, x: torch.Tensor, act: nn.Module, tau: float, point: str) -> torch.Tensor:
        a = act(F.linear(x, self.first_weight, self.first_bias))
        if point == "act":
            a = a.masked_fill(a.abs() <= tau, 0)  # exactly ThresholdedActivation's rule
        if self.up_weight is not None:
            a = a * F.linear(x, self.up_weight, self.up_bias)
        if point == "product":
            a = a.masked_fill(a.abs() <= tau, 0)  # exactly InputThreshold's rule
        return F.linear(a, self.down_weight_t.t(), self.down_bias)

    def _one_token(self, x: torch.Tensor) -> bool:
        return x.dim() >= 1 and x.numel() == x.shape[-1] and not (torch.is_grad_enabled() and x.requires_grad)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        return (self.backend != "triton" and self._one_token(x) and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.first_weight.dtype == torch.float32)

    def _triton_applies(self, x: torch.Tensor) -> bool:
        if not (self._one_token(x) and (x.device.type == "cuda" or self.backend == "triton")):
            return False
        reason = triton_mlp.unavailable_reason(x.device)
        if reason is not None and reason not in _NOTICES:
            _NOTICES.add(reason)
            print(f"deft: sparse MLP on {x.device.type}: dense path ({reason})", file=sys.stderr)
        return reason is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        triton = self._triton_applies(x)
        if not (triton or self._kernel_applies(x)):
            return self._dense(x, self.act, self.tau, self.point)
        row = x.reshape(1, -1)  # the gate as the dense path computes it (same rounding, same mask)
        a = self.act(F.linear(row, self.first_weight, self.first_bias))
        up_weight, up_bias = self.up_weight, self.up_bias
        if self.point == "product" and up_weight is not None:  # the product densely; only down is sparse
            a, up_weight, up_bias = a * F.linear(row, up_weight, up_bias), None, None
        kernel = triton_mlp.triton_sparse_mlp if triton else \
            lambda *args: sparse_kernel.sparse_mlp_forward(*args, backend=self.backend)
        y = kernel(row.reshape(-1).contiguous(), a.reshape(-1).contiguous(), self.tau, self.down_weight_t,
                   self.down_bias, up_weight, up_bias)
        return y.reshape(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        h, d = self.first_weight.shape
        return (f"d={d}, h={h}, d_out={self.down_weight_t.shape[1]}, gated={self.gated}, tau={self.tau:.6g}, "
                f"point={self.point}, backend={self.backend}")


def _site_taus(thresholds_or_tau, sites, point: str) -> tuple[dict[str, float], str]:
    """(act site path → explicit τ, the point it applies at); empty: every site keeps its model's own
    threshold. A mapping is keyed as :class:`~deft.core.thresholds.Thresholds` keys it: by the
    activation's path at ``act``, by the down projection's at ``product``."""
    if thresholds_or_tau is None:
        return {}, point
    if isinstance(thresholds_or_tau, Thresholds):
        thresholds_or_tau, point = thresholds_or_tau.taus, thresholds_or_tau.point
    if point not in ("act", "product"):
        raise ValueError(f"unknown threshold point {point!r}; choose 'act' or 'product'")
    if isinstance(thresholds_or_tau, Mapping):
        key = {(s.module if point == "act" else s.down): s.module for s in sites}
        unknown = sorted(set(thresholds_or_tau) - set(key))
        if unknown:
            raise ValueError(f"thresholds for {unknown[:3]} do not fit this model (its {point} sites: "
                             f"{sorted(key)[:3]} ...)")
        return {key[k]: float(v) for k, v in thresholds_or_tau.items()}, point
    return {s.module: float(thresholds_or_tau) for s in sites}, point


def _relative(block_path: str, path: str | None, role: str, site) -> str | None:
    if path is None:
        return None
    parent, _, name = path.rpartition(".")
    if parent != block_path:
        raise ValueError(f"site {site.module}: its {role} layer {path} is not a child of the MLP block {block_path} "
                         f"(family {site.family}: the MLP is not one module SparseMLP could replace)")
    return name


def sparsify_mlps(model: nn.Module, thresholds_or_tau: Thresholds | Mapping[str, float] | float | None = None, *,
                  point: str = "act", backend: str = "auto", verify: bool = True) -> nn.Module:
    """Replace every MLP block of ``model`` (the parent of each site's first/down layers) by a
    :class:`SparseMLP` (in place; returns ``model``).

    τ per site: from ``thresholds_or_tau`` — a :class:`~deft.core.thresholds.Thresholds`, a dict
    site path → τ, or one τ for every site, at ``point`` (a Thresholds carries its own) — where it
    names the site, else the model's own threshold on that site (a ``ThresholdedActivation`` or a
    product threshold: ``apply_thresholds`` / a loaded run), else 0 (only exact zeros skipped, e.g.
    after ReLU-fication). Every block is checked before any is replaced,
    so a refused model is left as it was."""
    base = unwrap_model(model)
    sites = find_sites(model, "act")
    taus, point = _site_taus(thresholds_or_tau, sites, point)
    replacements = []
    for site in sites:
        require_dense(site, "the sparse MLP kernel")
        if site.fused:
            raise UnsupportedModelError(f"the sparse MLP kernel needs separate gate and up layers; {site.first} holds "
                                        "both as halves of one fused layer")
        block_path = site.first.rpartition(".")[0]
        names = {role: _relative(block_path, path, role, site)
                 for role, path in (("first", site.first), ("down", site.down), ("mult", site.mult),
                                    ("act", site.module))}
        block = base.get_submodule(block_path)
        sparse = SparseMLP.from_block(block, names["first"], names["down"], names["act"], names["mult"],
                                      tau=taus.get(site.module), backend=backend, verify=verify,
                                      point=point if site.module in taus else None)
        replacements.append((block_path, sparse))
    for block_path, sparse in replacements:
        set_module(base, block_path, sparse)
    return model
