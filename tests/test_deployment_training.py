"""Training for deployment: threshold in the loop (straight-through), ReLU-fication, ε annealing,
the sequence-shared density term — by hand on small tensors, two steps on every family, and end
to end through `train` / `load_run`."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import TEXT_FAMILIES, make_inputs, make_model

from deft.core.approx import L0Approx
from deft.core.capture import ActivationCapture
from deft.core.loss import DensityLossConfig, combine_terms, site_term
from deft.core.metrics import DensityMeter
from deft.core.relufication import ReLUfied, relufy
from deft.core.sites import SiteMap, find_sites
from deft.core.thresholds import MagnitudeSampler, quantile_of_magnitudes, thresholded_modules
from deft.methods import get_method
from deft.training import RunDir, TrainConfig, load_run, train
from deft.training.schedules import InLoopThreshold, add_in_loop_thresholds, epsilon_schedule, threshold_schedule


def test_straight_through_passes_the_gradient_where_the_forward_zeroes():
    x = torch.tensor([-2.0, -0.05, 0.02, 0.5, 3.0], requires_grad=True)
    for ste, expected in ((True, [1.0, 1.0, 1.0, 1.0, 1.0]), (False, [1.0, 0.0, 0.0, 1.0, 1.0])):
        module = InLoopThreshold(torch.nn.Identity(), ste=ste)
        module.tau = 0.1
        module.train()
        out = module(x)
        assert out.tolist() == [-2.0, 0.0, 0.0, 0.5, 3.0]
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.tolist() == expected
    module.eval()  # evaluation: the deployed threshold, exact zeros
    assert module(x).tolist() == [-2.0, 0.0, 0.0, 0.5, 3.0]


def test_sequence_form_by_hand():
    act = torch.tensor([[[3.0, 0.0], [4.0, 0.0], [9.0, 9.0]]])  # (1, 3, 2); last token is padding
    mask = torch.tensor([[True, True, False]])
    eps = 1.0
    cfg = DensityLossConfig(weight=1.0, eps=eps, form="sequence")
    total, count = site_term(act, mask, cfg.build_approx())
    mean_sq = [(9 + 16) / 2, 0.0]  # RMS² per neuron over the two real tokens
    assert count == 2
    assert float(total) == pytest.approx(sum(m / (m + eps) for m in mean_sq))
    token, _ = site_term(act, mask, DensityLossConfig(weight=1.0, eps=eps).build_approx())
    assert float(token) == pytest.approx(9 / 10 + 16 / 17)  # the per-entry form differs


def test_epsilon_anneals_geometrically():
    cfg = DensityLossConfig(eps=0.1, eps_final=1e-3)
    assert [cfg.eps_at(p) for p in (0, 0.5, 1)] == pytest.approx([0.1, 0.01, 1e-3])
    model = make_model("bert")
    capture = ActivationCapture(model, find_sites(model), approx=cfg.build_approx())
    callback = epsilon_schedule(capture, cfg, total_steps=10)

    class State:
        global_step = 5

    callback.on_step_begin(None, State(), None)
    assert isinstance(capture.approx, L0Approx) and capture.approx.eps == pytest.approx(0.01)
    with pytest.raises(ValueError, match="eps_final"):
        DensityLossConfig(approx="tanh", eps_final=1e-3)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_relufication_gives_exact_zeros_on_every_family(family):
    model = make_model(family)
    inputs = make_inputs(family, batch=2, length=8)
    relufy(model, "shifted-relu", 0.05)
    sites = find_sites(model)
    assert all(isinstance(model.get_submodule(s.module), ReLUfied) for s in sites)
    meter = DensityMeter(sites.sites)
    with torch.no_grad(), ActivationCapture(model, sites, meter=meter):
        model(**inputs)
    assert 0 < meter.result().overall < 0.6  # ReLU zeroes about half; the shift more
    with pytest.raises(ValueError, match="already wrapped"):
        relufy(model, "relu")
    with pytest.raises(ValueError, match="unknown --activation"):
        relufy(make_model(family), "swish")


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_straight_through_training_runs_two_steps_on_every_family(family):
    """LoRA + in-loop thresholds at density 0.3 + the density loss: the forward has the exact zeros
    of the target, the gradient reaches the LoRA weights through them, two optimizer steps run."""
    model = get_method("lora").apply(make_model(family), {"include_mlp": True}, task_type=None)
    sites = find_sites(model)
    modules = add_in_loop_thresholds(model, sites, ste=True, target=0.3)
    inputs = make_inputs(family, batch=2, length=8, pad=2)
    model.train()
    # calibrate τ as the schedule does: σ's own output on real tokens, (1 − d) quantile
    from dataclasses import replace

    from deft.core.sites import SiteMap

    inner = SiteMap(tuple(replace(s, module=f"{s.module}.inner") for s in sites), sites.family, sites.model_type,
                    "act")
    sampler = MagnitudeSampler(len(sites))
    with torch.no_grad(), ActivationCapture(model, inner, meter=sampler):
        model(**inputs)
    for site, values in zip(sites, sampler.result()):
        modules[site.module].tau = quantile_of_magnitudes(values, 0.7)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    cfg = DensityLossConfig(weight=1.0)
    for _ in range(2):
        meter = DensityMeter(sites.sites)
        with ActivationCapture(model, sites, approx=cfg.build_approx(), meter=meter) as capture:
            out = model(**inputs)
            logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
            loss = logits.float().pow(2).mean() + combine_terms(capture.pop_terms(), cfg)
        loss.backward()
        assert all(p.grad is not None for p in params) and sum(float(p.grad.abs().sum()) for p in params) > 0
        optimizer.step()
        optimizer.zero_grad()
        assert meter.result().overall == pytest.approx(0.3, abs=0.1)
    assert set(thresholded_modules(model)) == {s.module for s in sites}


# -- end to end --------------------------------------------------------------------------------
def tiny_config(model_dir, shared_data, **overrides):
    base = dict(model=model_dir, tokenizer="minilm", task="sst2", method="lora", max_train_samples=64,
                max_eval_samples=16, batch_size=8, eval_batch_size=8, max_steps=6, max_length=32,
                data_dir=str(shared_data), learning_rate=1e-3)
    return TrainConfig(**{**base, **overrides})


def test_threshold_in_the_loop_trains_and_the_run_loads_thresholded(tiny_bert_dir, shared_data, tmp_path):
    cfg = tiny_config(tiny_bert_dir, shared_data, train_density=0.3, train_density_start=0.6,
                      train_density_ramp=0.5, tau_every=2)
    results = train(cfg, tmp_path / "run", progress=False)
    assert results["thresholds"]["mode"] == "trained" and results["thresholds"]["target_density"] == 0.3
    assert results["density"]["thresholds"] is not None  # the final evaluation ran thresholded
    saved = json.loads((tmp_path / "run" / RunDir.THRESHOLDS).read_text())
    assert saved["taus"] == results["thresholds"]["taus"] and all(t > 0 for t in saved["taus"].values())
    _, model, tok = load_run(tmp_path / "run")
    assert {p: m.tau for p, m in thresholded_modules(model).items()} == saved["taus"]
    from deft.cli import main

    assert main(["eval", "--run", str(tmp_path / "run"), "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["density"]["overall"] == pytest.approx(results["density"]["overall"])
    assert again["metrics"]["accuracy"] == pytest.approx(results["metrics"]["accuracy"])
    assert results["density"]["overall"] < 0.6  # the run's own deployed zeros, not a dense model


def test_relufied_run_reloads_relufied(tiny_bert_dir, shared_data, tmp_path):
    cfg = tiny_config(tiny_bert_dir, shared_data, activation="relu", density=DensityLossConfig(approx="tanh"))
    results = train(cfg, tmp_path / "run", progress=False)
    assert results["density"]["overall"] < 0.7  # exact zeros: the ReLU's
    _, model, _ = load_run(tmp_path / "run")
    assert all(isinstance(model.get_submodule(s.module), ReLUfied) for s in find_sites(model))


@pytest.mark.parametrize("bad,match", [
    ({"activation": "swish"}, "unknown --activation"), ({"activation": "shifted-relu"}, "activation-shift"),
    ({"train_density": 0.0}, r"\(0, 1\]"), ({"train_density": 0.5, "train_density_start": 0.2}, "train_density_start"),
    ({"tau_every": 0, "train_density": 0.5}, "tau_every"), ({"density": {"form": "batch"}}, "form"),
])
def test_bad_deployment_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_math_of_the_quantile():
    values = torch.arange(1, 101, dtype=torch.float32)
    tau = quantile_of_magnitudes(values, 0.7)
    assert float((values > tau).float().mean()) == pytest.approx(0.3)
    assert math.isclose(tau, 70.0)


# -- the neuron form: whole neurons zeroed, the same on every token ------------------------------
class _Rows:
    """A capture meter keeping σ's real-token rows per site (the brute-force ranking's input)."""

    def __init__(self, n):
        self.rows = [[] for _ in range(n)]

    def update(self, index, act, mask):
        self.rows[index].append(act[mask].detach().double())

    def end_sequences(self):
        pass


def _first_ranking_step(model, sites, schedule, inputs) -> _Rows:
    """Step 0 of ``schedule`` on ``inputs`` (it re-chooses the masks at its end), with σ's own output
    (inside the in-loop threshold) recorded per site: what the ranking is checked against by hand."""
    inner = SiteMap(tuple(replace(s, module=f"{s.module}.inner") for s in sites), sites.family, sites.model_type, "act")
    rows = _Rows(len(sites))

    class State:
        global_step = 0

    schedule.on_step_begin(None, State(), None)
    with torch.no_grad(), ActivationCapture(model, inner, meter=rows):
        model(**inputs)
    schedule.on_step_end(None, State(), None)
    return rows


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_neuron_form_keeps_the_largest_rms_neurons_and_zeroes_the_rest_on_every_token(family):
    model = get_method("lora").apply(make_model(family), {"include_mlp": True}, task_type=None)
    sites = find_sites(model)
    if any(s.experts for s in sites):
        with pytest.raises(ValueError, match="routed experts"):
            add_in_loop_thresholds(model, sites, target=0.25, form="neuron")
        return
    modules = add_in_loop_thresholds(model, sites, target=0.25, form="neuron")
    schedule = threshold_schedule(model, sites, modules, target=0.25, start=0.25, ramp=0.0, every=1, total_steps=4,
                                  form="neuron")
    inputs = make_inputs(family, batch=2, length=8, pad=2)
    model.train()
    rows = _first_ranking_step(model, sites, schedule, inputs)

    class State:
        global_step = 0

    for index, site in enumerate(sites):  # by hand: sum of squares over real tokens, the top ⌈0.25 w⌉
        squares = torch.cat(rows.rows[index]).pow(2).sum(0)
        want = set(squares.topk(math.ceil(0.25 * site.width)).indices.tolist())
        assert set(modules[site.module].kept_neurons()) == want
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    for step in (1, 2, 3):  # the ramp's last step re-chooses the masks; then they stay, steps run through them
        State.global_step = step
        outer = _Rows(len(sites))  # the last step's forward, under the final masks
        schedule.on_step_begin(None, State(), None)
        with ActivationCapture(model, sites, meter=outer):
            out = model(**inputs)
            logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
            logits.float().pow(2).mean().backward()
        schedule.on_step_end(None, State(), None)
        assert all(p.grad is not None for p in params) and sum(float(p.grad.abs().sum()) for p in params) > 0
        optimizer.step()
        optimizer.zero_grad()
    for index, site in enumerate(sites):
        keep = modules[site.module].keep
        assert set(keep.nonzero().reshape(-1).tolist()) == set(modules[site.module].kept_neurons())
        acts = torch.cat(outer.rows[index])
        assert bool((acts[:, ~keep] == 0).all())  # every dropped neuron is 0 on every real token
        assert bool((acts[:, keep] != 0).float().mean() > 0.3)  # the kept ones work (ReLU families: half)


def test_neuron_form_run_saves_its_masks_and_shrinks_to_them(tiny_bert_dir, shared_data, tmp_path):
    from deft.cli import main
    from deft.methods import merge_peft

    cfg = tiny_config(tiny_bert_dir, shared_data, train_density=0.25, train_density_form="neuron",
                      train_density_ramp=0.5, tau_every=2)
    results = train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / RunDir.THRESHOLDS).read_text())
    _, model, tok = load_run(tmp_path / "run")
    sites = find_sites(model)
    assert set(saved["neurons"]) == {s.module for s in sites}
    for site in sites:
        assert len(saved["neurons"][site.module]) == math.ceil(0.25 * site.width)
        assert thresholded_modules(model)[site.module].kept_neurons() == saved["neurons"][site.module]
    assert results["density"]["overall"] <= 0.25 + 1e-6  # only kept neurons can be non-zero
    batch = tok(["a fine film", "dull and long , and not funny at all"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = merge_peft(model)(**batch).logits
    # a density sweep keeps the removed neurons removed: its untouched point is the masked model
    assert main(["density-sweep", "--run", str(tmp_path / "run"), "--densities", "1", "0.1",
                 "--calibration-samples", "16", "--max-samples", "16", "--output", str(tmp_path / "sweep")]) == 0
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"][0]["points"]
    assert points[0]["deployed_density"] <= 0.25 + 1e-6 and points[1]["deployed_density"] < points[0]["deployed_density"]
    assert main(["shrink", "--run", str(tmp_path / "run"), "--calibration-samples", "16",
                 "--output", str(tmp_path / "shrunk")]) == 0
    summary = json.loads((tmp_path / "shrunk" / RunDir.SHRINK).read_text())["summary"]
    assert all(r["width_after"] <= len(saved["neurons"][r["site"]]) for r in summary["layers"])
    _, shrunk, _ = load_run(tmp_path / "shrunk")
    assert all(m.keep is None for m in thresholded_modules(shrunk).values())  # every neuron left is kept: no mask
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**batch).logits, want, atol=1e-5, rtol=0)


def test_neuron_masks_are_refused_where_they_cannot_apply():
    from deft.core.thresholds import Thresholds, apply_thresholds
    from deft.deploy.sparse_mlp import sparsify_mlps

    with pytest.raises(ValueError, match="σ's output"):
        Thresholds(taus={"a": 0.0}, mode="trained", point="product", neurons={"a": [0]})
    with pytest.raises(ValueError, match="token or neuron"):
        TrainConfig(train_density=0.5, train_density_form="column")
    model = make_model("llama")
    sites = find_sites(model)
    apply_thresholds(model, Thresholds(taus={s.module: 0.0 for s in sites}, mode="trained",
                                       neurons={s.module: [0, 1] for s in sites}))
    with pytest.raises(ValueError, match="deft shrink"):
        sparsify_mlps(model, backend="fallback")


# -- the neuron form with a mean fill: removed neurons held at their mean, folded by shrink -------
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_mean_fill_ranks_by_variance_and_holds_removed_neurons_at_their_mean(family):
    model = get_method("lora").apply(make_model(family), {"include_mlp": True}, task_type=None)
    sites = find_sites(model)
    if any(s.experts or s.mult is not None or s.fused for s in sites):  # routed experts, gated MLPs: refused
        with pytest.raises(ValueError, match="routed experts|gated MLP"):
            add_in_loop_thresholds(model, sites, target=0.25, form="neuron", fill="mean")
        return
    modules = add_in_loop_thresholds(model, sites, target=0.25, form="neuron", fill="mean")
    schedule = threshold_schedule(model, sites, modules, target=0.25, start=0.25, ramp=0.0, every=1, total_steps=4,
                                  form="neuron", fill="mean")
    inputs = make_inputs(family, batch=2, length=8, pad=2)
    model.eval()
    rows = _first_ranking_step(model, sites, schedule, inputs)
    outer = _Rows(len(sites))
    with torch.no_grad(), ActivationCapture(model, sites, meter=outer):
        model(**inputs)
    for index, site in enumerate(sites):  # by hand: variance over real tokens, the top ⌈0.25 w⌉; the others at the mean
        acts = torch.cat(rows.rows[index])
        variance = acts.var(0, unbiased=False)
        want = set(variance.topk(math.ceil(0.25 * site.width)).indices.tolist())
        module = modules[site.module]
        assert set(module.kept_neurons()) == want
        after = torch.cat(outer.rows[index])
        removed = ~module.keep
        torch.testing.assert_close(after[:, removed], acts.mean(0)[removed].float().double().expand(after.shape[0], -1),
                                   atol=1e-6, rtol=1e-5)
        if index == 0:  # the first call of the first block sees the same input: its kept neurons untouched
            assert torch.equal(outer.rows[0][0][:, module.keep], rows.rows[0][0][:, module.keep])


def test_mean_fill_is_refused_for_gated_mlps_and_without_the_neuron_form():
    model = make_model("llama")
    with pytest.raises(ValueError, match="gated MLP"):
        add_in_loop_thresholds(model, find_sites(model), target=0.25, form="neuron", fill="mean")
    with pytest.raises(ValueError, match="applies to train_density_form"):
        TrainConfig(train_density=0.5, neuron_fill="mean")
    with pytest.raises(ValueError, match="zero or mean"):
        TrainConfig(train_density=0.5, train_density_form="neuron", neuron_fill="median")
    from deft.core.thresholds import Thresholds

    with pytest.raises(ValueError, match="without a neuron mask"):
        Thresholds(taus={"a": 0.0}, mode="trained", fill={"a": [0.0]})


def test_mean_filled_run_saves_its_fill_and_shrinks_exactly(tiny_bert_dir, shared_data, tmp_path):
    from deft.cli import main
    from deft.methods import merge_peft

    cfg = tiny_config(tiny_bert_dir, shared_data, train_density=0.25, train_density_form="neuron",
                      neuron_fill="mean", ste=False, train_density_ramp=0.5, tau_every=2)
    train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / RunDir.THRESHOLDS).read_text())
    _, model, tok = load_run(tmp_path / "run")
    sites = find_sites(model)
    assert set(saved["fill"]) == {s.module for s in sites}
    for site in sites:
        fill, kept = saved["fill"][site.module], set(saved["neurons"][site.module])
        assert len(fill) == site.width and all(fill[j] == 0 for j in kept)
        assert sum(fill[j] != 0 for j in range(site.width) if j not in kept) > 0  # GELU's means are not 0
        assert thresholded_modules(model)[site.module].kept_fill() == pytest.approx(fill)
    batch = tok(["a fine film", "dull and long , and not funny at all"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = merge_peft(model)(**batch).logits
    # the sweep keeps masks and fills: its untouched point is the filled model
    assert main(["density-sweep", "--run", str(tmp_path / "run"), "--densities", "1", "--calibration-samples", "16",
                 "--max-samples", "16", "--output", str(tmp_path / "sweep")]) == 0
    untouched = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"][0]["points"][0]
    assert untouched["deployed_density"] > 0.25  # the filled neurons are non-zero constants
    assert main(["shrink", "--run", str(tmp_path / "run"), "--calibration-samples", "16",
                 "--output", str(tmp_path / "shrunk")]) == 0
    summary = json.loads((tmp_path / "shrunk" / RunDir.SHRINK).read_text())["summary"]
    assert [r["width_after"] for r in summary["layers"]] == [len(saved["neurons"][r["site"]]) for r in summary["layers"]]
    assert all(r["bias_folded"] for r in summary["layers"])
    _, shrunk, _ = load_run(tmp_path / "shrunk")
    assert all(m.keep is None and m.fill is None for m in thresholded_modules(shrunk).values())
    with torch.no_grad():  # the constant neurons folded into the bias: the same function
        torch.testing.assert_close(shrunk(**batch).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_neuron_masks_end_at_the_target_when_the_step_count_moves_before_step_end(fill):
    # transformers' Trainer calls on_step_begin at global_step k and on_step_end at k + 1: the mask
    # chosen on the ramp's last step must be the target's, whichever count the callback sees.
    model = make_model("bert")
    sites = find_sites(model)
    modules = add_in_loop_thresholds(model, sites, target=0.1, form="neuron", fill=fill)
    schedule = threshold_schedule(model, sites, modules, target=0.1, start=1.0, ramp=0.5, every=10, total_steps=189,
                                  form="neuron", fill=fill)
    inputs = make_inputs("bert", batch=2, length=8, pad=2)

    class State:
        global_step = 0

    model.eval()
    for step in range(120):
        State.global_step = step
        schedule.on_step_begin(None, State(), None)
        with torch.no_grad():
            model(**inputs)
        State.global_step = step + 1
        schedule.on_step_end(None, State(), None)
    for site in sites:
        assert len(modules[site.module].kept_neurons()) == math.ceil(0.1 * site.width)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_output_rank_keeps_the_neurons_writing_most_to_the_block_output(family):
    import copy

    from deft.core.layers import is_conv1d, unwrap_model
    from deft.methods import merge_peft

    base = make_model(family)
    if any(s.experts for s in find_sites(base)):
        return  # the neuron form refuses routed experts (test above)
    down = next(iter(find_sites(base))).down.rsplit(".", 1)[-1]  # LoRA on the down projections too
    model = get_method("lora").apply(base, {"include_mlp": True, "target_modules": [down]}, task_type=None)
    sites = find_sites(model)
    assert all(hasattr(unwrap_model(model).get_submodule(s.down), "lora_A") for s in sites)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA's update on the down projection must count: make it non-zero
            p.data.normal_(0, 0.5)
    # ‖W_down[:, j]‖² by hand, from a merged copy (W + ΔW written into the weight by peft itself)
    merged = unwrap_model(merge_peft(copy.deepcopy(model)))
    norms = []
    for site in sites:
        layer = merged.get_submodule(site.down)
        weight = layer.weight.detach()
        norms.append((weight if is_conv1d(layer) else weight.t()).pow(2).sum(1))  # one value per neuron j
    modules = add_in_loop_thresholds(model, sites, target=0.25, form="neuron")
    schedule = threshold_schedule(model, sites, modules, target=0.25, start=0.25, ramp=0.0, every=1, total_steps=4,
                                  form="neuron", rank="output")
    rows = _first_ranking_step(model, sites, schedule, make_inputs(family, batch=2, length=8, pad=2))
    differs = False
    for index, site in enumerate(sites):
        squares = torch.cat(rows.rows[index]).pow(2).sum(0)
        count = math.ceil(0.25 * site.width)
        want = set((squares * norms[index]).topk(count).indices.tolist())
        assert set(modules[site.module].kept_neurons()) == want
        differs |= want != set(squares.topk(count).indices.tolist())
    assert differs, "the output rank chose the RMS rank's neurons everywhere: the test shows nothing"
    with pytest.raises(ValueError, match="neuron rank"):
        threshold_schedule(model, sites, modules, target=0.25, rank="weight")
    with pytest.raises(ValueError, match="train_density_form 'neuron' only"):
        TrainConfig(train_density=0.5, neuron_rank="output")
