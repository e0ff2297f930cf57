import pytest
import torch
import transformers as T

from conftest import FAMILIES, KIND_STACKS, N_LAYERS, build, family_kind, make_inputs, make_model, matrix_params
from deft.core.sites import FAMILY_RULES, UnsupportedModelError, find_sites

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread

EXPECTED_RULE = {"bert": "bert", "roberta": "bert", "distilbert": "distilbert", "t5": "t5", "t5-gated": "t5-gated",
                 "gpt2": "gpt2", "opt": "opt", "llama": "llama-gated", "mistral": "llama-gated",
                 "qwen2": "llama-gated", "gemma3": "llama-gated", "vit": "vit", "albert": "generic",
                 "bart": "generic", "mixtral": "mixtral-moe", "qwen2-moe": "qwen2-moe", "phi3": "phi3-fused",
                 "modernbert": "modernbert-fused", "bloom": "generic", "swin": "generic"}
# Widths of a stack's sites in forward order, by hand from the configs in conftest.py (64 unless
# listed): GPT-2 and BLOOM default to 4 × hidden; Swin's stages are 16 and 32 wide, mlp_ratio 4;
# Qwen2-MoE's layers have the routed experts (64) and the shared expert (48).
WIDTHS = {"gpt2": [128] * 2, "bloom": [128] * 2, "swin": [64, 128], "qwen2-moe": [64, 48] * 2}
GATED = ("t5-gated", "llama", "mistral", "qwen2", "gemma3", "phi3", "modernbert", "mixtral", "qwen2-moe")
ROUTED = ("mixtral", "qwen2-moe")  # mixture of experts: 4 routed experts per layer
FUSED = ("phi3", "modernbert")  # gate and up are the halves of one dense layer
# One MLP module serving every layer (ALBERT): one site; capture counts each of its calls as a
# layer (tests/test_shared_layers.py).
SHARED = ("albert",)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sites_found_per_stack(family):
    model = make_model(family)
    sites = find_sites(model)
    assert sites.family == EXPECTED_RULE[family]
    kind = family_kind(family)
    expected_stacks = KIND_STACKS[kind]
    assert sites.stacks == expected_stacks
    per_layer = 2 if family == "qwen2-moe" else 1
    layers = 1 if family in SHARED else N_LAYERS
    for stack in expected_stacks:  # one number per layer, unique across Swin's stages
        assert [s.layer for s in sites.stack(stack)] == [i for i in range(layers) for _ in range(per_layer)]
        assert [s.width for s in sites.stack(stack)] == WIDTHS.get(family, [64] * layers)
    assert sites.gated == (family in GATED)
    assert sites.experts == (4 if family in ROUTED else 0)
    modules = dict(model.named_modules())
    for s in sites:  # every path points at a real module of the model
        assert s.module in modules and all(p in modules for p in s.parts)
        if s.routed:
            assert (s.first, s.mult, s.down, s.experts) == (None, None, None, 4) and s.module.startswith(s.routed)
        else:
            assert s.first in modules and s.down in modules and s.experts == 0
        assert (s.fused == "gate-up") == (family in FUSED or s.routed is not None)
        if s.fused and not s.routed:  # first is mult: one layer holding both halves
            assert s.mult == s.first and modules[s.first].out_features == 2 * s.width


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ROUTED])
def test_product_point_hooks_down_projection_input(family):
    """What the product point's module receives, seen by plain hooks in a forward pass: σ's
    output, times the up projection's output in gated MLPs — the second half of a fused gate/up
    layer's output (was: compared with act's ``down``, from the same find_sites, so a wrong
    ``down`` path passed; fused layers had no down projection)."""
    model = make_model(family)
    act, product = find_sites(model, "act"), find_sites(model, "product")
    assert all(s.point == "product" for s in product)
    assert [(s.stack, s.layer) for s in product] == [(s.stack, s.layer) for s in act]
    modules = dict(model.named_modules())
    seen, hooks = {}, []
    for i, (a, p) in enumerate(zip(act, product)):
        hooks.append(modules[p.module].register_forward_pre_hook(lambda m, x, i=i: seen.__setitem__(("in", i), x[0])))
        hooks.append(modules[a.module].register_forward_hook(lambda m, x, y, i=i: seen.__setitem__(("act", i), y)))
        if a.mult:
            hooks.append(modules[a.mult].register_forward_hook(lambda m, x, y, i=i: seen.__setitem__(("up", i), y)))
    with torch.no_grad():
        model(**make_inputs(family))
    for h in hooks:
        h.remove()
    assert all(bool(a.mult) == (family in GATED) for a in act)
    for i, a in enumerate(act):
        up = seen[("up", i)][..., a.width:] if a.fused else seen.get(("up", i))
        expected = seen[("act", i)] * up if a.mult else seen[("act", i)]
        torch.testing.assert_close(seen[("in", i)], expected.reshape(seen[("in", i)].shape), rtol=0, atol=0)


@pytest.mark.parametrize("family", ROUTED)
def test_product_point_refused_for_routed_experts(family):
    # The gated product of routed experts is computed inside the experts module: no module input to hook.
    with pytest.raises(UnsupportedModelError, match="product.*routed experts"):
        find_sites(make_model(family), "product")


def test_generic_fallback_finds_unlisted_family():
    config = T.ElectraConfig(vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=3,
                             num_attention_heads=2, intermediate_size=48)
    assert not any("electra" in r.model_types for r in FAMILY_RULES)
    sites = find_sites(T.ElectraForSequenceClassification(config))
    assert sites.family == "generic"
    assert [(s.stack, s.layer, s.width) for s in sites] == [("encoder", i, 48) for i in range(3)]
    assert all(s.down.endswith("output.dense") for s in sites)
    assert [s.module for s in find_sites(T.ElectraModel(config), "product")][0] == "encoder.layer.0.output.dense"


def test_unsupported_model_error_lists_families():
    class NoMlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = T.PretrainedConfig()
            self.layers = torch.nn.ModuleList([torch.nn.LayerNorm(4) for _ in range(2)])

    with pytest.raises(UnsupportedModelError) as err:
        find_sites(NoMlp())
    for family in ("bert", "t5-gated", "llama-gated", "gpt2", "opt", "vit", "distilbert"):
        assert family in str(err.value)


def test_unknown_point_rejected():
    with pytest.raises(ValueError, match="act"):
        find_sites(make_model("bert"), "gate")


@pytest.mark.parametrize(("family", "method"), matrix_params())
def test_sites_identical_under_peft_wrappers(family, method):
    plain = find_sites(make_model(family))
    wrapped = find_sites(build(family, method)[0])
    assert [s.module for s in wrapped] == [s.module for s in plain]
    assert [(s.stack, s.layer, s.width) for s in wrapped] == [(s.stack, s.layer, s.width) for s in plain]
    assert list(wrapped) == list(plain) and wrapped.family == plain.family  # first / mult / down too
