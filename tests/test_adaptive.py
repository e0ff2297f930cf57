"""ADA-DEFT (deft.adaptive): α per MLP block, real block skipping, export, and the CLI, on tiny models.

Where a PEFT method is involved the tests run over conftest.py's family × method matrix (export
round trips: over its one-family-per-kind subset, REPRESENTATIVES)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import (FAMILIES, KIND_STACKS, REFUSED, REPRESENTATIVES, ROUTED_FAMILIES, SITES_PER_LAYER, build,
                      family_kind, labels_for, make_inputs, make_model, matrix_params)
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
from deft.methods import trainable_parameters
from deft.core.sites import find_sites, unwrap_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def _bert(layers=2, width=32, seed=0):
    torch.manual_seed(seed)
    return T.BertForSequenceClassification(T.BertConfig(
        vocab_size=100, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * width)).eval()


def _inputs(family):
    """Inputs with a padded position; an encoder-decoder gets its decoder input instead of labels."""
    inputs = make_inputs(family, pad=1)
    if family_kind(family) == "seq2seq":
        inputs["decoder_input_ids"] = inputs.pop("labels")
    return inputs


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits


def _block_numel(model, site):
    base = unwrap_model(model)
    return sum(p.numel() for path in dict.fromkeys((site.first, site.mult, site.down)) if path  # fused: one layer
               for p in base.get_submodule(path).parameters())


def _assert_routed_refusal(action, family):
    """Blocks of routed experts cannot be skipped (conftest.ROUTED_REFUSED): one line, nothing removed."""
    assert family in ROUTED_FAMILIES
    with pytest.raises(AdaptiveError, match="mixture-of-experts") as err:
        action()
    assert "\n" not in str(err.value)


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


@pytest.mark.parametrize(("family", "method"), [*matrix_params(), pytest.param("generic", None, id="generic")])
def test_sites_still_found_and_capture_sees_scaled_activation(family, method):
    if family == "generic":  # not in the family table: found by the generic fallback
        torch.manual_seed(0)
        model = T.ElectraForSequenceClassification(T.ElectraConfig(
            vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)).eval()
        inputs = make_inputs("bert")
    else:
        model, inputs = build(family, method)[0], make_inputs(family)
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


@pytest.mark.parametrize(("family", "method"), matrix_params())
def test_alpha_trainable_under_every_method(family, method):
    model, _ = build(family, method)
    trainable_before, _ = trainable_parameters(model)
    point = "act" if family in ROUTED_FAMILIES else "product"  # routed experts: ROUTED_REFUSED["product"]
    handle = apply_adaptive(model, find_sites(model, point))  # any site point: α wraps σ
    # two layers per stack, each with its MLP block; ALBERT's one block serves both layers
    n_sites = len(KIND_STACKS[family_kind(family)]) * (1 if family == "albert" else 2)
    n_sites *= SITES_PER_LAYER.get(family, 1)  # Qwen2-MoE: routed and shared experts
    assert len(handle.sites) == n_sites and trainable_parameters(model)[0] == trainable_before + n_sites
    model.train()
    out = model(**labels_for(family, make_inputs(family)))
    out.loss.backward()
    params = handle.parameters()
    assert len(params) == n_sites
    assert all(p.requires_grad and p.grad is not None and p.grad.abs() > 0 for p in params)
    before = handle.alphas()
    torch.optim.AdamW(params, lr=1e-2).step()
    assert all(abs(handle.alphas()[k] - v) > 1e-4 for k, v in before.items())


# -- skipping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_skipped_block_equals_alpha_zero_and_frees_weights(family):
    model, inputs = make_model(family), make_inputs(family, pad=2)
    sites = find_sites(model)
    handle = apply_adaptive(model, sites, AdaptiveConfig(seed=1))
    if all(s.routed for s in sites):
        handle.set_alphas({sites.sites[0].module: 0.0})
        return _assert_routed_refusal(lambda: skip_blocks(model, sites, threshold=0.01), family)
    target = next(s for s in sites if not s.routed)  # Qwen2-MoE: its shared expert is a dense block
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


@pytest.mark.parametrize(("family", "method"), matrix_params())
def test_skip_under_peft_methods(family, method):
    # trained=True: non-trivial trained modules (LoRA B and the adapters' up projections start at 0)
    model, _ = build(family, method, trained=True)
    handle = apply_adaptive(model, find_sites(model))
    target = handle.sites[min(1, len(handle.sites) - 1)]  # ALBERT has one (shared) block
    handle.set_alphas({target.module: 0.0})
    inputs = _inputs(family)
    reference = _outputs(model, inputs)
    if target.routed:
        return _assert_routed_refusal(lambda: skip_blocks(model, None, threshold=0.01), family)
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
    # by hand from the config (hidden 32, intermediate 64): W1 + b1 + W2 + b2 of one BERT block
    # (was: the same sum over the same modules as the code under test)
    assert curve[1].mlp_params_removed == 32 * 64 + 64 + 64 * 32 + 32
    assert curve[2].mlp_params_removed == 2 * (32 * 64 + 64 + 64 * 32 + 32)
    assert handle.alphas() == before  # nothing was removed or changed
    points = [ThresholdPoint(t, n, (), 0, m) for t, n, m in [(0.0, 0, 90.0), (0.05, 2, 89.5), (0.3, 4, 85.0)]]
    assert pick_threshold(points, max_drop=1.0).threshold == 0.05


# -- export -------------------------------------------------------------------------------------

# Export round trips write and load a directory per pair: one family per kind (REPRESENTATIVES)
# × every method keeps the suite fast; the other families differ only in their site paths,
# which the skipping tests above cover on every pair.
@pytest.mark.parametrize(("family", "method"), matrix_params(families=REPRESENTATIVES))
def test_export_round_trip(family, method, tmp_path):
    model, _ = build(family, method, trained=True)
    inputs = _inputs(family)
    handle = apply_adaptive(model, find_sites(model))
    handle.set_alphas({handle.sites[0].module: 0.0})
    removed_numel = _block_numel(make_model(family), handle.sites[0])  # the base weights (LoRA's merged in)
    skip_blocks(model, None, threshold=0.05)
    reference = _outputs(model, inputs)
    if method in REFUSED["export"]:  # refused with the reason, nothing written
        with pytest.raises(AdaptiveError, match="QLoRA"):
            export_model(model, tmp_path / "export", threshold=0.05)
        assert not (tmp_path / "export").exists()
        return
    info = export_model(model, tmp_path / "export", threshold=0.05)
    assert len(info["skipped"]) == 1 and info["load_with"] == "deft.deploy.load_exported"
    assert (tmp_path / "export" / "model.deft.safetensors").exists()
    loaded = load_exported(tmp_path / "export")
    torch.testing.assert_close(_outputs(loaded, inputs), reference, rtol=1e-5, atol=1e-5)
    saved = load_file(str(tmp_path / "export" / "model.deft.safetensors"))
    skipped = info["skipped"][0]
    assert not any(k.startswith(skipped["first"] + ".") for k in saved)  # the removed weights are not in the file
    if method == "lora":  # merged: no LoRA factor left, the plain model less the block
        assert not any("lora_" in k for k in saved)
        assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in make_model(family).parameters()) \
            - removed_numel
    # a plain from_pretrained cannot silently load a reduced export with random weights
    with pytest.raises(OSError):
        getattr(T, info["architecture"]).from_pretrained(tmp_path / "export")


@pytest.mark.parametrize(("family", "method"), matrix_params(families=REPRESENTATIVES, methods=["lora"]))
def test_export_without_skipped_blocks_loads_with_plain_transformers(family, method, tmp_path):
    model, _ = build(family, method, trained=True)
    apply_adaptive(model, find_sites(model))
    inputs = _inputs(family)
    reference = _outputs(model, inputs)
    info = export_model(model, tmp_path / "plain", threshold=0.05)
    assert info["skipped"] == [] and info["load_with"] == "transformers" and info["alphas_folded"]
    plain = FAMILIES[family][1].from_pretrained(tmp_path / "plain").eval()
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
def test_train_ada_run_save_restore_and_cli(method, tiny_bert_dir, shared_data, tmp_path, capsys, monkeypatch):
    from deft.cli import main
    from deft.deploy.measure import peak_memory_of_export
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
    # the run's tokenizer went along (was: "from_pretrained(...) is not None", which cannot fail)
    exported_tok = T.AutoTokenizer.from_pretrained(tmp_path / "exp")
    assert exported_tok(["a fine film", "dull"])["input_ids"] == tok(["a fine film", "dull"])["input_ids"]
    capsys.readouterr()
    assert main(["load", "--dir", str(tmp_path / "exp")]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == [first]
    # bench-inference: one repeat, a two-point curve. Its peak-memory measurement starts a fresh
    # Python process per variant (~5 s each: three were most of this test's time). Here bench runs
    # the child's measurement in-process instead, so its wiring (every variant exported, loaded
    # and measured; the savings) is still exercised; the fresh process itself runs once, below,
    # on the export `deft export` wrote, which is the skipped variant's. The adapter run covers
    # bench without a baseline and without peak memory.
    out = tmp_path / "ada_bench.json"
    if method == "lora":
        from deft.deploy import peak_memory_child

        measured = []

        def in_process(export_dir, batches_file, threads=None):
            measured.append(Path(export_dir).name)
            return peak_memory_child.main(str(export_dir), str(batches_file), torch.get_num_threads())

        monkeypatch.setattr("deft.deploy.bench.peak_memory_of_export", in_process)
        extra = ["--baseline", str(run)]
    else:
        extra = ["--no-peak-memory"]
    assert main(["bench-inference", "--run", str(run), "--repeats", "1", "--max-samples", "16",
                 "--curve", "0", "0.05", "--out", str(out), *extra]) == 0
    bench = json.loads(out.read_text())
    variants = bench["variants"]
    if method == "lora":
        assert sorted(measured) == sorted(variants) == ["ada_deft_skipped", "ada_deft_unskipped", "ada_peft"]
        for name, variant in variants.items():
            # the export, loaded on its own, holds exactly the weights of the in-process variant
            assert variant["peak_memory"]["param_bytes"] == variant["param_bytes"], name
        assert isinstance(bench["peak_memory_saving"], float)
        assert variants["ada_peft"]["blocks_skipped"] == 1
        # the baseline is this very run, skipped at the same threshold: nothing saved, nothing lost
        assert bench["memory_saving"] == 0.0 and bench["metric_delta"] == 0.0
        assert isinstance(bench["time_saving"], float)
        # the one fresh process: what `deft export` wrote, loaded and run as a deployment would
        batches_file = tmp_path / "batches.pt"
        torch.save([dict(batch)], batches_file)
        fresh = peak_memory_of_export(tmp_path / "exp", batches_file)
        assert fresh["param_bytes"] == variants["ada_deft_skipped"]["param_bytes"] and fresh["peak_bytes"] > 0
    else:
        assert set(variants) == {"ada_deft_unskipped", "ada_deft_skipped"}
        assert all("peak_memory" not in v for v in variants.values())
        assert bench["time_saving"] is None and bench["memory_saving"] is None and bench["metric_delta"] is None
    assert bench["blocks_skipped"] == 1 and variants["ada_deft_skipped"]["skipped"] == [first]
    assert bench["memory_saving_vs_unskipped"] > 0
    # The curve, checked against what was computed another way: the blocks under each threshold
    # from the saved α values by hand; the metrics against the variants, which remove the block
    # for real (and merge, fold) instead of forcing α to 0; the pick by pick_threshold's rule
    # (most blocks skipped within 1 point of no skipping) on those variants' metrics. (Was: the
    # pick checked to be one of the curve's two thresholds, which held whatever it picked.)
    saved_alphas = {k: float(v) for k, v in load_file(str(weights)).items()}
    curve = bench["threshold_curve"]
    assert [p["threshold"] for p in curve] == [0.0, 0.05]
    assert [set(p["skipped"]) for p in curve] == [{k for k, a in saved_alphas.items() if abs(a) < t}
                                                  for t in (0.0, 0.05)] == [set(), {first}]
    unskipped, skipped = variants["ada_deft_unskipped"]["metric"], variants["ada_deft_skipped"]["metric"]
    assert [p["metric"] for p in curve] == pytest.approx([unskipped, skipped], abs=1e-9)
    expected = 0.05 if skipped >= unskipped - 1.0 else 0.0
    assert bench["largest_threshold_within_1_point"]["threshold"] == expected
    assert main(["eval", "--run", str(run), "--skip-threshold", "-1"]) == 2  # clear refusal
    assert "threshold" in capsys.readouterr().err
