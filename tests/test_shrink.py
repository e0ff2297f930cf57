"""Neuron removal (deft.core.neurons, deft.deploy.shrink, ``deft shrink``): removing neurons that
are 0 on every token leaves the function unchanged (BERT, GPT-2's Conv1D, gated Llama); the
folded bias is the removed neurons' mean contribution; a shrunk run reloads smaller and
bit-identically; bad input is one line and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build, make_inputs, make_model

from deft.cli import main
from deft.core.capture import ActivationCapture
from deft.core.layers import unwrap_model, weight_out_in
from deft.core.metrics import DensityMeter
from deft.core.neurons import NeuronRemoval, apply_removal, check_removable, mlp_parameters, remove_neurons
from deft.core.sites import find_sites
from deft.core.thresholds import Thresholds, apply_thresholds
from deft.deploy.shrink import NeuronActivity, measure_activity, plan_removal
from deft.methods import merge_peft
from deft.tasks.runners.glue import without_labels
from deft.training import RunDir, load_run, task_runner, train

FAMILIES = ("bert", "gpt2", "llama")  # plain Linear, Conv1D (weights (in, out)), gated MLP without biases


def _kill(model, seed=0) -> dict[str, set[int]]:
    """Zero the first-projection rows (and biases) of a random third of every block's neurons:
    σ(0) = 0 for GELU and SiLU, so those neurons are 0 on every token."""
    g = torch.Generator().manual_seed(seed)
    dead = {}
    with torch.no_grad():
        for site in find_sites(model, "act"):
            idx = torch.randperm(site.width, generator=g)[: site.width // 3]
            first = model.get_submodule(site.first)
            weight_out_in(first)[idx] = 0
            if getattr(first, "bias", None) is not None:
                first.bias[idx] = 0
            dead[site.module] = set(idx.tolist())
    return dead


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_dead_neurons_keeps_the_outputs(family, tmp_path):
    model = make_model(family)
    dead = _kill(model)
    widths = [s.width for s in find_sites(model)]
    batches = [make_inputs(family, batch=3, length=7, pad=2, seed=s) for s in range(2)]
    want = [_logits(model, b) for b in batches]
    params = mlp_parameters(model)
    removal = plan_removal(model, measure_activity(model, batches))
    assert {p: set(range(removal.widths[p])) - set(k.tolist()) for p, k in removal.kept.items()} == dead
    assert removal.bias_delta == {}  # never active: nothing to fold
    fresh = make_model(family)
    _kill(fresh)
    remove_neurons(model, removal.kept, removal.bias_delta)
    for b, w in zip(batches, want):
        torch.testing.assert_close(_logits(model, b), w, atol=1e-5, rtol=0)
    # exactly the removed rows / columns are gone: (first [+ up]) rows with biases, down columns
    per_neuron = {"bert": 32 + 1 + 32, "gpt2": 32 + 1 + 32, "llama": 3 * 32}[family]
    assert params - mlp_parameters(model) == per_neuron * sum(map(len, dead.values()))
    assert [s.width for s in find_sites(model)] == [w - len(d) for w, d in zip(widths, dead.values())]
    # the record round-trips: applied to a fresh copy it gives the same model, bit for bit
    removal.save(tmp_path)
    apply_removal(fresh, NeuronRemoval.load(tmp_path))
    assert torch.equal(_logits(fresh, batches[0]), _logits(model, batches[0]))
    with pytest.raises(ValueError, match="made for width"):
        apply_removal(model, removal)  # already smaller


@pytest.mark.parametrize("family", (*FAMILIES, "opt"))  # OPT's MLP sees (B·T, h) activations
def test_a_block_with_every_neuron_dead_goes_to_width_zero(family):
    model = make_model(family)
    site = find_sites(model, "act").sites[0]
    with torch.no_grad():
        weight_out_in(model.get_submodule(site.first)).zero_()
        if getattr(model.get_submodule(site.first), "bias", None) is not None:
            model.get_submodule(site.first).bias.zero_()
    inputs = make_inputs(family, batch=2, length=6, pad=2)
    want = _logits(model, inputs)
    plan = plan_removal(model, measure_activity(model, [inputs]))
    assert plan.kept[site.module].numel() == 0
    remove_neurons(model, plan.kept, plan.bias_delta)
    sites = find_sites(model, "act")
    assert sites.sites[0].width == 0
    torch.testing.assert_close(_logits(model, inputs), want, atol=1e-5, rtol=0)
    # measuring the shrunk model (deft eval / density) counts the empty block as 0 neurons, 0 active
    meter = DensityMeter(sites.sites)
    with ActivationCapture(model, sites, meter=meter), torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want, atol=1e-5, rtol=0)
    assert meter.counts[0].elements == meter.counts[0].nonzero == 0 and meter.counts[1].nonzero > 0
    assert meter.counts[0].tokens == meter.counts[1].tokens > 0


def test_the_folded_bias_is_the_mean_contribution_by_hand():
    model = make_model("bert")
    sites = find_sites(model, "act")
    first, second = sites.sites
    activity = NeuronActivity([s.width for s in sites])
    activity.tokens = [4, 4]
    for n in activity.nonzero:
        n.fill_(4)
    activity.nonzero[0][5], activity.sums[0][5] = 1, 2.0  # active on 1 of 4 tokens, sum 2: mean 0.5
    activity.nonzero[0][7] = 0  # never active
    down, second_down = model.get_submodule(first.down), model.get_submodule(second.down)
    plan = plan_removal(model, activity, max_dead_share=0.25)
    assert set(plan.kept) == {first.module} and 5 not in plan.kept[first.module] and 7 not in plan.kept[first.module]
    assert plan.kept[first.module].numel() == 62
    expected = 0.5 * down.weight[:, 5].detach()
    torch.testing.assert_close(plan.bias_delta[first.module], expected)
    old_bias = down.bias.detach().clone()
    apply_removal(model, plan)
    assert torch.equal(model.get_submodule(first.down).bias.detach(), old_bias + expected)
    assert model.get_submodule(second.down) is second_down  # a block with nothing to remove is untouched
    # a down projection without a bias gets one only when something is folded
    llama = make_model("llama")
    site = find_sites(llama, "act").sites[0]
    w = llama.get_submodule(site.down).weight.detach()
    remove_neurons(llama, {site.module: torch.arange(1, 64)}, {site.module: 3.0 * w[:, 0]})
    assert torch.equal(llama.get_submodule(site.down).bias.detach(), 3.0 * w[:, 0])
    remove_neurons(llama, {find_sites(llama).sites[1].module: torch.arange(1, 64)})
    assert llama.get_submodule(find_sites(llama).sites[1].down).bias is None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fold_reproduces_the_mean_down_output_on_the_calibration_tokens(family):
    """Removing neurons that are active on up to half the tokens: the block's down projection
    output, averaged over the calibration tokens, is unchanged (it is linear in its input)."""
    model = make_model(family)
    sites = find_sites(model, "act")
    apply_thresholds(model, Thresholds(taus={s.module: 0.05 for s in sites}, mode="tau"))
    batches = [make_inputs(family, batch=4, length=8, seed=s) for s in range(2)]  # no padding: every token real
    plan = plan_removal(model, measure_activity(model, batches), max_dead_share=0.5)
    path = sites.sites[0].module
    assert plan.kept[path].numel() < sites.sites[0].width and path in plan.bias_delta  # some active ones go

    def mean_down_output():
        outs = []
        handle = unwrap_model(model).get_submodule(sites.sites[0].down).register_forward_hook(
            lambda m, i, o: outs.append(o.reshape(-1, o.shape[-1])))
        with torch.no_grad():
            for b in batches:
                model(**b)
        handle.remove()
        return torch.cat(outs).double().mean(0)

    want = mean_down_output()
    remove_neurons(model, {path: plan.kept[path]}, {path: plan.bias_delta[path]})  # the first block only
    torch.testing.assert_close(mean_down_output(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_the_down_projection_merges_before_its_columns_go(family):
    # LoRA on q/v and the down projection only (the first projection stays plain, so killed
    # neurons stay dead): the shrunk merged model computes what the unmerged LoRA model does
    model, _ = build(family, "lora", options={"include_mlp": False, "include_mlp_down": True}, trained=True)
    downs = [n for n, _ in model.named_parameters() if ".lora_B." in n and any(
        n.startswith(f"base_model.model.{s.down}.") for s in find_sites(model, "act"))]
    assert len(downs) == len(find_sites(model, "act"))
    dead = _kill(unwrap_model(model))
    batches = [make_inputs(family, batch=3, length=7, pad=2, seed=s) for s in range(2)]
    want = [_logits(model, b) for b in batches]
    merged = merge_peft(model)
    removal = plan_removal(merged, measure_activity(merged, batches))
    assert {p: set(range(removal.widths[p])) - set(k.tolist()) for p, k in removal.kept.items()} == dead
    remove_neurons(merged, removal.kept, removal.bias_delta)
    for b, w in zip(batches, want):
        torch.testing.assert_close(_logits(merged, b), w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,needle", [("lora", "merge it first"), ("adapter", "adapter runs cannot be shrunk")])
def test_unmergeable_or_unmerged_layers_are_refused(method, needle):
    model, _ = build("bert", method)
    with pytest.raises(ValueError, match=needle):
        check_removable(model)
    site = find_sites(model, "act").sites[0]
    with pytest.raises(ValueError, match=needle):
        remove_neurons(model, {site.module: torch.arange(3)})
    if method == "lora":
        check_removable(merge_peft(model))  # merged: plain layers


# -- runs and commands -----------------------------------------------------------------------------
CALIBRATION = 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained run, thresholded with one τ that kills about half the neurons of the
    calibration set (deft sparsify --tau), and its shrunk run (deft shrink)."""
    from conftest import tiny_run_config

    root = tmp_path_factory.mktemp("shrink")
    train(tiny_run_config(root), root / "run", progress=False)
    assert main(["sparsify", "--run", str(root / "run"), "--tau", "0.15", "--calibration-samples", "16",
                 "--output", str(root / "sparse")]) == 0
    assert main(["shrink", "--run", str(root / "sparse"), "--calibration-samples", str(CALIBRATION),
                 "--output", str(root / "shrunk")]) == 0
    return root


def _calibration_batches(run_dir):
    config, model, tokenizer = load_run(run_dir)
    _, loader = task_runner(config).loader(tokenizer, "train", max_samples=CALIBRATION, batch_size=32)
    return model, list(without_labels(loader))


def test_shrunk_run_predicts_as_the_thresholded_run_on_the_calibration_inputs(runs):
    summary = json.loads((runs / "shrunk" / RunDir.SHRINK).read_text())["summary"]
    assert 0 < summary["neurons_after"] < summary["neurons_before"] == 128
    removed = summary["neurons_before"] - summary["neurons_after"]
    assert summary["mlp_params_before"] - summary["mlp_params_after"] == removed * (32 + 1 + 32)  # row + bias + column
    assert summary["params_before"] - summary["params_after"] == removed * (32 + 1 + 32)
    assert all(not r["bias_folded"] for r in summary["layers"])  # only never-active neurons went
    assert not (runs / "shrunk" / RunDir.SHRINK_WEIGHTS).exists()
    thresholded, batches = _calibration_batches(runs / "sparse")
    shrunk, _ = _calibration_batches(runs / "shrunk")
    assert sum(b["input_ids"].shape[0] for b in batches) == CALIBRATION
    unmerged = [_logits(thresholded, b) for b in batches]  # the run as `deft eval --run sparse` computes it
    merged = merge_peft(thresholded)  # shrink's own reference: the same merged weights, nothing removed
    for batch, run_logits in zip(batches, unmerged):
        want, got = _logits(merged, batch), _logits(shrunk, batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert torch.equal(got.argmax(-1), run_logits.argmax(-1))
    # deft eval on the shrunk run works and measures what shrink measured after
    assert main(["eval", "--run", str(runs / "shrunk"), "--json", str(runs / "e.json")]) == 0
    evaluated = json.loads((runs / "e.json").read_text())
    assert evaluated["metrics"]["accuracy"] == pytest.approx(summary["after"]["metric"])
    assert summary["after"]["metric"] == pytest.approx(summary["before"]["metric"])


def test_shrunk_run_reloads_smaller_and_bit_identically(runs):
    summary = json.loads((runs / "shrunk" / RunDir.SHRINK).read_text())["summary"]
    _, a, tokenizer = load_run(runs / "shrunk")
    _, b, _ = load_run(runs / "shrunk")
    assert [s.width for s in find_sites(a)] == [r["width_after"] for r in summary["layers"]]
    assert sum(p.numel() for p in a.parameters()) == summary["params_after"]
    # the record applied by hand to the merged thresholded run: the same model
    _, c, _ = load_run(runs / "sparse")
    c = apply_removal(merge_peft(c), NeuronRemoval.load(runs / "shrunk"))
    batch = tokenizer(["a fine film", "dull and long , and not funny at all"], padding=True, return_tensors="pt")
    assert torch.equal(_logits(a, batch), _logits(b, batch))
    assert torch.equal(_logits(a, batch), _logits(c, batch))


@pytest.mark.parametrize("source,argv,needle", [
    ("run", [], "deft sparsify"),
    ("sparse", ["--max-dead-share", "1"], "[0, 1)"),
    ("sparse", ["--max-dead-share", "-0.1"], "[0, 1)"),
    ("sparse", ["--calibration-samples", "0"], ">= 1"),
    ("shrunk", [], "already shrunk"),
])
def test_shrink_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, source, argv, needle):
    out = tmp_path / "never"
    assert main(["shrink", "--run", str(runs / source), *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_shrink_refuses_to_overwrite_its_source(runs, capsys):
    before = sorted(p.name for p in (runs / "sparse").iterdir())
    assert main(["shrink", "--run", str(runs / "sparse"), "--output", str(runs / "sparse")]) == 2
    assert "source run itself" in capsys.readouterr().err
    assert sorted(p.name for p in (runs / "sparse").iterdir()) == before


@pytest.mark.parametrize("command,needle", [
    (["export", "--out"], "not supported yet"), (["prune", "--sparsity", "0.5", "--output"], "prune the run before"),
])
def test_export_and_prune_of_a_shrunk_run_are_refused_in_one_line(runs, tmp_path, capsys, command, needle):
    """Both rebuild the model at full width before the removal would apply (a size-mismatch
    traceback before): a clear refusal, nothing written."""
    out = tmp_path / "never"
    assert main([command[0], "--run", str(runs / "shrunk"), *command[1:], str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_shrink_benchmark_refuses_a_missing_seed_pair_run_in_one_line(tmp_path):
    """A --seed-pair run that is not a run directory stops the benchmark before any training: exit 2, nothing written."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "shrink.json"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "shrink.py"), "--runs-dir", str(tmp_path / "runs"),
                           "--out", str(out), "--seed-pair", str(tmp_path / "no-peft"), str(tmp_path / "no-deft")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--seed-pair" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()
