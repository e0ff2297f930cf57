"""WANDA / magnitude pruning (deft.analysis.prune) on hand-made tensors and tiny transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deft.analysis.prune import (PruneConfig, calibration_indices, collect_input_norms, limit_samples, magnitude_prune,
                        merge_peft, n_m_mask, parse_n_m, prune_n_m, prune_unstructured, target_modules,
                        wanda_prune, wanda_scores, weight_out_in)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
               and not m._forward_pre_hooks_with_kwargs for m in model.modules())


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


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
    with pytest.raises(ValueError):  # BERT's first MLP layer has 16 inputs: not divisible by 6
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
        assert ((w == 0).sum(dim=1) == 8).all() and achieved == pytest.approx(0.5)
    assert (model.bert.encoder.layer[0].output.dense.weight != 0).all()  # not a target
    assert _no_hooks(model)

    model = _bert()
    targets = target_modules(model, "all_linear")
    assert "classifier" not in targets and "bert.encoder.layer.0.attention.self.query" in targets
    result = wanda_prune(model, _batches(), PruneConfig(structure="2:4", targets="all_linear", sequential=True))
    assert set(result) == set(targets) and all(v == pytest.approx(0.5) for v in result.values())
    assert (model.classifier.weight != 0).all()
    for module in targets.values():
        assert ((module.weight.reshape(module.weight.shape[0], -1, 4) != 0).sum(-1) == 2).all()


def test_gpt2_conv1d_pruned_along_output_rows():
    model = _gpt2()
    batches = _batches()
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D, weight stored (in=16, out=64)
    assert c_fc.weight.shape == (16, 64)
    norms = collect_input_norms(model, {"transformer.h.0.mlp.c_fc": c_fc}, batches)["transformer.h.0.mlp.c_fc"]
    expected_kept = c_fc.weight.detach().clone().T  # (out, in)
    scores = expected_kept.abs() * norms[None, :]
    expected_mask = torch.zeros_like(scores, dtype=torch.bool)
    expected_mask.scatter_(1, scores.topk(4, dim=1, largest=False).indices, True)

    result = wanda_prune(model, batches, PruneConfig(sparsity=0.25))
    assert set(result) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    w = c_fc.weight
    assert ((w == 0).sum(dim=0) == 4).all()  # per output (a column of the stored weight): 25% of 16 inputs
    assert torch.equal(weight_out_in(c_fc) == 0, expected_mask)
    assert "lm_head" not in target_modules(model, "all_linear")
    model(**batches[0])  # still runs


def test_lora_model_is_merged_then_pruned():
    from peft import LoraConfig, get_peft_model

    base = _bert()
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["intermediate.dense", "query"],
                                                 init_lora_weights=False))
    merged_reference = copy.deepcopy(peft_model).merge_and_unload()
    ref_w = merged_reference.bert.encoder.layer[0].intermediate.dense.weight.detach()
    plain_w = base.bert.encoder.layer[0].intermediate.dense.base_layer.weight.detach().clone()
    assert not torch.allclose(ref_w, plain_w)  # the adapter changes the weight

    result = wanda_prune(peft_model, _batches(), PruneConfig(sparsity=0.5))
    assert set(result) == {f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)}
    dense = base.bert.encoder.layer[0].intermediate.dense
    assert isinstance(dense, nn.Linear)  # LoRA wrapper gone
    w = dense.weight.detach()
    assert ((w == 0).sum(dim=1) == 8).all()
    kept = w != 0
    assert torch.allclose(w[kept], ref_w[kept])  # survivors are the merged W + ΔW
    assert merge_peft(base) is base
    peft_model(**_batches()[0])  # the wrapper runs the merged, pruned model
    assert _no_hooks(peft_model)


def test_magnitude_baseline():
    model = _gpt2()
    result = magnitude_prune(model, PruneConfig(sparsity=0.5, targets="all_linear"))
    assert len(result) == 8 and all(v == pytest.approx(0.5) for v in result.values())
    w = model.transformer.h[0].attn.c_attn.weight  # (16, 48): 8 of 16 inputs pruned per output
    assert ((w == 0).sum(dim=0) == 8).all()
    assert (model.lm_head.weight != 0).all() or model.lm_head.weight is model.transformer.wte.weight


def test_all_linear_with_bottleneck_adapters_prunes_base_weights_not_adapters():
    from deft.methods import get_method

    model = get_method("adapter").apply(_bert(), None, "SEQ_CLS")
    targets = target_modules(model, "all_linear")
    downs = {f"bert.encoder.layer.{i}.output.dense" for i in range(2)}
    assert downs <= set(targets)  # the frozen down projections, through their adapter wrapper
    assert not any("adapter_" in n or n.endswith("base_layer") for n in targets), sorted(targets)
    adapter = model.bert.encoder.layer[0].output.dense
    nn.init.normal_(adapter.adapter_up.weight)  # trained-looking adapter: no zero rows to start from
    before_up = adapter.adapter_up.weight.detach().clone()
    result = wanda_prune(model, _batches(), PruneConfig(sparsity=0.5, targets="all_linear"))
    assert set(result) == set(targets) and all(v == pytest.approx(0.5) for v in result.values())
    assert (adapter.base_layer.weight == 0).float().mean() == pytest.approx(0.5)
    assert torch.equal(adapter.adapter_up.weight, before_up)
