import pytest
import torch
import transformers as T
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

from conftest import FAMILIES, N_LAYERS, TEXT_FAMILIES, family_kind, make_model
from deft.core.sites import FAMILY_RULES, UnsupportedModelError, find_sites

EXPECTED_RULE = {"bert": "bert", "roberta": "bert", "distilbert": "distilbert", "t5": "t5", "t5-gated": "t5-gated",
                 "gpt2": "gpt2", "opt": "opt", "llama": "llama-gated", "mistral": "llama-gated",
                 "qwen2": "llama-gated", "gemma3": "llama-gated", "vit": "vit"}
WIDTH = {"gpt2": 128}  # GPT-2's n_inner defaults to 4 × n_embd


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sites_found_per_stack(family):
    model = make_model(family)
    sites = find_sites(model)
    assert sites.family == EXPECTED_RULE[family]
    kind = family_kind(family)
    expected_stacks = {"seq2seq": ("encoder", "decoder"), "decoder": ("decoder",)}.get(kind, ("encoder",))
    assert sites.stacks == expected_stacks
    for stack in expected_stacks:
        assert [s.layer for s in sites.stack(stack)] == list(range(N_LAYERS))
    assert all(s.width == WIDTH.get(family, 64) for s in sites)
    assert sites.gated == (family in ("t5-gated", "llama", "mistral", "qwen2", "gemma3"))
    modules = dict(model.named_modules())
    for s in sites:  # every path points at a real module of the model
        assert s.module in modules and s.first in modules and s.down in modules


@pytest.mark.parametrize("family", list(FAMILIES))
def test_product_point_hooks_down_projection_input(family):
    model = make_model(family)
    act, product = find_sites(model, "act"), find_sites(model, "product")
    assert [s.module for s in product] == [s.down for s in act]
    assert all(s.point == "product" for s in product)


def test_gated_product_is_input_of_down_projection():
    model = make_model("llama")
    seen = {}
    site = find_sites(model, "product").sites[0]
    act_site = find_sites(model, "act").sites[0]
    modules = dict(model.named_modules())
    h1 = modules[site.module].register_forward_pre_hook(lambda m, i: seen.__setitem__("product", i[0]))
    h2 = modules[act_site.module].register_forward_hook(lambda m, i, o: seen.__setitem__("act", o))
    h3 = modules[act_site.mult].register_forward_hook(lambda m, i, o: seen.__setitem__("up", o))
    model(input_ids=torch.randint(3, 100, (1, 5)))
    for h in (h1, h2, h3):
        h.remove()
    torch.testing.assert_close(seen["product"], seen["act"] * seen["up"])


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


def peft_wrap(model, family: str, method: str):
    kind = family_kind(family)
    task_type = {"seq2seq": TaskType.SEQ_2_SEQ_LM, "decoder": TaskType.CAUSAL_LM}.get(kind, TaskType.SEQ_CLS)
    if method == "lora":
        first = find_sites(model).sites[0].first.rsplit(".", 1)[-1]
        config = LoraConfig(task_type=task_type, r=2, target_modules=[first])
    else:
        # DistilBERT's config names its sizes differently; peft needs them spelled out.
        extra = dict(token_dim=32, num_layers=2, num_attention_heads=2) if family == "distilbert" else {}
        cls = PrefixTuningConfig if method == "prefix" else PromptTuningConfig
        config = cls(task_type=task_type, num_virtual_tokens=3, **extra)
    return get_peft_model(model, config)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_sites_identical_under_peft_wrappers(family, method):
    plain = find_sites(make_model(family))
    wrapped = find_sites(peft_wrap(make_model(family), family, method))
    assert [s.module for s in wrapped] == [s.module for s in plain]
    assert [(s.stack, s.layer, s.width) for s in wrapped] == [(s.stack, s.layer, s.width) for s in plain]
