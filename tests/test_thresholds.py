"""Activation thresholds (deft.core.thresholds, deft.deploy.sparsify / sweep): exact zeros, the
target density met on the calibration data, saved and reloaded bit-identically, the commands."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXT_FAMILIES, make_inputs, make_model

from deft.adaptive import AdaptiveConfig, apply_adaptive
from deft.cli import main
from deft.core.capture import ActivationCapture
from deft.core.metrics import DensityMeter
from deft.core.sites import find_sites
from deft.core.thresholds import (ThresholdedActivation, Thresholds, applied_thresholds, apply_thresholds,
                                  remove_thresholds, thresholded_modules)
from deft.deploy import choose_thresholds, export_model, load_exported
from deft.deploy.sparsify import MagnitudeSampler
from deft.training import RunDir, load_run, train


def test_thresholded_activation_zeroes_exactly_what_a_loop_says():
    act = ThresholdedActivation(torch.nn.GELU(), 0.1)
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    out = act(x)
    ref = torch.nn.functional.gelu(x)
    for i in range(3):
        for j in range(5):
            for k in range(7):
                a = float(ref[i, j, k])
                assert float(out[i, j, k]) == (0.0 if abs(a) <= 0.1 else a)


def _magnitudes(model, family, batches):
    sites = find_sites(model, "act")
    sampler = MagnitudeSampler(len(sites))
    with torch.no_grad(), ActivationCapture(model, sites, meter=sampler):
        for inputs in batches:
            model(**inputs)
    return [s.module for s in sites], sampler.result()


def _density(model, batches):
    meter = DensityMeter(find_sites(model, "act").sites)
    with torch.no_grad(), ActivationCapture(model, find_sites(model, "act"), meter=meter):
        for inputs in batches:
            model(**inputs)
    return meter.result()


@pytest.mark.parametrize("family", TEXT_FAMILIES)
@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_thresholds_meet_the_target_density_on_the_calibration_data(family, mode):
    model = make_model(family)
    batches = [make_inputs(family, batch=4, length=12, pad=3, seed=s) for s in range(3)]
    untouched = _density(model, batches)
    paths, values = _magnitudes(model, family, batches)
    # Targets under every layer's own density (ReLU families start near 0.5, GELU ones near 1).
    targets = [t for t in (0.5, 0.3, 0.1) if t < min(r["density"] for r in untouched.per_layer) - 0.02]
    assert 0.1 in targets
    for target in targets:
        apply_thresholds(model, choose_thresholds(paths, values, density=target, mode=mode))
        report = _density(model, batches)
        assert report.overall == pytest.approx(target, abs=0.01), (family, mode, target)
        if mode == "uniform":  # every layer at the target, not only their mean
            assert all(abs(r["density"] - target) <= 0.01 for r in report.per_layer)
        else:  # one τ for all layers
            assert len(set(choose_thresholds(paths, values, density=target, mode=mode).taus.values())) == 1
        remove_thresholds(model)
    assert not thresholded_modules(model)
    assert _density(model, batches).per_layer == untouched.per_layer  # removed cleanly


def test_thresholds_sit_inside_ada_alpha_and_keep_its_handle():
    model = make_model("bert")
    handle = apply_adaptive(model, config=AdaptiveConfig(seed=0))
    inputs = make_inputs("bert", batch=2, length=8)
    paths = [s.module for s in find_sites(model, "act")]
    apply_thresholds(model, Thresholds(taus={p: 0.05 for p in paths}, mode="tau"))
    from deft.adaptive import adaptive_weights

    assert adaptive_weights(model).alphas() == pytest.approx(handle.alphas())
    assert set(thresholded_modules(model)) == set(paths)
    assert applied_thresholds(model)["mode"] == "tau"
    # exact zeros at the down projection's input: what the block's down projection receives
    seen = []
    down = model.get_submodule(find_sites(model, "act").sites[0].down)
    h = down.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**inputs)
    h.remove()
    assert float((seen[0] == 0).float().mean()) > 0.05


def test_bad_thresholds_are_refused():
    model = make_model("bert")
    with pytest.raises(ValueError, match="do not fit"):
        apply_thresholds(model, Thresholds(taus={"no.such.site": 0.1}, mode="tau"))
    with pytest.raises(ValueError, match=">= 0"):
        Thresholds(taus={"x": -1.0}, mode="tau")
    with pytest.raises(ValueError, match="unknown threshold mode"):
        Thresholds(taus={}, mode="bogus")


# -- runs and commands -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import tiny_run_config

    root = tmp_path_factory.mktemp("thr")
    train(tiny_run_config(root), root / "run", progress=False)
    return root


def test_sparsify_writes_a_run_that_reloads_bit_identically(run, tmp_path, capsys):
    out = tmp_path / "sparse"
    assert main(["sparsify", "--run", str(run / "run"), "--density", "0.3", "--calibration-samples", "32",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
    payload = json.loads((out / "sparsify.json").read_text())
    assert payload["thresholds"]["calibration"]["density"] == pytest.approx(0.3, abs=0.01)
    assert payload["after"]["density"] < payload["before"]["density"]
    assert payload["after"]["density_report"]["thresholds"]["mode"] == "uniform"
    assert payload["before"]["density_report"]["thresholds"] is None
    # reloaded twice: the same thresholds, bit-identical logits, the same density as sparsify measured
    _, a, tok = load_run(out)
    _, b, _ = load_run(out)
    batch = tok(["a fine film", "dull and long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)
    assert {p: m.tau for p, m in thresholded_modules(a).items()} == payload["thresholds"]["taus"]
    assert main(["eval", "--run", str(out), "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["density"]["overall"] == pytest.approx(payload["after"]["density"])
    assert evaluated["density"]["thresholds"]["target_density"] == 0.3
    # an export keeps them: deft's loader re-applies them, plain from_pretrained is refused
    info = export_model(a, tmp_path / "export", tokenizer=tok)
    assert info["thresholds"]["taus"] == payload["thresholds"]["taus"] and info["weights_variant"] == "deft"
    loaded = load_exported(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, b(**batch).logits)


@pytest.mark.parametrize("argv,needle", [
    (["--density", "0"], "(0, 1]"), (["--density", "1.5"], "(0, 1]"), (["--tau", "-0.1"], ">= 0"),
    (["--density", "0.3", "--calibration-samples", "0"], ">= 1"),
])
def test_sparsify_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    assert main(["sparsify", "--run", str(run / "run"), *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sparsify_refuses_a_thresholded_run_without_force(run, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["sparsify", "--run", str(run / "run"), "--tau", "0.05", "--output", str(first)]) == 0
    capsys.readouterr()
    assert main(["sparsify", "--run", str(first), "--density", "0.5", "--output", str(tmp_path / "second")]) == 2
    assert "--force" in capsys.readouterr().err and not (tmp_path / "second").exists()
    assert main(["sparsify", "--run", str(first), "--density", "0.5", "--force", "--calibration-samples", "16",
                 "--output", str(tmp_path / "second")]) == 0
    assert json.loads((tmp_path / "second" / RunDir.THRESHOLDS).read_text())["mode"] == "uniform"


def test_density_sweep_writes_json_and_png(run, tmp_path):
    out = tmp_path / "sweep"
    assert main(["density-sweep", "--run", str(run / "run"), "--densities", "1", "0.4", "0.2",
                 "--calibration-samples", "16", "--output", str(out)]) == 0
    payload = json.loads((out / "sweep.json").read_text())
    points = payload["runs"][0]["points"]
    assert [p["target_density"] for p in points] == [1.0, 0.4, 0.2]
    assert points[0]["taus"] is None and points[0]["deployed_density"] > 0.9  # untouched
    assert points[0]["deployed_density"] > points[1]["deployed_density"] > points[2]["deployed_density"]
    assert (out / "sweep.png").stat().st_size > 1000
    assert main(["density-sweep", "--run", str(run / "run"), "--densities", "0", "--output", str(tmp_path / "x")]) == 2


# -- thresholds on the gated product (--point product) ------------------------------------------
def _product_inputs(model, batches, first: bool = False):
    """The down projections' inputs, per product site (hooks of their own; ``first``: a hook run
    before any other, i.e. before a threshold's)."""
    sites = find_sites(model, "product")
    seen = {s.module: [] for s in sites}
    hooks = [model.get_submodule(s.module).register_forward_pre_hook(
        lambda m, a, path=s.module: seen[path].append(a[0].detach().clone()), prepend=first) for s in sites]
    with torch.no_grad():
        for inputs in batches:
            model(**inputs)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5-gated"])
def test_product_thresholds_zero_exactly_the_small_products_and_meet_the_target(family):
    model = make_model(family)
    batches = [make_inputs(family, batch=4, length=12, pad=3, seed=s) for s in range(3)]
    before = _product_inputs(model, batches)
    sites = find_sites(model, "product")
    sampler = MagnitudeSampler(len(sites))
    with torch.no_grad(), ActivationCapture(model, sites, meter=sampler):
        for inputs in batches:
            model(**inputs)
    thresholds = choose_thresholds([s.module for s in sites], sampler.result(), density=0.3, point="product")
    apply_thresholds(model, thresholds)
    raw, after = _product_inputs(model, batches, first=True), _product_inputs(model, batches)
    for path, tau in thresholds.taus.items():
        for x, y in zip(raw[path], after[path]):  # brute force: the rule on the same forward's inputs
            assert torch.equal(y, x.masked_fill(x.abs() <= tau, 0))
            assert bool((y == 0).any()) and not torch.equal(x, y)
    meter = DensityMeter(sites.sites)
    with torch.no_grad(), ActivationCapture(model, sites, meter=meter):
        for inputs in batches:
            model(**inputs)
    assert meter.result().overall == pytest.approx(0.3, abs=0.01)
    assert applied_thresholds(model)["point"] == "product"
    remove_thresholds(model)
    assert not thresholded_modules(model)
    assert all(torch.equal(x, y) for p in before for x, y in zip(before[p], _product_inputs(model, batches)[p]))


def test_sparsify_at_the_product_point_reloads_and_is_measured_there(run, tmp_path):
    out = tmp_path / "product"
    assert main(["sparsify", "--run", str(run / "run"), "--density", "0.3", "--point", "product",
                 "--calibration-samples", "32", "--output", str(out)]) == 0
    payload = json.loads((out / "sparsify.json").read_text())
    assert payload["thresholds"]["point"] == "product"
    assert payload["thresholds"]["calibration"]["density"] == pytest.approx(0.3, abs=0.01)
    assert payload["after"]["density_report"]["thresholds"]["point"] == "product"
    config, a, tok = load_run(out)
    _, b, _ = load_run(out)
    assert config.site_point == "product"  # deft eval / density read the product, where the zeros are
    batch = tok(["a fine film", "dull and long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)
    assert main(["eval", "--run", str(out), "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["density"]["overall"] == pytest.approx(payload["after"]["density"])


