"""WANDA / magnitude pruning (deft.analysis.prune) on hand-made tensors and tiny transformers: the
conftest.py families, and WANDA under every pair of its family × method matrix."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REFUSED, ROUTED_FAMILIES, build, make_inputs, make_model, matrix_params
from torch import nn

from deft.analysis.prune import (PruneConfig, calibration_indices, collect_input_norms, limit_samples, magnitude_prune,
                        merge_peft, n_m_mask, parse_n_m, prune_n_m, prune_unstructured, target_modules,
                        wanda_prune, wanda_scores, weight_out_in)
from deft.core.sites import find_sites, unwrap_model
from deft.methods import BottleneckAdapter

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
               and not m._forward_pre_hooks_with_kwargs for m in model.modules())


def _bert():
    return make_model("bert")  # hidden 32, intermediate 64


def _gpt2():
    return make_model("gpt2")  # n_embd 32, MLP 128; Conv1D weights stored (in, out)


# BERT's linear layers by hand (pooler included: it is backbone; the classifier is the task head).
BERT_ALL_LINEAR = [f"bert.encoder.layer.{i}.{leaf}" for i in range(2) for leaf in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")] + ["bert.pooler.dense"]


def _batches(pad_to: int | None = None, n: int = 2):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 40, (2, 6), generator=g)
        mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
        if pad_to:
            extra = pad_to - ids.shape[1]
            ids = torch.cat([ids, torch.zeros(2, extra, dtype=torch.long)], dim=1)
            mask = torch.cat([mask, torch.zeros(2, extra, dtype=torch.long)], dim=1)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


# --- scores and masks -------------------------------------------------------------------------
def test_scores_match_hand_computation():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                      [0.5, 0.0, -1.0, 2.0]])
    norms = torch.tensor([1.0, 2.0, 0.5, 3.0])
    expected = torch.tensor([[1.0, 4.0, 1.5, 12.0],
                             [0.5, 0.0, 0.5, 6.0]])
    assert torch.equal(wanda_scores(w, norms), expected)
    # 50% per row: row 0 drops |W|·‖X‖ = 1.0 and 1.5 (columns 0, 2); row 1 drops 0.0 and one 0.5.
    pruned = w.clone()
    mask = prune_unstructured(pruned, wanda_scores(w, norms), 0.5)
    assert mask[0].tolist() == [True, False, True, False]
    assert mask[1, 1] and not mask[1, 3] and int(mask[1].sum()) == 2
    assert torch.equal(pruned == 0, mask | (w == 0))
    with pytest.raises(ValueError):
        wanda_scores(w, torch.ones(3))  # wrong orientation / width


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_unstructured_exact_per_row_sparsity(sparsity):
    torch.manual_seed(0)
    w = torch.randn(8, 10)
    scores = w.abs() * torch.rand(10)
    mask = prune_unstructured(w, scores, sparsity)
    k = round(sparsity * 10)
    assert ((w == 0).sum(dim=1) == k).all()
    assert (mask.sum(dim=1) == k).all()
    for row in range(8):  # the pruned weights are the row's lowest scores
        if 0 < k < 10:
            assert scores[row][mask[row]].max() <= scores[row][~mask[row]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_n_m_pattern_holds_in_every_group(n, m):
    torch.manual_seed(1)
    w = torch.randn(6, 16)
    scores = w.abs() * torch.rand(16)
    mask = prune_n_m(w, scores, n, m)
    groups_w = w.reshape(6, 16 // m, m)
    assert ((groups_w != 0).sum(dim=-1) == n).all()  # exactly N kept in every group of M
    groups_s, groups_m = scores.reshape(6, -1, m), mask.reshape(6, -1, m)
    kept_min = groups_s.masked_fill(groups_m, float("inf")).min(dim=-1).values
    pruned_max = groups_s.masked_fill(~groups_m, float("-inf")).max(dim=-1).values
    assert (pruned_max <= kept_min).all()  # kept = the N highest scores of the group


def test_invalid_arguments_raise_value_error():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            PruneConfig(sparsity=bad)
    for bad in ("2-4", "2:", "a:b", "5:4", "0:4", "2:0"):
        with pytest.raises(ValueError):
            PruneConfig(structure=bad)
    with pytest.raises(ValueError):
        PruneConfig(targets="everything")
    assert parse_n_m("4:8") == (4, 8) and PruneConfig(structure="2:4").n_m == (2, 4)
    with pytest.raises(ValueError):
        n_m_mask(torch.rand(2, 10), 2, 4)  # width 10 not divisible by 4
    with pytest.raises(ValueError):
        n_m_mask(torch.rand(2, 8), 5, 4)
    with pytest.raises(ValueError):
        prune_unstructured(torch.rand(2, 4), torch.rand(2, 4), 1.0)
    with pytest.raises(ValueError):  # BERT's first MLP layer has 32 inputs: not divisible by 6
        wanda_prune(_bert(), _batches(), PruneConfig(structure="3:6"))


# --- calibration ------------------------------------------------------------------------------
class _Toy(nn.Module):
    """A one-layer "model" called like a transformers model: model(inputs_embeds=..., attention_mask=...)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, inputs_embeds, attention_mask=None):
        return self.proj(inputs_embeds)


def test_input_norms_hand_computed_over_real_tokens():
    model = _Toy()
    x = torch.tensor([[[1.0, 2.0, 0.0], [2.0, 0.0, 3.0]],
                      [[2.0, 1.0, 4.0], [100.0, 100.0, 100.0]]])  # the last token is padding
    batch = {"inputs_embeds": x, "attention_mask": torch.tensor([[1, 1], [1, 0]])}
    norms = collect_input_norms(model, {"proj": model.proj}, [batch])
    expected = torch.tensor([(1 + 4 + 4) ** 0.5, (4 + 0 + 1) ** 0.5, (0 + 9 + 16) ** 0.5])
    assert torch.allclose(norms["proj"], expected)
    assert _no_hooks(model)


def test_padding_does_not_change_norms():
    model = _bert()
    modules = target_modules(model, "mlp_first")
    plain = collect_input_norms(model, modules, _batches())
    padded = collect_input_norms(model, modules, _batches(pad_to=10))
    for name in modules:
        assert torch.allclose(plain[name], padded[name], rtol=1e-5, atol=1e-6)
    assert _no_hooks(model)


def test_calibration_sample_limit():
    batches = _batches(n=3)  # 3 batches of 2 sequences
    cut = limit_samples(batches, 3)
    assert [b["input_ids"].shape[0] for b in cut] == [2, 1]
    assert torch.equal(cut[1]["attention_mask"], batches[1]["attention_mask"][:1])
    idx = calibration_indices(100, 10, seed=3)
    assert idx == calibration_indices(100, 10, seed=3) and len(set(idx)) == 10
    assert calibration_indices(5, 10) == [0, 1, 2, 3, 4]


# --- models -----------------------------------------------------------------------------------
def test_wanda_on_bert_mlp_first_and_all_linear():
    model = _bert()
    result = wanda_prune(model, _batches(), PruneConfig(sparsity=0.5))
    assert set(result) == {f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)}
    for name, achieved in result.items():
        w = dict(model.named_modules())[name].weight
        assert ((w == 0).sum(dim=1) == 16).all() and achieved == pytest.approx(0.5)  # half of 32 inputs
    assert (model.bert.encoder.layer[0].output.dense.weight != 0).all()  # not a target
    assert _no_hooks(model)

    model = _bert()
    targets = target_modules(model, "all_linear")
    # expected names by hand (was: compared with target_modules, which wanda_prune itself calls)
    assert list(targets) == BERT_ALL_LINEAR
    result = wanda_prune(model, _batches(), PruneConfig(structure="2:4", targets="all_linear", sequential=True))
    assert list(result) == BERT_ALL_LINEAR and all(v == pytest.approx(0.5) for v in result.values())
    assert (model.classifier.weight != 0).all()
    modules = dict(model.named_modules())
    for name in BERT_ALL_LINEAR:
        weight = modules[name].weight
        assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) == 2).all()


def test_gpt2_conv1d_pruned_along_output_rows():
    model = _gpt2()
    batches = _batches()
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D, weight stored (in=32, out=128)
    assert c_fc.weight.shape == (32, 128)
    # ‖X_j‖ by hand, from the inputs a plain pre-hook sees, over the real tokens (was: from
    # collect_input_norms, the function wanda_prune calls)
    seen = []
    hook = c_fc.register_forward_pre_hook(lambda m, x: seen.append(x[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    real = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)])  # (real tokens, 32)
    norms = real.double().pow(2).sum(0).sqrt().float()
    expected_kept = c_fc.weight.detach().clone().T  # (out, in)
    scores = expected_kept.abs() * norms[None, :]
    expected_mask = torch.zeros_like(scores, dtype=torch.bool)
    expected_mask.scatter_(1, scores.topk(8, dim=1, largest=False).indices, True)

    result = wanda_prune(model, batches, PruneConfig(sparsity=0.25))
    assert set(result) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    w = c_fc.weight
    assert ((w == 0).sum(dim=0) == 8).all()  # per output (a column of the stored weight): 25% of 32 inputs
    assert torch.equal(weight_out_in(c_fc) == 0, expected_mask)
    assert "lm_head" not in target_modules(model, "all_linear")
    model(**batches[0])  # still runs


def test_magnitude_baseline():
    model = _gpt2()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    result = magnitude_prune(model, PruneConfig(sparsity=0.5, targets="all_linear"))
    assert len(result) == 8 and all(v == pytest.approx(0.5) for v in result.values())  # 4 Conv1D × 2 layers
    w = model.transformer.h[0].attn.c_attn.weight  # (32, 96): 16 of 32 inputs pruned per output
    assert ((w == 0).sum(dim=0) == 16).all()
    # the pruned inputs of every output are the 16 of smallest |W| (stored (in, out): per column)
    pruned = w == 0
    assert (before.abs().masked_fill(~pruned, 0).amax(0) <= before.abs().masked_fill(pruned, float("inf")).amin(0)).all()
    # GPT-2 ties lm_head to the input embedding; neither is a target (was: "… or lm_head is wte",
    # true by the tying whatever was pruned)
    assert model.lm_head.weight is model.transformer.wte.weight and (model.lm_head.weight != 0).all()


@pytest.mark.parametrize(("family", "method"), matrix_params(methods=["adapter"]))
def test_all_linear_with_bottleneck_adapters_prunes_base_weights_not_adapters(family, method):
    model, _ = build(family, method, trained=True)  # trained-looking adapters: no zero rows to start from
    base = unwrap_model(model)
    targets = target_modules(model, "all_linear")
    downs = {s.down for s in find_sites(model)}
    assert downs <= set(targets)  # the frozen down projections, through their adapter wrapper
    assert all(isinstance(base.get_submodule(d), BottleneckAdapter) for d in downs)
    assert not any("adapter_" in n or n.endswith("base_layer") for n in targets), sorted(targets)
    if family == "bert":  # by hand: the same layers as without adapters
        assert list(targets) == BERT_ALL_LINEAR
    adapters = {n: p.detach().clone() for n, p in base.named_parameters() if "adapter_" in n}
    result = wanda_prune(model, [make_inputs(family, pad=2, seed=s) for s in range(2)],
                         PruneConfig(sparsity=0.5, targets="all_linear"))
    assert list(result) == list(targets) and all(v == pytest.approx(0.5) for v in result.values())
    for d in downs:
        assert (base.get_submodule(d).base_layer.weight == 0).float().mean() == pytest.approx(0.5)
    assert all(torch.equal(p, adapters[n]) for n, p in base.named_parameters() if "adapter_" in n)
    assert _no_hooks(model)


@pytest.mark.parametrize(("family", "method"), matrix_params(families=["bert"], methods=list(REFUSED["prune"])))
def test_wanda_refuses_4bit_weights(family, method):
    # The refusal does not depend on the family: checked on one representative. It comes before
    # anything is merged (it used to merge LoRA into the 4-bit weights, lossily, then refuse).
    model, _ = build(family, method, trained=True)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="quantiz"):
        wanda_prune(model, [make_inputs(family)], PruneConfig(sparsity=0.5))
    lora_after = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert lora_before and lora_after.keys() == lora_before.keys()  # still unmerged, untouched
    assert all(torch.equal(lora_after[n], lora_before[n]) for n in lora_before)


@pytest.mark.parametrize(("family", "method"), [p for p in matrix_params(families=ROUTED_FAMILIES)
                                                 if p.values[1] not in REFUSED["prune"]])
def test_wanda_refuses_routed_experts_before_merging(family, method):
    """conftest.ROUTED_REFUSED["prune"]: one line, and the model is left as it was (LoRA unmerged)."""
    model, _ = build(family, method, trained=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="mixture-of-experts") as err:
        wanda_prune(model, [make_inputs(family)], PruneConfig(sparsity=0.5))
    assert "\n" not in str(err.value)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize(("family", "method"), [p for p in matrix_params() if p.values[1] not in REFUSED["prune"]
                                                 and p.values[0] not in ROUTED_FAMILIES])
def test_wanda_under_every_method_matches_hand_computation(family, method):
    """WANDA on the MLPs' first dense layers of every pair, against a by-hand WANDA on a copy: input
    norms from plain pre-hooks (no padding, so every position — virtual tokens too — is real),
    scores |W|·‖X‖ on the deployed weights (LoRA merged by peft on the copy), the lowest half of
    each row pruned. The method's own trained modules are left alone."""
    model, _ = build(family, method, trained=True)
    batches = [make_inputs(family, seed=s) for s in range(2)]
    firsts = [s.first for s in find_sites(make_model(family))]
    reference = copy.deepcopy(model)
    reference = reference.merge_and_unload() if method == "lora" else reference
    ref_modules = {n: unwrap_model(reference).get_submodule(n) for n in firsts}
    squares = {n: 0.0 for n in firsts}

    def add(name, x):
        squares[name] = squares[name] + x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)

    hooks = [m.register_forward_pre_hook(lambda m, x, n=n: add(n, x[0])) for n, m in ref_modules.items()]
    with torch.no_grad():
        for b in batches:
            reference(**b)
    for h in hooks:
        h.remove()
    # the method's trained modules (LoRA's are merged away, its head unwrapped)
    trained = {} if method == "lora" else {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    result = wanda_prune(model, batches, PruneConfig(sparsity=0.5))
    assert list(result) == firsts and all(v == pytest.approx(0.5) for v in result.values())
    base = unwrap_model(model)
    for name in firsts:
        ref_w = weight_out_in(ref_modules[name]).detach()
        scores = ref_w.abs().float() * squares[name].sqrt().float()[None, :]
        expected = torch.zeros_like(scores, dtype=torch.bool)
        expected.scatter_(1, scores.topk(ref_w.shape[1] // 2, dim=1, largest=False).indices, True)
        module = base.get_submodule(name)
        assert not hasattr(module, "lora_A")  # merged: the LoRA wrapper is gone
        w = weight_out_in(module).detach()
        assert torch.equal(w == 0, expected), name
        assert torch.equal(w[~expected], ref_w[~expected])  # survivors: the deployed W (+ ΔW)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in trained.items())  # adapters, virtual tokens, heads
    if method == "lora":
        assert merge_peft(base) is base
    model(**batches[0])  # the wrapper runs the merged, pruned model
    assert _no_hooks(model)
