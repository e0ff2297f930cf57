"""The fused sparse MLP kernel for one decoding token on CPU, and its pure-PyTorch fallback.

For one token x (d,) and the activation vector a = σ(first(x)) (h,), computed densely by PyTorch,
the kernel computes, over the active set S = {i : not |a_i| ≤ τ} (the rule of
:class:`~deft.core.thresholds.ThresholdedActivation`):

* gated MLP: y = b_down + Σ_{i∈S} a_i (W_up[i]·x + b_up[i]) · W_downᵀ[i]
* plain MLP: y = b_down + Σ_{i∈S} a_i · W_downᵀ[i]

reading only the |S| active rows of W_up (h, d) and W_downᵀ (h, d_out, stored transposed so each
active row is contiguous). Written by hand because no maintained library offers it: PyTorch's
sparse tensors and ``torch.sparse.mm`` want a fixed sparse *weight* (not a per-token activation
mask) and build index structures per call; oneDNN/MKL have no masked GEMV; the activation-sparsity
kernels that exist (DejaVu, TEAL, PowerInfer) are CUDA or llama.cpp code, not a PyTorch CPU op.

The C++ source (``csrc/sparse_mlp.cpp``) is compiled at first use and cached by
:mod:`~deft.deploy.native` (``$DEFT_CACHE/torch_extensions/deft_sparse_mlp_<hash>``); without a
compiler, or when the build fails, :func:`sparse_mlp_forward` uses :func:`sparse_mlp_fallback`
(the same math with ``index_select`` + matmul) after a one-line notice on stderr.

``$DEFT_SPARSE_KERNEL`` (``auto`` / ``compiled`` / ``fallback``) overrides ``backend="auto"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch

from . import native
from .native import KernelUnavailable, extensions_root

SOURCE = Path(__file__).with_name("csrc") / "sparse_mlp.cpp"
BACKEND_ENV = "DEFT_SPARSE_KERNEL"
BACKENDS = ("auto", "compiled", "fallback")
WHAT = "sparse MLP kernel"
_STATE: dict = {}  # the process's compiled module (or None) and why not

__all__ = ["KernelUnavailable", "extensions_root", "extension_name", "build_kernel", "compiled_kernel",
           "kernel_unavailable_reason", "resolve_backend", "sparse_mlp_fallback", "sparse_mlp_forward"]


def extension_name() -> str:
    """The extension's name: versioned by everything the built library depends on."""
    return native.extension_name("deft_sparse_mlp", SOURCE)


def build_kernel(root: Path | None = None) -> ModuleType:
    """The compiled kernel module: a finished cached build if there is one, else built now (a
    build that fails is removed and tried once more). Raises :class:`KernelUnavailable`."""
    return native.build_extension(extension_name(), SOURCE, WHAT, root)


def compiled_kernel() -> ModuleType | None:
    """The process's compiled kernel, built at first call; None (after a one-line notice on
    stderr) where it cannot be built."""
    return native.compiled_or_none(_STATE, build_kernel, WHAT)


def kernel_unavailable_reason() -> str | None:
    """Why :func:`compiled_kernel` gave None (None when it was built or not yet tried)."""
    return _STATE.get("reason")


def resolve_backend(backend: str = "auto") -> str:
    """``compiled`` or ``fallback``: what a call with ``backend`` runs here."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "fallback":
        return "fallback"
    if backend == "compiled":
        if compiled_kernel() is None:
            raise KernelUnavailable(kernel_unavailable_reason() or "the compiled kernel is not available")
        return "compiled"
    return "compiled" if compiled_kernel() is not None else "fallback"


def sparse_mlp_fallback(x: torch.Tensor, a: torch.Tensor, tau: float, down_weight_t: torch.Tensor,
                        down_bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                        up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in PyTorch: gather the active rows (``index_select``), then matmul."""
    active = (~(a.abs() <= tau)).nonzero().squeeze(1)
    v = a.index_select(0, active)
    if up_weight is not None:
        u = up_weight.index_select(0, active) @ x
        if up_bias is not None:
            u = u + up_bias.index_select(0, active)
        v = v * u
    y = v @ down_weight_t.index_select(0, active)
    return y + down_bias if down_bias is not None else y


def sparse_mlp_forward(x: torch.Tensor, a: torch.Tensor, tau: float, down_weight_t: torch.Tensor,
                       down_bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                       up_bias: torch.Tensor | None = None, *, backend: str = "auto",
                       threads: int | None = None) -> torch.Tensor:
    """One token through an MLP block: ``y`` (d_out,) from ``x`` (d,) and ``a`` (h,) — see the
    module docstring. ``down_weight_t`` is W_downᵀ (h, d_out); ``up_weight`` (h, d) only for gated
    MLPs. The compiled kernel needs contiguous float32 CPU tensors; ``threads``: OpenMP threads
    (default: ``torch.get_num_threads()``, one thread for tiny problems)."""
    if resolve_backend(backend) == "fallback":
        return sparse_mlp_fallback(x, a, tau, down_weight_t, down_bias, up_weight, up_bias)
    return _STATE["module"].forward(x, a, float(tau), down_weight_t, down_bias, up_weight, up_bias,
                                    int(threads) if threads else 0)
