"""Zero-skipping ASIC energy model (deft.analysis.energy): hand-computed cases and tiny transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deft.analysis.energy import (SPONGE_COMPUTE_PJ, SPONGE_MEMORY_PJ, EnergyConfig, EnergyReport, energy_change,
                         estimate_energy)

MEM, MAC = SPONGE_MEMORY_PJ, SPONGE_COMPUTE_PJ


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs
               and not m._forward_pre_hooks_with_kwargs and not m._backward_hooks for m in model.modules())


def _linear(weight, bias=None) -> nn.Linear:
    weight = torch.tensor(weight, dtype=torch.float32)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return layer


# --- hand-computed ----------------------------------------------------------------------------
def test_linear_hand_computed_with_planted_zeros():
    layer = _linear([[1, 0, 2, 0],
                     [0, 0, 3, 1],
                     [4, 5, 0, 0]])  # 6 non-zero weights
    x = torch.tensor([[[1., 0, 0, 2],
                       [0, 3, 0, 0]]])  # 3 non-zero inputs
    # y = x Wᵀ = [[1, 2, 4], [0, 0, 15]]: 4 non-zeros.
    # Non-zero MAC pairs: token 1 uses inputs 0 (column nnz 2) and 3 (nnz 1); token 2 input 1 (nnz 1) → 4.
    dense = MEM * (12 + 8 + 6) + MAC * (2 * 4 * 3)
    sparse = MEM * (6 + 3 + 4) + MAC * 4
    report = estimate_energy(layer, [x])
    assert report.dense_energy == pytest.approx(dense)
    assert report.sparse_energy == pytest.approx(sparse)
    assert report.energy_ratio == pytest.approx(sparse / dense)
    (row,) = report.per_layer
    assert row["kind"] == "linear" and row["ratio"] == pytest.approx(sparse / dense)
    assert (row["n_macs"], row["n_macs_nz"], row["n_outputs_nz"]) == (24, 4, 4)


def _brute_force_linear(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> tuple[float, float]:
    """Dense / zero-skipping energy of y = x Wᵀ + b by explicit loops over tokens and weights."""
    tokens = x.reshape(-1, x.shape[-1])
    y = tokens @ w.T + (b if b is not None else 0)
    params = list(w.flatten()) + (list(b) if b is not None else [])
    dense = MEM * (len(params) + tokens.numel() + y.numel()) + MAC * tokens.shape[0] * w.numel()
    macs_nz = sum(1 for t in range(tokens.shape[0]) for i in range(w.shape[0]) for j in range(w.shape[1])
                  if tokens[t, j] != 0 and w[i, j] != 0)
    sparse = MEM * (sum(1 for p in params if p != 0) + int((tokens != 0).sum()) + int((y != 0).sum())) \
        + MAC * macs_nz
    return dense, sparse


def test_sequential_matches_brute_force_per_layer():
    torch.manual_seed(0)
    first, second = nn.Linear(5, 6), nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        first.weight[first.weight.abs() < 0.2] = 0  # planted weight zeros
        second.weight[:, 1] = 0
    model = nn.Sequential(first, nn.ReLU(), second)
    x = torch.randn(2, 3, 5)
    x[0, 1] = 0
    x[1, :, 2] = 0  # planted input zeros
    report = estimate_energy(model, [x])
    by_name = {r["name"]: r for r in report.per_layer}
    h = first(x)
    a = torch.relu(h)
    d1, s1 = _brute_force_linear(first.weight.detach(), first.bias.detach(), x)
    d2, s2 = _brute_force_linear(second.weight.detach(), None, a.detach())
    assert by_name["0"]["dense"] == pytest.approx(d1) and by_name["0"]["sparse"] == pytest.approx(s1)
    assert by_name["2"]["dense"] == pytest.approx(d2) and by_name["2"]["sparse"] == pytest.approx(s2)
    # ReLU: reads its input, writes its output, one op per element, skipped for zero inputs.
    n = h.numel()
    d_act = MEM * 2 * n + MAC * n
    s_act = MEM * (int((h != 0).sum()) + int((a != 0).sum())) + MAC * int((h != 0).sum())
    assert by_name["1"]["kind"] == "activation"
    assert by_name["1"]["dense"] == pytest.approx(d_act) and by_name["1"]["sparse"] == pytest.approx(s_act)
    assert report.energy_ratio == pytest.approx((s1 + s2 + s_act) / (d1 + d2 + d_act))


def test_all_dense_ratio_is_exactly_one():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.5)  # strictly positive: nothing is zero anywhere
    report = estimate_energy(model, [torch.rand(3, 4) + 0.5])
    assert report.energy_ratio == 1.0
    assert report.sparse_energy == report.dense_energy > 0


def test_all_zero_activations_give_memory_only_floor():
    layer = _linear([[1., 2, 3, 4], [5, 6, 7, 8], [9, 1, 2, 3]], bias=[1., 2, 3])
    x = torch.zeros(1, 2, 4)
    report = estimate_energy(layer, [x])
    # Dense: 15 parameters, 8 inputs, 6 outputs, 24 MACs. Zero-skipping: the 15 non-zero parameters
    # and the 6 outputs (= the bias, non-zero) are still moved; no input read, no MAC.
    assert report.dense_energy == pytest.approx(MEM * (15 + 8 + 6) + MAC * 24)
    assert report.sparse_energy == pytest.approx(MEM * (15 + 6))
    no_bias = _linear([[1., 2, 3, 4], [5, 6, 7, 8], [9, 1, 2, 3]])
    floor = estimate_energy(no_bias, [x])
    assert floor.sparse_energy == pytest.approx(MEM * 12)  # only the weights are read
    assert floor.energy_ratio == pytest.approx(12 / (12 + 8 + 6 + MAC / MEM * 24))


def test_skip_flags_and_custom_constants():
    layer = _linear([[1., 0], [0, 2]])
    x = torch.tensor([[1., 0]])
    cfg = EnergyConfig(weight_pj=1.0, activation_pj=10.0, mac_pj=100.0, skip_zero_weights=False)
    report = estimate_energy(layer, [x], cfg)
    # Weights read densely (4), input 1 of 2 non-zero, output [1, 0]: 1 non-zero; MACs skip only on
    # the zero input: token × 2 outputs for input 0 → 2.
    assert report.dense_energy == pytest.approx(4 * 1 + (2 + 2) * 10 + 4 * 100)
    assert report.sparse_energy == pytest.approx(4 * 1 + (1 + 1) * 10 + 2 * 100)
    with pytest.raises(ValueError):
        EnergyConfig(mac_pj=-1)


def test_energy_change():
    assert energy_change(0.85, 0.78) == pytest.approx(8.235, abs=1e-3)  # the paper's RoBERTa example
    a = EnergyReport(dense_energy=10.0, sparse_energy=8.0, per_layer=[])
    b = EnergyReport(dense_energy=10.0, sparse_energy=6.0, per_layer=[])
    assert energy_change(a, b) == pytest.approx(25.0)
    with pytest.raises(ValueError):
        energy_change(0.0, 0.5)


# --- tiny transformers ------------------------------------------------------------------------
def _bert(act="relu"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, hidden_act=act, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _batch(pad_to: int | None = None):
    torch.manual_seed(3)
    ids = torch.randint(1, 40, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    if pad_to:
        extra = pad_to - ids.shape[1]
        ids = torch.cat([ids, torch.zeros(2, extra, dtype=torch.long)], dim=1)
        mask = torch.cat([mask, torch.zeros(2, extra, dtype=torch.long)], dim=1)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_end_to_end_ratio_and_no_hook_residue(build):
    model = build()
    model.train()  # restored afterwards
    report = estimate_energy(model, [_batch(), _batch()])
    assert 0 < report.energy_ratio <= 1
    assert report.batches == 2 and len(report.batch_ratios) == 2 and report.tokens == 20
    kinds = {r["kind"] for r in report.per_layer}
    assert {"linear", "embedding", "norm", "activation", "attention_qk", "attention_av"} <= kinds
    assert report.skipped == []
    d = report.to_dict()
    assert d["energy_ratio"] == report.energy_ratio and len(d["per_layer"]) == len(report.per_layer)
    assert all(0 <= r["ratio"] <= 1 for r in report.per_layer)
    assert _no_hooks(model)
    assert model.training


def test_relu_bert_is_sparser_than_dense():
    report = estimate_energy(_bert("relu"), [_batch()])
    assert report.by_kind()["activation"]["ratio"] < 0.9  # about half the ReLU outputs are zero
    assert report.energy_ratio < 1


@pytest.mark.parametrize("build", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_padding_is_excluded(build):
    model = build()
    short = estimate_energy(model, [_batch()])
    padded = estimate_energy(model, [_batch(pad_to=11)])
    assert padded.dense_energy == pytest.approx(short.dense_energy, rel=1e-12)
    assert padded.energy_ratio == pytest.approx(short.energy_ratio, rel=1e-9)


def test_attention_products_counted_over_allowed_pairs():
    model = _gpt2()
    d = model.config.n_embd
    attn = model.transformer.h[0].attn
    with torch.no_grad():  # plant zeros: query features 0..3 and value features 0..1 are always 0
        attn.c_attn.weight[:, 0:4] = 0
        attn.c_attn.bias[0:4] = 0
        attn.c_attn.weight[:, 2 * d:2 * d + 2] = 0
        attn.c_attn.bias[2 * d:2 * d + 2] = 0
    report = estimate_energy(model, [_batch(pad_to=8)])
    rows = {r["name"]: r for r in report.per_layer}
    qk, av = rows["transformer.h.0.attn:qk"], rows["transformer.h.0.attn:av"]
    pairs = 6 * 7 // 2 + 4 * 5 // 2  # causal pairs among the real tokens (6 and 4)
    assert qk["n_macs"] == pairs * d and av["n_macs"] == pairs * d
    assert qk["n_macs_nz"] == pairs * (d - 4)
    assert av["n_macs_nz"] == pairs * (d - 2)
    assert qk["ratio"] < 1 and av["ratio"] < 1
    full = {r["name"]: r for r in estimate_energy(_bert(), [_batch()]).per_layer}
    bidirectional = 6 * 6 + 4 * 4
    assert full["bert.encoder.layer.0.attention.self:qk"]["n_macs"] == bidirectional * 16


def test_encoder_decoder_cross_attention_and_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8, decoder_start_token_id=0)).eval()
    batch = _batch()
    labels = torch.randint(1, 40, (2, 4))
    labels[1, 3] = -100
    report = estimate_energy(t5, [dict(batch, labels=labels)])
    rows = {r["name"]: r for r in report.per_layer}
    assert rows["decoder.block.0.layer.1.EncDecAttention:qk"]["n_macs"] == (4 * 6 + 3 * 4) * 16
    assert rows["decoder.block.0.layer.0.SelfAttention:qk"]["n_macs"] == (10 + 6) * 16
    assert 0 < report.energy_ratio <= 1

    peft_model = get_peft_model(_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    lora_report = estimate_energy(peft_model, [_batch()])
    names = [r["name"] for r in lora_report.per_layer]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any(n.endswith("attention.self:qk") for n in names)  # q/k/v found through the LoRA wrappers
    assert _no_hooks(peft_model)


def test_hooks_removed_when_the_model_fails():
    model = _bert()
    with pytest.raises(Exception):
        estimate_energy(model, [{"input_ids": torch.full((2, 6), 999)}])  # ids beyond the vocabulary
    assert _no_hooks(model)
