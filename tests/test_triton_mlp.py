"""The Triton sparse MLP (deft.deploy.triton_mlp), TEAL's split-K GEMV: equal to the dense MLP on
the thresholded activation (random, none / all / one active; gated and plain; odd widths; several
K splits), through SparseMLP at both threshold points and in greedy generation. Without a CUDA
device the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1): the same kernel code,
checked for its answers (its speed needs a GPU: benchmarks/sparse_decode.py reports it there)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 where no CUDA device is

from conftest import N_LAYERS, make_model  # noqa: E402
from test_sparse_mlp import BLOCKS, calibrated_taus, make_block, rel_error, tau_for  # noqa: E402

from deft.core.thresholds import InputThreshold, ThresholdedActivation, Thresholds, apply_thresholds  # noqa: E402
from deft.deploy import triton_mlp  # noqa: E402
from deft.deploy.sparse_mlp import SparseMLP, sparsify_mlps  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("split_k", [None, 1, 3, 7])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("mask", ["random", "none", "all", "one"])
def test_triton_kernel_matches_dense_math(gated, mask, split_k):
    g = torch.Generator().manual_seed(7)
    d, h, d_out = 37, 203, 100  # none of them a multiple of a block
    x, a = torch.randn(d, generator=g), torch.randn(h, generator=g)
    wd_t, bd = torch.randn(h, d_out, generator=g), torch.randn(d_out, generator=g)
    wu, bu = (torch.randn(h, d, generator=g), torch.randn(h, generator=g)) if gated else (None, None)
    tau = tau_for(a, mask)
    v = a.double() * ~(a.abs() <= tau)
    if gated:
        v = v * F.linear(x.double(), wu.double(), bu.double())
    want = F.linear(v, wd_t.double().t(), bd.double())
    on = {t: None if t is None else t.to(DEVICE) for t in (x, a, wd_t, bd, wu, bu)}
    got = triton_mlp.triton_sparse_mlp(on[x], on[a], tau, on[wd_t], on[bd], on[wu], on[bu], split_k=split_k).cpu()
    assert rel_error(got, want) <= 1e-5
    if mask == "none":
        assert torch.allclose(got, bd)


@pytest.mark.parametrize("point", ["act", "product"])
@pytest.mark.parametrize("kind", ["plain-linear", "gated-linear", "gated-conv1d"])
def test_sparse_mlp_on_triton_equals_dense_thresholded(kind, point):
    block = make_block(kind)
    _, first, down, act, mult = BLOCKS[kind]
    x = torch.randn(1, 1, block.state_dict()[f"{first}.weight"].shape[-1 if kind != "gated-conv1d" else 0],
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = getattr(block, act)(getattr(block, first)(x))
        if point == "product" and mult:
            p = p * getattr(block, mult)(x)
        tau = tau_for(p, "random")
        reference = copy.deepcopy(block)
        if point == "act":
            setattr(reference, act, ThresholdedActivation(getattr(block, act), tau))
        else:
            InputThreshold(getattr(reference, down), tau)
        sparse = SparseMLP.from_block(block, first, down, act, mult, tau=tau, point=point, backend="triton").to(DEVICE)
        got = sparse(x.to(DEVICE)).cpu()
        assert rel_error(got, reference(x)) <= 1e-5


def test_sparsified_model_on_triton_generates_as_thresholded_dense():
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    dense = make_model("llama")
    thresholds = Thresholds(taus=calibrated_taus(dense, ids), mode="tau")
    apply_thresholds(dense, thresholds)
    sparse = sparsify_mlps(make_model("llama"), thresholds, backend="triton").to(DEVICE)
    assert sum(isinstance(m, SparseMLP) for m in sparse.modules()) == N_LAYERS
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(sparse.generate(ids.to(DEVICE), **kwargs).cpu(), dense.generate(ids, **kwargs))


def test_without_a_device_the_triton_backend_says_why_and_runs_dense(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    assert "CUDA device" in triton_mlp.unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="CUDA device"):
        triton_mlp.triton_sparse_mlp(torch.randn(4), torch.randn(8), 0.1, torch.randn(8, 4))
    block = make_block("gated-linear")
    sparse = SparseMLP.from_block(block, "gate_proj", "down_proj", "act_fn", "up_proj", tau=0.1, backend="triton")
    reference = copy.deepcopy(block)
    reference.act_fn = ThresholdedActivation(block.act_fn, 0.1)
    x = torch.randn(1, 1, 40)
    with torch.no_grad():
        for _ in range(2):
            assert rel_error(sparse(x), reference(x)) <= 1e-5
    err = capsys.readouterr().err
    assert err.count("dense path") <= 1 and "Traceback" not in err
