"""ADA-DEFT (deft.adaptive): α per MLP block, real block skipping, export, and the CLI, on tiny models."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import transformers as T
from conftest import FAMILIES, make_inputs, make_model
from safetensors.torch import load_file, save_file

from deft.adaptive import (
    AdaptiveConfig,
    AdaptiveError,
    ConstantProjection,
    ScaledActivation,
    ThresholdPoint,
    adaptive_weights,
    apply_adaptive,
    initial_alphas,
    pick_threshold,
    skip_blocks,
    skip_sites,
    threshold_curve,
)
from deft.deploy import export_model, load_exported, prepare_for_inference
from deft.core.approx import make_approx
from deft.core.capture import ActivationCapture
from deft.methods import get_method, trainable_parameters
from deft.core.sites import find_sites, unwrap_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bert(layers=2, width=32, seed=0):
    torch.manual_seed(seed)
    return T.BertForSequenceClassification(T.BertConfig(
        vocab_size=100, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * width)).eval()


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits


def _block_numel(model, site):
    base = unwrap_model(model)
    return sum(p.numel() for path in (site.first, site.mult, site.down) if path
               for p in base.get_submodule(path).parameters())


# -- α: initialisation, sites, loss ------------------------------------------------------------

def test_alpha_initialisation_mean_std_and_seed():
    values = initial_alphas(20000, AdaptiveConfig(seed=3))
    assert values.mean().item() == pytest.approx(0.8, abs=0.002)
    assert values.std().item() == pytest.approx(0.05, abs=0.002)
    model = _bert(layers=48, width=8)
    handle = apply_adaptive(model, find_sites(model), AdaptiveConfig(seed=7))
    alphas = torch.tensor(list(handle.alphas().values()))
    assert len(alphas) == 48
    assert alphas.mean().item() == pytest.approx(0.8, abs=3 * 0.05 / 48 ** 0.5)
    assert 0.03 < alphas.std().item() < 0.07
    again = apply_adaptive(_bert(layers=48, width=8), None, AdaptiveConfig(seed=7)).alphas()
    other = apply_adaptive(_bert(layers=48, width=8), None, AdaptiveConfig(seed=8)).alphas()
    assert again == handle.alphas() and other != again
    assert apply_adaptive(_bert(), None, AdaptiveConfig(enabled=False)) is None


@pytest.mark.parametrize("family", list(FAMILIES) + ["generic"])
def test_sites_still_found_and_capture_sees_scaled_activation(family):
    if family == "generic":  # not in the family table: found by the generic fallback
        torch.manual_seed(0)
        model = T.ElectraForSequenceClassification(T.ElectraConfig(
            vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)).eval()
        inputs = make_inputs("bert")
    else:
        model, inputs = make_model(family), make_inputs(family)
    before = find_sites(model)
    handle = apply_adaptive(model, before)
    after = find_sites(model)
    assert [s.module for s in after] == [s.module for s in before] and after.family == before.family
    assert all(isinstance(unwrap_model(model).get_submodule(s.module), ScaledActivation) for s in before)
    seen = {}
    hooks = [unwrap_model(model).get_submodule(s.module).inner.register_forward_hook(
        lambda m, i, o, k=s.module: seen.__setitem__(k, o)) for s in before]
    captured = {}
    hooks += [unwrap_model(model).get_submodule(s.module).register_forward_hook(
        lambda m, i, o, k=s.module: captured.__setitem__(k, o)) for s in before]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    for path, alpha in handle.alphas().items():  # the site's output (what capture hooks) is α·σ
        torch.testing.assert_close(captured[path], seen[path] * alpha)


def test_density_loss_sees_scaled_activation():
    model, inputs = make_model("bert"), make_inputs("bert", pad=2)
    handle = apply_adaptive(model, find_sites(model))
    last = handle.sites[-1].module  # the last block: its σ does not depend on its own α

    def l1_terms(alpha):
        handle.set_alphas({last: alpha})
        with ActivationCapture(model, find_sites(model), approx=make_approx("l1")) as capture:
            model(**inputs)
            terms = capture.pop_terms()["encoder"]
        return [float(t.detach()) for t, _ in terms]

    at_one, at_half = l1_terms(1.0), l1_terms(0.5)
    assert at_half[-1] == pytest.approx(0.5 * at_one[-1], rel=1e-6)
    assert at_half[0] == pytest.approx(at_one[0], rel=1e-6)


@pytest.mark.parametrize("method", ["lora", "qlora", "adapter", "prefix", "prompt"])
def test_alpha_trainable_under_every_method(method, tiny_bert_dir):
    m = get_method(method)
    options = {"num_virtual_tokens": 4} if method in ("prefix", "prompt") else None
    base = m.load_base(tiny_bert_dir, T.AutoModelForSequenceClassification, options, num_labels=2)
    model = m.apply(base, options, task_type="SEQ_CLS")
    trainable_before, _ = trainable_parameters(model)
    handle = apply_adaptive(model, find_sites(model, "product"))  # any site point: α wraps σ
    assert trainable_parameters(model)[0] == trainable_before + 2
    model.train()
    ids = torch.randint(1000, 2000, (2, 6))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]))
    out.loss.backward()
    params = handle.parameters()
    assert len(params) == 2 and all(p.requires_grad and p.grad is not None and p.grad.abs() > 0 for p in params)
    before = handle.alphas()
    torch.optim.AdamW(params, lr=1e-2).step()
    assert all(abs(handle.alphas()[k] - v) > 1e-4 for k, v in before.items())


# -- skipping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_skipped_block_equals_alpha_zero_and_frees_weights(family):
    model, inputs = make_model(family), make_inputs(family, pad=2)
    sites = find_sites(model)
    handle = apply_adaptive(model, sites, AdaptiveConfig(seed=1))
    target = sites.sites[0]
    handle.set_alphas({target.module: 0.0})
    reference = _outputs(model, inputs)
    params_before = sum(p.numel() for p in model.parameters())
    expected_drop = _block_numel(model, target) + 1  # W1 (+ Wu) + W2, their biases, and α itself
    old = weakref.ref(unwrap_model(model).get_submodule(target.first))
    removed = skip_blocks(model, sites, threshold=0.01)
    gc.collect()
    assert [s.module for s in removed] == [target.module]
    assert old() is None  # the first dense layer is gone, not just zeroed
    assert params_before - sum(p.numel() for p in model.parameters()) == expected_drop
    assert torch.equal(_outputs(model, inputs), reference)  # bit-exact: α = 0 makes down's input exactly 0
    assert handle.alphas()[target.module] == 0.0 and len(handle.alphas()) == len(sites)
    assert skip_blocks(model, sites, threshold=0.01) == []  # idempotent


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt"])
def test_skip_under_peft_methods(method):
    options = {"lora": {"include_mlp": True}, "prefix": {"num_virtual_tokens": 3},
               "prompt": {"num_virtual_tokens": 3}}.get(method)
    model = get_method(method).apply(_bert(), options, task_type="SEQ_CLS")
    with torch.no_grad():  # non-trivial trained modules: LoRA B and the adapters' up projections start at 0
        for name, p in unwrap_model(model).named_parameters():
            if "lora_B" in name or "adapter_up" in name:
                p.normal_(0, 0.5)
    model.eval()
    handle = apply_adaptive(model, find_sites(model))
    target = handle.sites[1]
    handle.set_alphas({target.module: 0.0})
    inputs = make_inputs("bert", pad=1)
    reference = _outputs(model, inputs)
    skip_blocks(model, None, threshold=0.01)
    down = unwrap_model(model).get_submodule(target.down)
    assert isinstance(down, ConstantProjection)
    if method == "adapter":  # the constant carries the adapter's output on the bias
        assert not torch.allclose(down.constant, torch.zeros_like(down.constant))
    torch.testing.assert_close(_outputs(model, inputs), reference, rtol=0, atol=1e-6)


def test_threshold_curve_switches_blocks_off_and_restores():
    model, inputs = make_model("bert"), make_inputs("bert")
    handle = apply_adaptive(model, find_sites(model))
    first, second = (s.module for s in handle.sites)
    handle.set_alphas({first: 0.003, second: 0.4})
    before = handle.alphas()
    full = _outputs(model, inputs)
    curve = threshold_curve(model, lambda: float(_outputs(model, inputs).sum()), [0.5, 0.0, 0.01])
    assert [p.threshold for p in curve] == [0.0, 0.01, 0.5]
    assert [p.blocks_skipped for p in curve] == [0, 1, 2]
    assert curve[0].metric == pytest.approx(float(full.sum()))
    assert curve[1].mlp_params_removed == _block_numel(model, handle.sites[0])
    assert handle.alphas() == before  # nothing was removed or changed
    points = [ThresholdPoint(t, n, (), 0, m) for t, n, m in [(0.0, 0, 90.0), (0.05, 2, 89.5), (0.3, 4, 85.0)]]
    assert pick_threshold(points, max_drop=1.0).threshold == 0.05


# -- export -------------------------------------------------------------------------------------

def _seq2seq_inputs():
    inputs = make_inputs("t5", pad=1)
    inputs["decoder_input_ids"] = inputs.pop("labels")
    return inputs


@pytest.mark.parametrize("family,method", [("bert", "lora"), ("bert", "adapter"), ("bert", "prefix"),
                                           ("bert", "prompt"), ("t5-gated", "lora"), ("gpt2", "adapter")])
def test_export_round_trip(family, method, tmp_path):
    if family == "bert":
        model, task_type, inputs = _bert(), "SEQ_CLS", make_inputs("bert", pad=1)
    elif family == "t5-gated":
        model, task_type, inputs = make_model("t5-gated"), "SEQ_2_SEQ_LM", _seq2seq_inputs()
    else:
        model, task_type, inputs = make_model("gpt2"), "CAUSAL_LM", make_inputs("gpt2")
    options = {"num_virtual_tokens": 3} if method in ("prefix", "prompt") else None
    model = get_method(method).apply(model, options, task_type=task_type)
    with torch.no_grad():
        for name, p in unwrap_model(model).named_parameters():
            if "lora_B" in name or "adapter_up" in name:
                p.normal_(0, 0.3)
    model.eval()
    handle = apply_adaptive(model, find_sites(model))
    handle.set_alphas({handle.sites[0].module: 0.0})
    removed_numel = _block_numel(model, handle.sites[0])
    skip_blocks(model, None, threshold=0.05)
    reference = _outputs(model, inputs)
    info = export_model(model, tmp_path / "export", threshold=0.05)
    assert len(info["skipped"]) == 1 and info["load_with"] == "deft.deploy.load_exported"
    assert (tmp_path / "export" / "model.deft.safetensors").exists()
    loaded = load_exported(tmp_path / "export")
    torch.testing.assert_close(_outputs(loaded, inputs), reference, rtol=1e-5, atol=1e-5)
    saved = load_file(str(tmp_path / "export" / "model.deft.safetensors"))
    skipped = info["skipped"][0]
    assert not any(k.startswith(skipped["first"] + ".") for k in saved)  # the removed weights are not in the file
    if (family, method) == ("bert", "lora"):  # merged: no LoRA factor left, the plain model less the block
        assert not any("lora_" in k for k in saved)
        assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in _bert().parameters()) \
            - removed_numel
    # a plain from_pretrained cannot silently load a reduced export with random weights
    with pytest.raises(OSError):
        getattr(T, info["architecture"]).from_pretrained(tmp_path / "export")


def test_export_without_skipped_blocks_loads_with_plain_transformers(tmp_path):
    model = get_method("lora").apply(_bert(), None, task_type="SEQ_CLS")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    apply_adaptive(model, find_sites(model))
    inputs = make_inputs("bert", pad=1)
    reference = _outputs(model, inputs)
    info = export_model(model, tmp_path / "plain", threshold=0.05)
    assert info["skipped"] == [] and info["load_with"] == "transformers" and info["alphas_folded"]
    plain = T.BertForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(_outputs(plain, inputs), reference, rtol=1e-5, atol=1e-5)


# -- refused combinations -----------------------------------------------------------------------

def test_unsupported_combinations_fail_clearly():
    model = make_model("bert")
    with pytest.raises(AdaptiveError, match="--ada"):
        skip_blocks(model, find_sites(model), 0.1)
    apply_adaptive(model, find_sites(model))
    with pytest.raises(AdaptiveError, match="twice"):
        apply_adaptive(model, find_sites(model))
    with pytest.raises(AdaptiveError, match=">= 0"):
        skip_blocks(model, None, -1.0)
    site = find_sites(model).sites[0]
    from dataclasses import replace
    with pytest.raises(AdaptiveError, match="down"):
        skip_sites(model, [replace(site, down=None)])
    with pytest.raises(AdaptiveError, match="point 'act'"):
        skip_sites(model, find_sites(model, "product").sites)
    # QLoRA cannot be merged into its NF4 weights: refused with the reason
    from deft.methods import AppliedMethod, QLoraMethodConfig
    from deft.methods.base import _mark_applied
    _mark_applied(model, AppliedMethod("qlora", QLoraMethodConfig(), "SEQ_CLS"))
    with pytest.raises(AdaptiveError, match="QLoRA"):
        prepare_for_inference(model, 0.05)
    with pytest.raises(ValueError, match="lr_scale"):
        AdaptiveConfig(lr_scale=0)


# -- training, saved runs and the CLI ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_train_ada_run_save_restore_and_cli(method, tiny_bert_dir, shared_data, tmp_path, capsys):
    from deft.cli import main
    from deft.training import TrainConfig, load_run, train

    cfg = TrainConfig(model=tiny_bert_dir, tokenizer="minilm", task="sst2", method=method, max_train_samples=16,
                      max_eval_samples=16, batch_size=8, eval_batch_size=8, max_steps=2, max_length=32,
                      data_dir=str(shared_data), ada=True, ada_lr_scale=10.0)
    run = tmp_path / "run"
    results = train(cfg, run, progress=False)
    alphas = results["alphas"]["per_site"]
    initial = results["alphas"]["initial"]
    assert len(alphas) == 2 and all(abs(a - i) > 1e-3 for a, i in zip(alphas.values(), initial))  # trained
    assert (run / "adaptive" / "alphas.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "checkpoints" / "checkpoint-2" / "adaptive" / "adaptive.safetensors").exists()
    _, model, tok = load_run(run)
    assert adaptive_weights(model).alphas() == pytest.approx(alphas)
    # switch block 0 off in the saved run, then: eval with skipping, export, round trip
    weights = run / "adaptive" / "adaptive.safetensors"
    state = load_file(str(weights))
    first = next(iter(alphas))
    state[first] = torch.zeros(1)
    save_file(state, str(weights))
    assert main(["eval", "--run", str(run), "--max-samples", "16", "--skip-threshold", "0.05",
                 "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["skipped"] == [first] and evaluated["density"]["per_layer"][0]["density"] == 0.0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp"), "--skip-threshold", "0.05"]) == 0
    _, in_memory, _ = load_run(run)
    skip_blocks(in_memory, None, 0.05)
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    exported = load_exported(tmp_path / "exp")
    torch.testing.assert_close(_outputs(exported, batch), _outputs(in_memory, batch), rtol=1e-5, atol=1e-5)
    assert T.AutoTokenizer.from_pretrained(tmp_path / "exp") is not None
    capsys.readouterr()
    assert main(["load", "--dir", str(tmp_path / "exp")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == [first]
    out = tmp_path / "ada_bench.json"
    peak_args = [] if method == "lora" else ["--no-peak-memory"]  # fresh processes: measured once
    assert main(["bench-inference", "--run", str(run), "--baseline", str(run), "--repeats", "1",
                 "--max-samples", "16", "--curve", "0", "0.5", "--out", str(out), *peak_args]) == 0
    bench = json.loads(out.read_text())
    if method == "lora":
        for name, variant in bench["variants"].items():
            # the export loaded in a fresh process holds exactly the weights of the in-process variant
            assert variant["peak_memory"]["param_bytes"] == variant["param_bytes"], name
            assert variant["peak_memory"]["peak_bytes"] > 0
        assert isinstance(bench["peak_memory_saving"], float)
    else:
        assert "peak_memory" not in bench["variants"]["ada_deft_skipped"]
    assert bench["blocks_skipped"] == 1 and bench["variants"]["ada_peft"]["blocks_skipped"] == 1
    assert {"time_saving", "memory_saving", "metric_delta"} <= set(bench)
    assert bench["memory_saving_vs_unskipped"] > 0 and len(bench["threshold_curve"]) == 2
    assert bench["largest_threshold_within_1_point"]["threshold"] in (0.0, 0.5)
    assert main(["eval", "--run", str(run), "--skip-threshold", "-1"]) == 2  # clear refusal
    assert "threshold" in capsys.readouterr().err
