"""The sparse MLP for one decoding token on a CUDA GPU, in Triton (TEAL's split-K GEMV design).

The same math as the CPU kernel (:mod:`~deft.deploy.sparse_kernel`), for one token x (d,) and the
activation vector a (h,) over the active set S = {i : not |a_i| ≤ τ}:
v_i = a_i · (W_up[i]·x + b_up[i]) (gated) or a_i (plain) for i ∈ S, 0 elsewhere; y = b_down + W_downᵀᵀ v.

Two kernels. ``_up``: one program per block of neurons; the W_up rows of inactive neurons are
masked out of the loads, so their memory is never read. ``_down``: the down projection as a
split-K GEMV over W_downᵀ (h, d_out), TEAL's layout: a grid of (output blocks × K splits), each
program sums its share of neurons for its output block, skipping (masking) the rows with
v_i = 0, and adds its partial sum into y with an atomic add — many programs per output block
keep the GPU busy at batch 1, where one program per output block would leave it idle.
Accumulation in float32 whatever the weights' dtype (float32, float16, bfloat16).

Hand-written because no maintained library has it: TEAL's and Deja Vu's kernels live in their
research repositories, not in a package, and torch has no masked GEMV. Triton is imported on
first use; :func:`unavailable_reason` says why the path cannot run (no Triton, no CUDA device).
With ``TRITON_INTERPRET=1`` Triton runs the kernels on CPU tensors (how the tests check them
where no GPU is).
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["triton_sparse_mlp", "unavailable_reason", "interpreting"]

_KERNELS: dict = {}
BLOCK_H, BLOCK_D, BLOCK_K, BLOCK_N = 32, 64, 32, 64


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the Triton path cannot run for tensors on ``device`` (None: it can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; it comes with CUDA builds of torch)"
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    return None if interpreting() else f"Triton kernels need a CUDA device (tensors are on {kind}; " \
                                       "TRITON_INTERPRET=1 runs them on the CPU, slowly, for checking)"


def _kernels():
    """The kernels' module, imported on first use (Triton is optional, and it reads
    ``TRITON_INTERPRET`` when the kernels are defined)."""
    if not _KERNELS:
        from . import triton_kernels

        _KERNELS.update(up=triton_kernels.sparse_up, down=triton_kernels.split_k_down, cdiv=triton_kernels.triton.cdiv)
    return _KERNELS


def triton_sparse_mlp(x: torch.Tensor, a: torch.Tensor, tau: float, down_weight_t: torch.Tensor,
                      down_bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                      up_bias: torch.Tensor | None = None, *, split_k: int | None = None) -> torch.Tensor:
    """``y`` (d_out,) for one token: arguments as :func:`deft.deploy.sparse_kernel.sparse_mlp_forward`
    (contiguous tensors on one CUDA device, or on the CPU under ``TRITON_INTERPRET=1``). ``split_k``:
    K splits of the down GEMV (default: enough programs to fill the device)."""
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)
    k = _kernels()
    h, d, d_out = a.numel(), x.numel(), down_weight_t.shape[1]
    x, a = x.reshape(-1).contiguous(), a.reshape(-1).contiguous()
    v = torch.empty(h, dtype=torch.float32, device=x.device)
    dummy = v  # a pointer for absent tensors (never read: the constexpr flags drop those loads)
    k["up"][(k["cdiv"](h, BLOCK_H),)](x, a, up_weight.contiguous() if up_weight is not None else dummy,
                                      up_bias.contiguous() if up_bias is not None else dummy, v, float(tau), h, d,
                                      HAS_UP=up_weight is not None, HAS_BIAS=up_bias is not None, BH=BLOCK_H,
                                      BD=BLOCK_D)
    y = (down_bias.float().clone() if down_bias is not None
         else torch.zeros(d_out, dtype=torch.float32, device=x.device))
    n_blocks = k["cdiv"](d_out, BLOCK_N)
    if split_k is None:  # about 4 programs per SM (TEAL's heuristic); one split under the interpreter
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split_k = max(1, min(k["cdiv"](h, BLOCK_K), 4 * sms // n_blocks))
    per_split = k["cdiv"](k["cdiv"](h, split_k), BLOCK_K) * BLOCK_K
    k["down"][(n_blocks, k["cdiv"](h, per_split))](v, down_weight_t.contiguous(), y, h, d_out, K_SPLIT=per_split,
                                                   BK=BLOCK_K, BN=BLOCK_N)
    return y.to(x.dtype)
