"""Tests for deft.methods: the five PEFT methods behind one interface, on tiny random models."""

from __future__ import annotations

import json
import re

import conftest
import pytest
import torch
import transformers as T
from torch import nn

from deft.methods import (
    METHODS,
    AdapterMethodConfig,
    BottleneckAdapter,
    LoraMethodConfig,
    PrefixMethodConfig,
    PromptMethodConfig,
    QLoraMethodConfig,
    UnsupportedCombinationError,
    adapter_modules,
    applied_method,
    config_to_dict,
    default_attention_targets,
    get_method,
    load_method,
    method_config_from_dict,
    read_method_metadata,
    trainable_parameters,
)
from deft.core.sites import find_sites, unwrap_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


# -- tiny models ------------------------------------------------------------------------------


def _bert_config(width=32):
    return T.BertConfig(vocab_size=100, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * width)


def _t5_config(ff="relu", width=32):
    return T.T5Config(vocab_size=100, d_model=width, d_ff=2 * width, num_layers=2, num_heads=2, d_kv=width // 2,
                      decoder_start_token_id=0, pad_token_id=0, feed_forward_proj=ff)


def _gpt2_config():
    return T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)


def _llama_config():
    return T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# name -> (model class, config factory, task type)
MODELS = {
    "bert": (T.BertForSequenceClassification, _bert_config, "SEQ_CLS"),
    "gpt2": (T.GPT2ForSequenceClassification, _gpt2_config, "SEQ_CLS"),
    "llama": (T.LlamaForCausalLM, _llama_config, "CAUSAL_LM"),
    "t5": (T.T5ForConditionalGeneration, lambda: _t5_config("relu"), "SEQ_2_SEQ_LM"),
    "t5-gated": (T.T5ForConditionalGeneration, lambda: _t5_config("gated-gelu"), "SEQ_2_SEQ_LM"),
}
# QLoRA loads its 4-bit base with from_pretrained, from these models saved by the fixture below.
QLORA_MODELS = ("bert", "gpt2", "t5-gated")

CASES = [(m, meth) for m in MODELS for meth in ("lora", "adapter", "prefix", "prompt")] + \
        [(m, "qlora") for m in QLORA_MODELS]

# Small prompts keep GPT-2's 64 positions and the run time small; the defaults are tested apart.
# At width 32 the paper's reduction factor 16 leaves 2 ReLU units per adapter, which may both be
# off at the few positions that get a gradient (BERT's last layer: only [CLS]); 4 leaves 8.
SMALL = {"prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}, "adapter": {"reduction_factor": 4}}
METHOD_PARAM = {"lora": "lora_", "qlora": "lora_", "adapter": "adapter_", "prefix": "prompt_encoder",
                "prompt": "prompt_encoder"}
HEAD = re.compile(r"(^|\.)(classifier|score|qa_outputs|pre_classifier)\.")


def build(name: str, seed: int = 0) -> nn.Module:
    cls, cfg, _ = MODELS[name]
    torch.manual_seed(seed)
    return cls(cfg())


def batch(task_type: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    ids[:, -1] = 2  # an eos token (pad token is 0)
    mask = torch.ones_like(ids)
    if task_type == "SEQ_CLS":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    if task_type == "CAUSAL_LM":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, 100, (2, 4), generator=g)}


def eval_logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def site_paths(model: nn.Module) -> list[tuple]:
    return [(s.module, s.stack, s.layer, s.width, s.first, s.mult, s.down) for s in find_sites(model)]


@pytest.fixture(scope="module")
def qlora_dirs(tmp_path_factory):
    """Tiny models saved with save_pretrained, for QLoRA's 4-bit load_base."""
    root = tmp_path_factory.mktemp("qlora_bases")
    dirs = {}
    for name in QLORA_MODELS:
        build(name).save_pretrained(root / name)
        dirs[name] = (str(root / name), MODELS[name][0])
    return dirs


def fresh_base(model_name: str, method_name: str, qlora_dirs) -> nn.Module:
    if method_name == "qlora":
        path, cls = qlora_dirs[model_name]
        return get_method("qlora").load_base(path, cls, QLoraMethodConfig())
    return build(model_name)


# -- the main contract, per method x model ----------------------------------------------------


@pytest.mark.parametrize(("model_name", "method_name"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_apply_train_save_load(model_name, method_name, qlora_dirs, tmp_path):
    method = get_method(method_name)
    task_type = MODELS[model_name][2]
    config = method.config_cls(**SMALL.get(method_name, {}))
    base = fresh_base(model_name, method_name, qlora_dirs)
    sites_before = site_paths(base)
    model = method.apply(base, config, task_type)
    assert applied_method(model).name == method_name

    # only the method's modules (and the task head) train
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(METHOD_PARAM[method_name] in n for n in trainable)
    stray = [n for n in trainable if METHOD_PARAM[method_name] not in n and not HEAD.search(n)]
    assert not stray, stray
    assert not any("original_module" in n for n in trainable)  # peft's frozen copy of the head
    if task_type == "SEQ_CLS":
        assert any(HEAD.search(n) for n in trainable), "task head must train"
    n_trainable, n_total = trainable_parameters(model)
    assert 0 < n_trainable < n_total

    # the activation sites survive the wrapping
    assert site_paths(model) == sites_before

    # two optimiser steps: every trainable tensor moves (LoRA's A and the adapter's down
    # projection get gradients once B / up are non-zero), no frozen one does
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(2):
        loss = model(**batch(task_type, seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p.detach(), before[n]), f"frozen {n} changed"

    # save -> load onto a freshly built base -> identical outputs
    inputs = {k: v for k, v in batch(task_type, seed=5).items() if k != "labels"}
    if task_type == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6], [0, 7, 8]])
    expected = eval_logits(model, inputs)
    method.save(model, tmp_path / "ckpt")
    name, saved_config, saved_task = read_method_metadata(tmp_path / "ckpt")
    assert (name, saved_config, saved_task) == (method_name, config, task_type)
    reloaded = load_method(fresh_base(model_name, method_name, qlora_dirs), tmp_path / "ckpt")
    torch.testing.assert_close(eval_logits(reloaded, inputs), expected, rtol=0, atol=1e-6)
    assert site_paths(reloaded) == sites_before
    assert trainable_parameters(reloaded)[0] == 0  # loaded for inference by default


@pytest.mark.parametrize("model_name", list(MODELS))
def test_adapter_starts_as_identity(model_name):
    task_type = MODELS[model_name][2]
    inputs = {k: v for k, v in batch(task_type).items() if k != "labels"}
    if task_type == "SEQ_2_SEQ_LM":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6], [0, 7, 8]])
    base = build(model_name)
    expected = eval_logits(base, inputs)
    model = get_method("adapter").apply(base, None, task_type)
    torch.testing.assert_close(eval_logits(model, inputs), expected, rtol=0, atol=0)


# -- the adapter wrapper on every family of sites.py ------------------------------------------

FAMILIES = {
    "bert": lambda: T.BertForSequenceClassification(_bert_config()),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        pad_token_id=1)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
    "t5": lambda: T.T5ForConditionalGeneration(_t5_config("relu")),
    "t5-gated": lambda: T.T5ForConditionalGeneration(_t5_config("gated-gelu")),
    "gpt2": lambda: T.GPT2ForSequenceClassification(_gpt2_config()),
    "opt": lambda: T.OPTForSequenceClassification(T.OPTConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
        word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1)),
    "llama-gated": lambda: T.LlamaForSequenceClassification(_llama_config()),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=8,
        patch_size=4, num_labels=3)),
}
EXPECTED_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
                    "t5": ["q", "v"], "t5-gated": ["q", "v"], "gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"],
                    "llama-gated": ["q_proj", "v_proj"], "vit": ["q_proj", "v_proj"]}


def _forward(model, family):
    model.eval()
    with torch.no_grad():
        if family == "vit":
            return model(pixel_values=torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))).logits
        if family.startswith("t5"):
            return model(input_ids=torch.tensor([[5, 6, 2]]), decoder_input_ids=torch.tensor([[0, 4]])).logits
        return model(input_ids=torch.tensor([[5, 6, 7, 2]])).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_wrapper_every_family(family):
    torch.manual_seed(0)
    base = FAMILIES[family]()
    sites = find_sites(base)
    expected = _forward(base, family)
    originals = {s.down: base.get_submodule(s.down) for s in sites}
    model = get_method("adapter").apply(base, AdapterMethodConfig(), None)
    wrappers = adapter_modules(model)
    assert sorted(wrappers) == sorted(originals)
    if family.startswith("t5"):
        assert {s.stack for s in sites} == {"encoder", "decoder"}
    for path, wrapper in wrappers.items():
        assert isinstance(wrapper, BottleneckAdapter)
        inner = originals[path]
        assert wrapper.base_layer is inner
        assert wrapper.weight is inner.weight  # code reading the down projection still works
        hidden = wrapper.adapter_up.out_features
        assert wrapper.adapter_down.out_features == max(1, hidden // 16)
        if isinstance(inner, nn.Linear):
            assert wrapper.in_features == inner.in_features and wrapper.out_features == inner.out_features
        else:  # GPT-2 Conv1D
            assert wrapper.nf == inner.nf
    assert site_paths(model) == [(s.module, s.stack, s.layer, s.width, s.first, s.mult, s.down) for s in sites]
    torch.testing.assert_close(_forward(model, family), expected, rtol=0, atol=0)
    head = [n for n, p in model.named_parameters() if p.requires_grad and not n.rsplit(".", 2)[-2].startswith("adapter_")]
    assert all(HEAD.search(n) for n in head)
    assert bool(head) == (not family.startswith("t5"))  # T5ForConditionalGeneration has no task head


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_default_targets_every_family(family):
    torch.manual_seed(0)
    base = FAMILIES[family]()
    assert default_attention_targets(base) == EXPECTED_TARGETS[family]
    sites = find_sites(base)
    model = get_method("lora").apply(base, LoraMethodConfig(include_mlp=True), None)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    leaves = {n.rpartition(".")[2] for n in lora_layers}
    # attention q/v plus exactly the MLP first dense layers (full paths: BERT's other `dense` stay plain)
    expected_leaves = set(EXPECTED_TARGETS[family]) | {s.first.rpartition(".")[2] for s in sites}
    assert leaves == expected_leaves
    firsts = {f"base_model.model.{s.first}" for s in sites}
    assert firsts <= lora_layers
    assert not any(n.endswith(tuple(s.down for s in sites)) for n in lora_layers)
    # without a task type the head is still trained (every family here but T5 has one)
    if not family.startswith("t5"):
        assert any(HEAD.search(n) and p.requires_grad for n, p in model.named_parameters())
    assert site_paths(model) == [(s.module, s.stack, s.layer, s.width, s.first, s.mult, s.down) for s in sites]
    _forward(model, family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_include_mlp_down_adds_exactly_the_down_projections(family):
    torch.manual_seed(0)
    base = FAMILIES[family]()
    sites = find_sites(base)
    model = get_method("lora").apply(base, LoraMethodConfig(include_mlp_down=True), None)
    lora_layers = {n.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.")
                   for n, _ in model.named_parameters() if ".lora_A." in n}
    attention = {n for n in lora_layers if n.rpartition(".")[2] in EXPECTED_TARGETS[family]}
    # q/v by their names, then every block's down projection by its full path and nothing else
    assert lora_layers - attention == {s.down for s in sites if s.down}
    assert not any(s.first in lora_layers for s in sites if s.first and s.first != s.down)
    _forward(model, family)


# -- task heads -------------------------------------------------------------------------------


def test_bert_classifier_trains_with_lora():
    model = get_method("lora").apply(build("bert"), None, "SEQ_CLS")
    head = unwrap_model(model).classifier
    before = head.modules_to_save["default"].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**batch("SEQ_CLS")).loss.backward()
    opt.step()
    assert not torch.equal(head.modules_to_save["default"].weight, before)
    assert not head.original_module.weight.requires_grad


def test_distilbert_pre_classifier_and_qa_head():
    torch.manual_seed(0)
    for name in ("lora", "prompt"):  # peft trains `classifier` itself; `pre_classifier` is added
        model = get_method(name).apply(FAMILIES["distilbert"](), SMALL.get(name), "SEQ_CLS")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("pre_classifier" in n for n in names) and any(".classifier." in n for n in names), name
    model = get_method("adapter").apply(FAMILIES["distilbert"](), None, "SEQ_CLS")
    assert model.pre_classifier.weight.requires_grad and model.classifier.weight.requires_grad
    for name in ("lora", "adapter", "prompt"):
        model = get_method(name).apply(T.BertForQuestionAnswering(_bert_config()), SMALL.get(name), "QUESTION_ANS")
        assert any("qa_outputs" in n for n, p in model.named_parameters() if p.requires_grad), name
        out = model(input_ids=torch.tensor([[5, 6, 7]]), start_positions=torch.tensor([1]),
                    end_positions=torch.tensor([2]))
        assert out.loss.requires_grad


# -- registry, configs, errors ----------------------------------------------------------------


def test_registry_and_unknown_method():
    assert sorted(METHODS) == ["adapter", "lora", "prefix", "prompt", "qlora"]
    assert get_method("LoRA") is METHODS["lora"]
    with pytest.raises(ValueError, match="adapter, lora, prefix, prompt, qlora"):
        get_method("ia3")


def test_paper_defaults():
    lora = LoraMethodConfig()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules, lora.include_mlp) == (8, 16, 0.1, None, False)
    q = QLoraMethodConfig()
    assert (q.quant_type, q.double_quant, q.r) == ("nf4", True, 8)
    assert (AdapterMethodConfig().reduction_factor, AdapterMethodConfig().non_linearity) == (16, "relu")
    assert PrefixMethodConfig().num_virtual_tokens == 60
    assert (PromptMethodConfig().num_virtual_tokens, PromptMethodConfig().init) == (60, "RANDOM")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_config_json_round_trip(name):
    config = METHODS[name].config_cls()
    d = json.loads(json.dumps(config_to_dict(config)))
    assert d["method"] == name
    assert method_config_from_dict(name, d) == config
    with pytest.raises(ValueError, match="unknown field"):
        method_config_from_dict(name, {"not_a_field": 1})
    other = "lora" if name != "lora" else "adapter"
    with pytest.raises(ValueError, match="config dict is for method"):
        method_config_from_dict(other, d)


def test_config_validation_and_target_override():
    with pytest.raises(ValueError):
        LoraMethodConfig(r=0)
    with pytest.raises(ValueError):
        AdapterMethodConfig(non_linearity="swish2")
    with pytest.raises(ValueError):
        PromptMethodConfig(init="TEXT")
    model = get_method("lora").apply(build("bert"), {"target_modules": ["key"]}, "SEQ_CLS")
    lora = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora and all(".key.lora_A" in n for n in lora)
    with pytest.raises(ValueError, match="unknown task_type"):
        get_method("lora").apply(build("bert"), None, "TOKEN_CLS")


def test_default_prompt_lengths_apply():
    bert = get_method("prompt").apply(build("bert"), None, "SEQ_CLS")
    assert bert.prompt_encoder["default"].embedding.weight.shape == (60, 32)
    prefix = get_method("prefix").apply(build("bert"), None, "SEQ_CLS")
    # 60 virtual tokens x 2 layers x (key, value) x width
    assert prefix.prompt_encoder["default"].embedding.weight.shape == (60, 2 * 2 * 32)
    out = prefix(**batch("SEQ_CLS"))
    assert out.logits.shape == (2, 2)


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_prefix_reaches_attention(model_name):
    """The prefix must enter attention through the cache, not be dropped on the way.

    transformers 5.24 renamed the backbone's ``past_key_values`` argument, after which peft 0.21
    refuses prefix tuning: pyproject pins the release this test passes on.
    """
    task_type = MODELS[model_name][2]
    model = build(model_name)
    inputs = {k: v for k, v in batch(task_type).items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs, output_hidden_states=True).hidden_states[-1]
    prefixed = get_method("prefix").apply(model, SMALL["prefix"], task_type)
    with torch.no_grad():
        for p in prefixed.prompt_encoder.parameters():
            p.normal_(std=3.0)
        after = prefixed(**inputs, output_hidden_states=True).hidden_states[-1]
    assert after.shape == before.shape
    assert (after - before).abs().max() > 0.1


def test_unsupported_combinations():
    distil = FAMILIES["distilbert"]()
    with pytest.raises(UnsupportedCombinationError, match="past_key_values"):
        get_method("prefix").apply(distil, SMALL["prefix"], "SEQ_CLS")
    for name in ("prefix", "prompt"):
        t5_cls = T.T5ForSequenceClassification(_t5_config())
        with pytest.raises(UnsupportedCombinationError, match="SEQ_2_SEQ_LM"):
            get_method(name).apply(t5_cls, SMALL[name], "SEQ_CLS")
        with pytest.raises(ValueError, match="unknown task_type"):
            get_method(name).apply(build("bert"), SMALL[name], None)
        with pytest.raises(UnsupportedCombinationError, match="input_ids"):
            get_method(name).apply(FAMILIES["vit"](), SMALL[name], "SEQ_CLS")
    with pytest.raises(ValueError, match="4-bit"):
        get_method("qlora").apply(build("bert"), None, "SEQ_CLS")
    with pytest.raises(ValueError, match="peft"):
        get_method("adapter").apply(get_method("lora").apply(build("bert"), None, "SEQ_CLS"), None, "SEQ_CLS")
    with pytest.raises(ValueError, match="already"):
        get_method("adapter").apply(get_method("adapter").apply(build("bert"), None, "SEQ_CLS"), None, "SEQ_CLS")
    with pytest.raises(TypeError):
        get_method("adapter").apply(build("bert"), LoraMethodConfig(), "SEQ_CLS")


@pytest.mark.parametrize(("family", "method"), [pytest.param(f, m, id=f"{f}-{m}") for f in conftest.FAMILIES
                                                 for m in conftest.METHODS if conftest.unsupported(f, m)])
def test_matrix_exclusions_are_refused(family, method):
    """Every pair conftest.py leaves out of its family × method matrix is one deft.methods refuses,
    with UnsupportedCombinationError: the exclusions hide no combination that works."""
    assert (family, method) not in conftest.MATRIX
    task_type = conftest.task_type_of(family) or "SEQ_CLS"  # a text task type: the model is what is refused
    with pytest.raises(UnsupportedCombinationError):
        get_method(method).apply(conftest.make_model(family), conftest.METHODS[method], task_type)


def test_load_checks_method(tmp_path):
    model = get_method("adapter").apply(build("bert"), None, "SEQ_CLS")
    get_method("adapter").save(model, tmp_path)
    with pytest.raises(ValueError, match="not 'lora'"):
        get_method("lora").load(build("bert"), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_method(build("bert"), tmp_path / "missing")
    with pytest.raises(ValueError, match="not prepared"):
        get_method("lora").save(model, tmp_path / "x")
    trained = get_method("adapter").load(build("bert"), tmp_path, is_trainable=True)
    assert trainable_parameters(trained) == trainable_parameters(model)


# -- parameter counts and QLoRA specifics -----------------------------------------------------


def test_trainable_parameters_counts(qlora_dirs):
    plain = build("bert")
    n = sum(p.numel() for p in plain.parameters())
    assert trainable_parameters(plain) == (n, n)
    adapted = get_method("adapter").apply(build("bert"), None, "SEQ_CLS")
    extra = sum(p.numel() for w in adapter_modules(adapted).values()
                for p in (*w.adapter_down.parameters(), *w.adapter_up.parameters()))
    head = sum(p.numel() for p in adapted.classifier.parameters())
    assert trainable_parameters(adapted) == (extra + head, n + extra)
    # 4-bit weights count their unpacked elements, as peft does
    path, cls = qlora_dirs["bert"]
    q = get_method("qlora").load_base(path, cls)
    full = sum(p.numel() for p in build("bert").parameters())
    assert any(p.__class__.__name__ == "Params4bit" for p in q.parameters())
    assert trainable_parameters(q)[1] == full
    assert q.classifier.weight.dtype == torch.float32  # task head left unquantised


def test_qlora_trains_after_cpu_evaluation(tmp_path):
    """bitsandbytes' AVX512 CPU repack (eval, no grad) must not break training that follows."""
    torch.manual_seed(0)
    T.BertForSequenceClassification(_bert_config(64)).save_pretrained(tmp_path)  # widths the repack accepts
    method = get_method("qlora")
    base = method.load_base(str(tmp_path), T.BertForSequenceClassification)
    layers = [m for m in base.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    for m in layers:  # as if loaded elsewhere: let bitsandbytes repack where the CPU can
        m.support_avx512bf16_for_cpu = True
    eval_logits(base, {"input_ids": torch.tensor([[5, 6, 7, 2]])})
    model = method.apply(base, QLoraMethodConfig(gradient_checkpointing=True), "SEQ_CLS")  # undoes any repack
    assert unwrap_model(model).is_gradient_checkpointing
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # train, evaluate, train again
        model.train()
        model(**batch("SEQ_CLS")).loss.backward()
        opt.step()
        opt.zero_grad()
        eval_logits(model, {"input_ids": torch.tensor([[5, 6, 7, 2]])})
    model.train()
    model(**batch("SEQ_CLS")).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_t5_classification_head_trains_with_lora():
    """T5ForSequenceClassification names its head ``classification_head``; it must train (it once did not)."""
    import transformers as T

    from deft.methods import get_method

    torch.manual_seed(0)
    model = T.T5ForSequenceClassification(T.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                                     d_kv=16, decoder_start_token_id=0, pad_token_id=0, num_labels=2))
    model = get_method("lora").apply(model, None, task_type="SEQ_CLS")
    head = [n for n, p in model.named_parameters() if "classification_head" in n and p.requires_grad]
    assert head, "T5 classification head is frozen"
