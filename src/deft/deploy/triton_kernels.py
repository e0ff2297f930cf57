"""The Triton kernels of :mod:`deft.deploy.triton_mlp` (imported only there, on first use: this
module needs Triton). Defined at module level because Triton's interpreter resolves ``tl`` through
the kernel's globals."""

import triton
import triton.language as tl


@triton.jit
def sparse_up(x_ptr, a_ptr, wu_ptr, bu_ptr, v_ptr, tau, h, d,
              HAS_UP: tl.constexpr, HAS_BIAS: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """v = a ⊙ (W_up x + b_up) (gated) or a (plain) on the active neurons, 0 elsewhere; one program
    per BH neurons, the inactive rows of W_up masked out of the loads."""
    rows = tl.program_id(0) * BH + tl.arange(0, BH)
    in_range = rows < h
    a = tl.load(a_ptr + rows, mask=in_range, other=0.0).to(tl.float32)
    active = (~(tl.abs(a) <= tau)) & in_range  # ThresholdedActivation's rule: NaN stays active
    if HAS_UP:
        acc = tl.zeros([BH], dtype=tl.float32)
        for start in range(0, d, BD):
            cols = start + tl.arange(0, BD)
            w = tl.load(wu_ptr + rows[:, None] * d + cols[None, :], mask=active[:, None] & (cols[None, :] < d),
                        other=0.0)
            xv = tl.load(x_ptr + cols, mask=cols < d, other=0.0)
            acc += tl.sum(w.to(tl.float32) * xv[None, :].to(tl.float32), axis=1)
        if HAS_BIAS:
            acc += tl.load(bu_ptr + rows, mask=active, other=0.0).to(tl.float32)
        a = a * acc
    tl.store(v_ptr + rows, tl.where(active, a, 0.0), mask=in_range)


@triton.jit
def split_k_down(v_ptr, wt_ptr, y_ptr, h, d_out, K_SPLIT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """y += W_downᵀᵀ v over one (output block, K split) of the grid, rows with v = 0 never read,
    the partial sum added atomically (TEAL's split-K GEMV)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * K_SPLIT
    acc = tl.zeros([BN], dtype=tl.float32)
    for start in range(0, K_SPLIT, BK):
        ks = k0 + start + tl.arange(0, BK)
        v = tl.load(v_ptr + ks, mask=ks < h, other=0.0)
        w = tl.load(wt_ptr + ks[:, None] * d_out + cols[None, :], mask=(v != 0)[:, None] & (cols[None, :] < d_out),
                    other=0.0)
        acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
    tl.atomic_add(y_ptr + cols, acc, mask=cols < d_out)
