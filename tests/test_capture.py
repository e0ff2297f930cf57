"""Capture: mask alignment, once-per-forward firing, gradient flow, no leaks — over every family,
and over the family × method matrix of conftest.py where a PEFT method is involved."""

from collections import Counter

import pytest
import torch

from conftest import (FAMILIES, METHODS, N_LAYERS, SITES_PER_LAYER, TEXT_FAMILIES, build, family_kind, make_inputs,
                      make_model, matrix_params)
from deft.core.approx import make_approx
from deft.core.capture import ActivationCapture, align_mask
from deft.core.loss import DensityLossConfig, combine_terms
from deft.core.metrics import DensityMeter
from deft.core.sites import find_sites

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

GC_FAMILIES = [f for f in FAMILIES if FAMILIES[f][1].supports_gradient_checkpointing]


def measure(model, batches):
    sites = find_sites(model)
    meter = DensityMeter(sites.sites, threshold=1e-3)
    with torch.no_grad(), ActivationCapture(model, sites, meter=meter):
        for b in batches:
            model(**b)
    return meter.result()


def _trim(inputs, row, length):
    """Row ``row`` of a batch, first ``length`` real positions only (no padding)."""
    out = {k: v[row:row + 1, :length] if k in ("input_ids", "attention_mask") else v[row:row + 1]
           for k, v in inputs.items()}
    return out


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_density_unchanged_when_padding_added(family):
    model = make_model(family)
    padded = make_inputs(family, batch=2, length=7, pad=3)
    if family_kind(family) == "seq2seq":
        padded["labels"][-1, -2:] = -100  # decoder padding
    # An encoder-decoder classifier's decoder reads input_ids shifted right: the last real token is
    # a decoder input only while a position follows it, so the short sequence keeps one padding.
    separate = [_trim(padded, 0, 7), _trim(padded, 1, 5 if family_kind(family) == "encdec-cls" else 4)]
    if family_kind(family) == "seq2seq":
        separate[1]["labels"] = padded["labels"][1:2, :2]
    together, apart = measure(model, [padded]), measure(model, separate)
    for a, b in zip(together.per_layer, apart.per_layer):
        assert a["tokens"] == b["tokens"]
        assert a["density"] == pytest.approx(b["density"], abs=1e-9)
        assert a["density_threshold"] == pytest.approx(b["density_threshold"], abs=1e-9)
        assert a["union_density"] == pytest.approx(b["union_density"], abs=1e-9)
    real = int(padded["attention_mask"].sum())
    enc_or_only = together.per_layer[0]
    assert enc_or_only["tokens"] == real


@pytest.mark.parametrize("family", GC_FAMILIES)
def test_hooks_fire_once_per_layer_with_gradient_checkpointing(family):
    model = make_model(family)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sites = find_sites(model)
    with ActivationCapture(model, sites, approx=make_approx("l0")) as cap:
        out = model(**make_inputs(family))
        loss = combine_terms(cap.pop_terms(), DensityLossConfig()) + out.logits.float().mean()
        loss.backward()
        assert dict(cap.calls) == {i: 1 for i in range(len(sites))}
        # recomputation really happened in backward — and was not counted (Swin checkpoints its
        # stages and their blocks too: a block is recomputed once per enclosing checkpoint)
        assert set(cap.recomputed) == set(range(len(sites))) and min(cap.recomputed.values()) >= 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hooks_fire_once_per_layer_per_forward(family):
    """Each call of a site's module counts once: one per layer (ALBERT's one shared MLP: one per
    layer it serves), as many as plain forward hooks see."""
    model = make_model(family)
    sites = find_sites(model)
    modules = dict(model.named_modules())
    seen = Counter()
    hooks = [modules[s.module].register_forward_hook(lambda m, x, y, i=i: seen.update([i])) for i, s in enumerate(sites)]
    with ActivationCapture(model, sites, approx=make_approx("l0")) as cap:
        for _ in range(3):
            model(**make_inputs(family))
        assert dict(cap.calls) == dict(seen)
        assert sum(seen.values()) == 3 * N_LAYERS * len(sites.stacks) * SITES_PER_LAYER.get(family, 1)
        assert not cap.recomputed
    for h in hooks:
        h.remove()


@pytest.mark.parametrize(("family", "method"), matrix_params())
def test_density_loss_gradient_reaches_trainable_parameters_only(family, method):
    model, _ = build(family, method)
    model.train()
    with ActivationCapture(model, approx=make_approx("l0", eps=1e-2)) as cap:
        model(**make_inputs(family))
        loss = combine_terms(cap.pop_terms(), DensityLossConfig(eps=1e-2))
    assert loss is not None and loss.requires_grad
    loss.backward()
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad
    reached = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
    assert reached, "density loss did not reach any trainable parameter"


def test_no_growth_across_100_training_steps():
    family = "bert"  # one representative pair: 100 training steps
    model, _ = build(family, "lora")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sites = find_sites(model)
    meter = DensityMeter(sites.sites)
    act_modules = [dict(model.get_base_model().named_modules())[s.module] for s in sites]
    with ActivationCapture(model, sites, approx=make_approx("l0"), meter=meter) as cap:
        hooks_before = [len(m._forward_hooks) for m in act_modules]
        for step in range(100):
            out = model(**make_inputs(family, seed=step), labels=torch.tensor([0, 1]))
            loss = out.loss + combine_terms(cap.pop_terms(), DensityLossConfig())
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert cap.pending_terms() == 0
            assert len(meter._union) <= len(sites)
        assert [len(m._forward_hooks) for m in act_modules] == hooks_before
        # never popping must not accumulate either: each forward replaces the last one's terms
        for step in range(5):
            model(**make_inputs(family, seed=step))
            assert cap.pending_terms() == len(sites)
    assert all(len(m._forward_hooks) == 0 for m in act_modules)
    assert not model.get_base_model()._forward_pre_hooks
    assert meter.result().per_layer[0]["tokens"] == 100 * 12 + 5 * 12


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gemma3"])
def test_generate_counts_each_token_once(family):
    model = make_model(family)
    inputs = make_inputs(family, batch=2, length=5)
    inputs["attention_mask"][0, :2] = 0  # left padding, as for batched generation
    new = 4
    sites = find_sites(model)
    meter = DensityMeter(sites.sites)
    with ActivationCapture(model, sites, meter=meter) as cap, cap.sequence_group():
        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert dict(cap.calls) == {i: new for i in range(len(sites))}  # prefill + (new - 1) incremental steps
    rows = meter.result().per_layer
    expected = int(inputs["attention_mask"].sum()) + 2 * (new - 1)
    assert all(r["tokens"] == expected for r in rows)
    width = sites.sites[0].width
    assert all(c.union_total == 2 * width for c in meter.counts)  # one union per sequence across all steps


@pytest.mark.parametrize("family", ["t5", "t5-gated"])
def test_seq2seq_generate_counts_encoder_once_and_each_decoder_token_once(family):
    model = make_model(family)
    inputs = make_inputs(family, batch=2, length=6, pad=2)
    inputs.pop("labels")
    new = 3
    sites = find_sites(model)
    meter = DensityMeter(sites.sites)
    with ActivationCapture(model, sites, meter=meter) as cap, cap.sequence_group():
        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    rep = meter.result().to_dict()
    assert rep["tokens"] == {"encoder": int(inputs["attention_mask"].sum()), "decoder": 2 * new}
    assert all(cap.calls[i] == 1 for i, s in enumerate(sites) if s.stack == "encoder")
    assert all(cap.calls[i] == new for i, s in enumerate(sites) if s.stack == "decoder")


@pytest.mark.parametrize(("family", "method"), matrix_params(methods=["prefix", "prompt"]))
def test_prompt_tuning_virtual_tokens_counted_and_prefix_keys_not(family, method):
    """Prompt tuning's virtual tokens run through the MLPs of the stack reading input_ids: counted;
    a prefix only enters attention as keys / values: not counted."""
    inputs = make_inputs(family, batch=2, length=6, pad=2)
    real = int(inputs["attention_mask"].sum())
    virtual = METHODS[method]["num_virtual_tokens"]
    model, _ = build(family, method)
    rows = measure(model, [inputs]).per_layer
    first = "decoder" if family_kind(family) == "decoder" else "encoder"  # the stack fed input_ids
    expected = real + 2 * virtual if method == "prompt" else real  # virtual tokens per sequence
    per_layer = SITES_PER_LAYER.get(family, 1)  # Qwen2-MoE: routed and shared experts, each over every token
    assert [r["tokens"] for r in rows if r["stack"] == first] == [expected] * N_LAYERS * per_layer
    if family_kind(family) == "seq2seq":  # the decoder reads the 2 × 4 labels, no virtual tokens
        assert [r["tokens"] for r in rows if r["stack"] == "decoder"] == [2 * 4] * N_LAYERS


def test_align_mask_rules():
    act = torch.randn(6, 4)  # OPT-style (B·T, h) with B = 2
    a, m = align_mask(act, torch.tensor([[1, 1, 0], [1, 1, 1]]), batch_size=2)
    assert a.shape == (2, 3, 4) and m.tolist() == [[True, True, False], [True, True, True]]
    # incremental decoding: one new position, mask covers the whole history → last column
    a, m = align_mask(torch.randn(2, 1, 4), torch.tensor([[0, 1, 1], [1, 1, 1]]), None)
    assert m.tolist() == [[True], [True]]
    # virtual tokens prepended without a mask for them → counted
    a, m = align_mask(torch.randn(1, 5, 4), torch.tensor([[1, 1, 0]]), None)
    assert m.tolist() == [[True, True, True, True, False]]
    # beam search: activation batch is a multiple of the mask batch
    a, m = align_mask(torch.randn(4, 2, 4), torch.tensor([[1, 0], [1, 1]]), None)
    assert m.tolist() == [[True, False], [True, False], [True, True], [True, True]]
    with pytest.raises(RuntimeError, match="batch"):
        align_mask(torch.randn(3, 2, 4), torch.ones(2, 2), None)
