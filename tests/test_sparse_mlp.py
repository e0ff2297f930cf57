"""The sparse MLP for batch-1 decoding (deft.deploy.sparse_kernel / sparse_mlp): the fused kernel
and its PyTorch fallback equal the dense MLP on the thresholded activation (random masks and the
adversarial ones: none / all / exactly one unit active; gated and plain; Linear and Conv1D; odd
widths and thread counts), and a sparsified model generates what the thresholded dense model does.

The compiled kernel is built once per session (cached under $DEFT_CACHE, ~1 min the first time);
where it cannot be built its tests skip with the reason and the fallback tests still run."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import N_LAYERS, build, make_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from deft.core.sites import find_sites
from deft.core.thresholds import InputThreshold, ThresholdedActivation, Thresholds, apply_thresholds
from deft.deploy import sparse_kernel
from deft.deploy.sparse_mlp import SparseMLP, sparsify_mlps

D, H = 40, 96


@pytest.fixture(scope="module")
def compiled():
    try:
        return sparse_kernel.build_kernel()
    except sparse_kernel.KernelUnavailable as exc:
        pytest.skip(f"compiled sparse kernel unavailable here: {exc}")


@pytest.fixture(params=["compiled", "fallback"])
def backend(request):
    if request.param == "compiled":
        request.getfixturevalue("compiled")
    return request.param


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if float(want.norm()) == 0:
        return 0.0 if bool((got == 0).all()) else float("inf")
    return float((got.double() - want.double()).norm() / want.double().norm())


# -- the kernel alone: odd widths, several thread counts, against a float64 reference -----------
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("mask", ["random", "none", "all", "one"])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_kernel_matches_dense_math(backend, gated, mask, threads):
    g = torch.Generator().manual_seed(threads)
    d, h, d_out = 37, 203, 100  # d_out not a multiple of the thread slices
    x, a = torch.randn(d, generator=g), torch.randn(h, generator=g)
    wd_t, bd = torch.randn(h, d_out, generator=g), torch.randn(d_out, generator=g)
    wu, bu = (torch.randn(h, d, generator=g), torch.randn(h, generator=g)) if gated else (None, None)
    tau = tau_for(a, mask)
    keep = ~(a.abs() <= tau)
    v = a.double() * keep
    if gated:
        v = v * F.linear(x.double(), wu.double(), bu.double())
    want = F.linear(v, wd_t.double().t(), bd.double())
    got = sparse_kernel.sparse_mlp_forward(x, a, tau, wd_t, bd, wu, bu, backend=backend, threads=threads)
    assert rel_error(got, want) <= 1e-5
    if mask == "none":
        assert torch.equal(got, bd)


def tau_for(a: torch.Tensor, mask: str) -> float:
    """τ halfway between two |a| values, so rounding never moves a unit across it."""
    s = a.abs().flatten().sort().values
    if mask == "none":
        return float(s[-1]) * 2 + 1
    if mask == "all":  # every nonzero unit (σ may underflow to an exact 0)
        return float(s[s > 0][0]) / 2
    if mask == "one":
        return float(s[-1] + s[-2]) / 2
    i = len(s) // 2
    return float(s[i] + s[i + 1]) / 2


# -- SparseMLP built from each kind of block -----------------------------------------------------
class PlainLinear(nn.Module):  # ViT / OPT-like plain MLP with biases
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class GatedConv1D(nn.Module):  # a gated MLP on GPT-2's (in, out) weights
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down, self.act = Conv1D(H, D), Conv1D(H, D), Conv1D(D, H), nn.SiLU()

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


BLOCKS = {  # kind -> (constructor, first, down, act, mult)
    "plain-linear": (PlainLinear, "fc1", "fc2", "act", None),
    "plain-conv1d": (lambda: T.models.gpt2.modeling_gpt2.GPT2MLP(H, T.GPT2Config(n_embd=D)), "c_fc", "c_proj", "act",
                     None),
    "gated-linear": (lambda: T.models.llama.modeling_llama.LlamaMLP(
        T.LlamaConfig(hidden_size=D, intermediate_size=H, num_attention_heads=2, mlp_bias=True)), "gate_proj", "down_proj", "act_fn",
                     "up_proj"),
    "gated-linear-nobias": (lambda: T.models.llama.modeling_llama.LlamaMLP(
        T.LlamaConfig(hidden_size=D, intermediate_size=H, num_attention_heads=2)), "gate_proj", "down_proj", "act_fn", "up_proj"),
    "gated-conv1d": (GatedConv1D, "gate", "down", "act", "up"),
}


def make_block(kind: str) -> nn.Module:
    torch.manual_seed(0)
    block = BLOCKS[kind][0]().eval()
    with torch.no_grad():
        for p in block.parameters():  # Conv1D biases start at 0: give every bias a value
            p.normal_(0, 0.3)
    return block


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("mask", ["random", "none", "all", "one"])
def test_sparse_mlp_equals_dense_thresholded(backend, kind, mask):
    block = make_block(kind)
    _, first, down, act, mult = BLOCKS[kind]
    x = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = getattr(block, act)(getattr(block, first)(x))
        tau = tau_for(a, mask)
        sparse = SparseMLP.from_block(block, first, down, act, mult, tau=tau, backend=backend)
        reference = copy.deepcopy(block)
        setattr(reference, act, ThresholdedActivation(getattr(block, act), tau))
        want, got = reference(x), sparse(x)
        active = int((a.abs() > tau).sum())
        assert active == {"none": 0, "all": int((a != 0).sum()), "one": 1}.get(mask, active)
        assert got.shape == want.shape and rel_error(got, want) <= 1e-5
        # prefill / batches take the dense path with the same threshold
        xs = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2))
        assert rel_error(sparse(xs), reference(xs)) <= 1e-5


def test_sparse_mlp_reads_the_block_threshold_and_refuses_others():
    block = make_block("gated-linear")
    block.act_fn = ThresholdedActivation(block.act_fn, 0.05)
    sparse = SparseMLP.from_block(block, "gate_proj", "down_proj", "act_fn", "up_proj")
    assert sparse.tau == 0.05 and not isinstance(sparse.act, ThresholdedActivation)

    class Scaled(PlainLinear):  # does more than down(act(first(x))): verify catches it
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="not down"):
        SparseMLP.from_block(Scaled().eval(), "fc1", "fc2", "act")
    extra = PlainLinear()
    extra.norm = nn.LayerNorm(D)
    with pytest.raises(ValueError, match="norm"):
        SparseMLP.from_block(extra, "fc1", "fc2", "act")


# -- whole models: greedy generation and logits equal the thresholded dense model ---------------
def calibrated_taus(model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Per site, the median |a| on the prompt (about half the units active)."""
    taus, hooks = {}, []
    for site in find_sites(model, "act"):
        def hook(_m, _i, out, path=site.module):
            taus[path] = float(out.abs().median())
        hooks.append(model.get_submodule(site.module).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return taus


def calibrated_product_taus(model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Per product site (a down projection), the median |input| on the prompt."""
    taus, hooks = {}, []
    for site in find_sites(model, "product"):
        def hook(_m, args, path=site.module):
            taus[path] = float(args[0].abs().median())
        hooks.append(model.get_submodule(site.module).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return taus


@pytest.mark.parametrize("point", ["act", "product"])
@pytest.mark.parametrize("source", ["model", "explicit"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_sparsified_model_generates_as_thresholded_dense(backend, family, source, point, monkeypatch):
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    dense = make_model(family)
    calibrate = calibrated_taus if point == "act" else calibrated_product_taus
    thresholds = Thresholds(taus=calibrate(dense, ids), mode="tau", point=point)
    apply_thresholds(dense, thresholds)
    sparse = make_model(family)
    if source == "model":  # taus read from the model's own thresholds
        apply_thresholds(sparse, thresholds)
        sparsify_mlps(sparse, backend=backend)
    else:
        sparsify_mlps(sparse, thresholds, backend=backend)
    blocks = [m for m in sparse.modules() if isinstance(m, SparseMLP)]
    assert len(blocks) == N_LAYERS and {b.tau for b in blocks} == set(thresholds.taus.values())
    assert {b.point for b in blocks} == {point}

    calls = []
    kernel = sparse_kernel.sparse_mlp_forward
    monkeypatch.setattr(sparse_kernel, "sparse_mlp_forward", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        want, got = dense.generate(ids, **kwargs), sparse.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    want_logits, got_logits = torch.stack(want.logits), torch.stack(got.logits)
    assert float((got_logits - want_logits).abs().max()) <= 1e-4 * max(1.0, float(want_logits.abs().max()))
    assert len(calls) == N_LAYERS * 7  # every decoding step after the prefill went through the kernel


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("mask", ["random", "none", "all", "one"])
def test_product_point_equals_dense_product_thresholded(backend, kind, mask):
    # --point product: gate and up dense, the down projection over the products with |p| > τ only;
    # the reference is the block itself with InputThreshold's pre-hook on its down projection.
    block = make_block(kind)
    _, first, down, act, mult = BLOCKS[kind]
    x = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = getattr(block, act)(getattr(block, first)(x))
        if mult:
            p = p * getattr(block, mult)(x)
        tau = tau_for(p, mask)
        reference = copy.deepcopy(block)
        InputThreshold(getattr(reference, down), tau)
        explicit = SparseMLP.from_block(block, first, down, act, mult, tau=tau, point="product", backend=backend)
        own = SparseMLP.from_block(reference, first, down, act, mult, backend=backend)  # reads the pre-hook
        assert (own.point, own.tau) == ("product", tau)
        want = reference(x)
        active = int((p.abs() > tau).sum())
        assert active == {"none": 0, "all": int((p != 0).sum()), "one": 1}.get(mask, active)
        for sparse in (explicit, own):
            got = sparse(x)
            assert got.shape == want.shape and rel_error(got, want) <= 1e-5
            xs = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2))
            assert rel_error(sparse(xs), reference(xs)) <= 1e-5


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_models_whose_mlp_is_not_one_block_are_refused_unchanged(family):
    model = make_model(family)
    with pytest.raises(ValueError, match="SparseMLP"):
        sparsify_mlps(model, 0.1)
    assert not any(isinstance(m, SparseMLP) for m in model.modules())


def test_lora_wrapped_layers_are_refused():
    model, _ = build("llama", "lora")
    with pytest.raises(ValueError, match="merge"):
        sparsify_mlps(model, 0.1)


# -- building and caching the kernel -------------------------------------------------------------
def test_extension_name_follows_the_source(tmp_path, monkeypatch):
    before = sparse_kernel.extension_name()
    changed = tmp_path / "sparse_mlp.cpp"
    changed.write_text(sparse_kernel.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(sparse_kernel, "SOURCE", changed)
    assert sparse_kernel.extension_name() != before


def test_corrupt_cache_is_removed_and_no_compiler_means_fallback_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(sparse_kernel, "_STATE", {})
    cached = sparse_kernel.extensions_root() / sparse_kernel.extension_name()
    cached.mkdir(parents=True)
    (cached / f"{sparse_kernel.extension_name()}.so").write_bytes(b"not a library")
    (cached / "deft_built").write_text("")
    with pytest.raises(sparse_kernel.KernelUnavailable, match="compiler"):
        sparse_kernel.build_kernel()
    assert not cached.exists()

    x, a, wd_t = torch.randn(8), torch.randn(16), torch.randn(16, 8)
    for _ in range(2):
        y = sparse_kernel.sparse_mlp_forward(x, a, 0.5, wd_t)
    assert torch.equal(y, sparse_kernel.sparse_mlp_fallback(x, a, 0.5, wd_t))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "fallback" in err and "Traceback" not in err
    with pytest.raises(sparse_kernel.KernelUnavailable):
        sparse_kernel.sparse_mlp_forward(x, a, 0.5, wd_t, backend="compiled")


def test_a_finished_cached_build_loads_without_a_compiler(compiled, tmp_path, monkeypatch):
    name = sparse_kernel.extension_name()
    shutil.copytree(sparse_kernel.extensions_root() / name, tmp_path / name)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    module = sparse_kernel.build_kernel(tmp_path)
    x, a, wd_t = torch.randn(8), torch.randn(16), torch.randn(16, 8)
    assert torch.allclose(module.forward(x, a, 0.5, wd_t, None, None, None, 1),
                          sparse_kernel.sparse_mlp_fallback(x, a, 0.5, wd_t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("point", ["act", "product"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_thresholded_decoder_export_loads_with_sparse_mlps(family, point, tmp_path):
    # The export/load path swaps the kernel in for a thresholded decoder; its greedy tokens are the
    # thresholded dense model's (the model before export).
    from deft.deploy import export_model, load_exported

    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    dense = make_model(family)
    calibrate = calibrated_taus if point == "act" else calibrated_product_taus
    apply_thresholds(dense, Thresholds(taus=calibrate(dense, ids), mode="tau", point=point))
    export_model(dense, tmp_path / "export", None)
    loaded = load_exported(tmp_path / "export")
    blocks = [m for m in loaded.modules() if isinstance(m, SparseMLP)]
    assert len(blocks) == N_LAYERS and {b.point for b in blocks} == {point}
    assert sum(isinstance(m, SparseMLP) for m in load_exported(tmp_path / "export", sparse_mlp=False).modules()) == 0
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.generate(ids, **kwargs), dense.generate(ids, **kwargs))


def test_encoders_and_unthresholded_exports_stay_dense(tmp_path, capsys):
    from deft.deploy import export_model, load_exported

    plain = make_model("llama")
    export_model(plain, tmp_path / "plain", None)
    assert not any(isinstance(m, SparseMLP) for m in load_exported(tmp_path / "plain").modules())
    with pytest.raises(ValueError, match="no thresholds"):
        load_exported(tmp_path / "plain", sparse_mlp=True)
    encoder = make_model("bert")
    apply_thresholds(encoder, Thresholds(taus={s.module: 0.05 for s in find_sites(encoder, "act")}, mode="tau"))
    export_model(encoder, tmp_path / "bert", None)
    assert not any(isinstance(m, SparseMLP) for m in load_exported(tmp_path / "bert").modules())
    # a decoder whose MLP is not one block (OPT): the dense path, with a one-line notice
    opt = make_model("opt")
    apply_thresholds(opt, Thresholds(taus={s.module: 0.05 for s in find_sites(opt, "act")}, mode="tau"))
    export_model(opt, tmp_path / "opt", None)
    capsys.readouterr()
    assert not any(isinstance(m, SparseMLP) for m in load_exported(tmp_path / "opt").modules())
    err = capsys.readouterr().err
    assert "dense path" in err and len(err.strip().splitlines()) == 1
