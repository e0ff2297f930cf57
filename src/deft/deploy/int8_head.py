"""An int8 weight-only LM head for batch-1 decoding on CPU, with the float32 argmax kept exact.

In a small decoder the output projection is the biggest matrix a token reads (Gemma 3 270M's
tied head is 262,144 × 640: about half of a decoding step). :class:`Int8LMHead` stores it as int8
with one scale per row (s_j = max|w_j| / 127) and, for one token, multiplies the float32 input by
the rows dequantised on the fly (``csrc/int8_head.cpp``): a quarter of the bytes to read.

``exact_argmax`` (default): rounding moves each weight by at most s_j / 2, so an int8 logit lies
within e_j = s_j / 2 · ‖x‖₁ of the float32 one. Every row whose interval can still reach the best
lower bound maxᵢ(approxᵢ − eᵢ) is recomputed from the float32 weights; the others provably lose.
The greedy token is then the float32 model's, and the logits of every row that could win are
float32 logits; the rest are int8 approximations (fine for greedy decoding and top-k sampling
with the winners among them, not a replacement for the full float32 distribution). It keeps a
reference to the float32 weight — free for tied heads (the embedding holds it anyway); with
``exact_argmax=False`` an untied head's float32 weight can be dropped.

Anything but one float32 CPU token without autograd (prefill of several positions, batches,
training) takes the float32 path, ``F.linear`` with the original weight: the same logits as the
model without the swap. Without a compiler the kernel is replaced by that path after a one-line
notice (same answers, no speed-up).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import unwrap_model
from . import native

SOURCE = Path(__file__).with_name("csrc") / "int8_head.cpp"
WHAT = "int8 LM head kernel"
_STATE: dict = {}
_QUANTISE_ROWS = 16384  # rows quantised per chunk: bounds the float32 temporaries to ~40 MiB at d 640

__all__ = ["Int8LMHead", "quantize_lm_head", "quantize_rows", "build_kernel", "compiled_kernel"]


def extension_name() -> str:
    return native.extension_name("deft_int8_head", SOURCE)


def build_kernel(root: Path | None = None) -> ModuleType:
    """The compiled kernel (cached build or built now); raises :class:`~deft.deploy.native.KernelUnavailable`."""
    return native.build_extension(extension_name(), SOURCE, WHAT, root)


def compiled_kernel() -> ModuleType | None:
    return native.compiled_or_none(_STATE, build_kernel, WHAT)


@torch.no_grad()
def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 (V, d), scale float32 (V,))`` with q = round(w / s) and s = max|w_row| / 127 (1 for an
    all-zero row), so |w − s·q| ≤ s / 2 element-wise."""
    weight = weight.detach().float()
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for lo in range(0, weight.shape[0], _QUANTISE_ROWS):
        rows = weight[lo:lo + _QUANTISE_ROWS]
        s = rows.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[lo:lo + _QUANTISE_ROWS] = torch.round(rows / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[lo:lo + _QUANTISE_ROWS] = s
    return q, scale


class Int8LMHead(nn.Module):
    """An ``nn.Linear`` output projection as int8 rows for one decoding token (see the module
    docstring). ``last_recomputed``: rows recomputed in float32 on the last kernel call."""

    def __init__(self, linear: nn.Linear, exact_argmax: bool = True, threads: int | None = None):
        super().__init__()
        if type(linear) is not nn.Linear:
            raise ValueError(f"the LM head is a {type(linear).__name__}; Int8LMHead takes a plain nn.Linear "
                             "(merge adapters first)")
        if linear.weight.dtype != torch.float32:
            raise ValueError(f"the LM head holds {linear.weight.dtype} weights; Int8LMHead needs float32")
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.weight = linear.weight  # shared, not copied (a tied head's embedding holds it anyway)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.exact_argmax = bool(exact_argmax)
        self.threads = threads
        self.last_recomputed: int | None = None

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        return (x.numel() == self.in_features and x.device.type == "cpu" and x.dtype == torch.float32
                and not (torch.is_grad_enabled() and x.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = compiled_kernel() if self._kernel_applies(x) else None
        if module is None:
            return F.linear(x, self.weight, self.bias)
        bias = self.bias.detach().contiguous() if self.bias is not None else None
        weight = self.weight.detach() if self.exact_argmax else None
        y, self.last_recomputed = module.forward(x.reshape(-1).contiguous(), self.q, self.scale, weight, bias,
                                                 int(self.threads or 0))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 rows, exact_argmax={self.exact_argmax}"


def quantize_lm_head(model: nn.Module, exact_argmax: bool = True) -> Int8LMHead:
    """Replace ``model``'s output embeddings (its LM head) by an :class:`Int8LMHead`, in place; returns
    the new head. ValueError where the model has no ``nn.Linear`` output projection."""
    base = unwrap_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (LM head) to quantise")
    if isinstance(head, Int8LMHead):
        return head
    new = Int8LMHead(head, exact_argmax=exact_argmax)
    base.set_output_embeddings(new)
    return new
