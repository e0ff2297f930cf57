"""Greedy per-layer density allocation (deft.deploy.greedy, ``deft sparsify --mode greedy``):
the allocation against a brute-force search, the block error against the thresholded model's
own down projection output, the command meeting its target."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import make_inputs, make_model

from deft.cli import main
from deft.core.sites import find_sites
from deft.core.thresholds import Thresholds, apply_thresholds, quantile_of_magnitudes
from deft.deploy.greedy import allocate, block_errors
from deft.training import train

GRID = (1.0, 0.8, 0.6, 0.4, 0.2)


@pytest.mark.parametrize("seed", range(5))
def test_allocation_equals_brute_force_on_convex_errors(seed):
    # Convex, increasing errors per layer (error grows faster the sparser a layer gets): greedy on
    # marginal cost is then optimal, so it must match an exhaustive search over the grid.
    g = torch.Generator().manual_seed(seed)
    errors = []
    for _ in range(3):
        steps = torch.rand(len(GRID) - 1, generator=g).sort().values * 10 ** float(torch.rand(1, generator=g) * 2)
        errors.append([0.0] + torch.cumsum(steps, 0).tolist())
    for target in (0.8, 0.6, 0.4):
        best = min((combo for combo in itertools.product(range(len(GRID)), repeat=3)
                    if abs(sum(GRID[k] for k in combo) / 3 - target) < 1e-9),
                   key=lambda combo: sum(errors[layer][k] for layer, k in enumerate(combo)))
        densities = allocate(errors, target, GRID)
        assert sum(densities) / 3 == pytest.approx(target)
        assert sorted(densities) == pytest.approx(sorted(GRID[k] for k in best)) or \
            sum(errors[layer][GRID.index(round(d, 6))] for layer, d in enumerate(densities)) == \
            pytest.approx(sum(errors[layer][k] for layer, k in enumerate(best)))


def test_allocation_takes_a_partial_last_step_to_hit_the_target():
    errors = [[0, 1, 2, 3, 4], [0, 5, 10, 15, 20]]
    densities = allocate(errors, 0.7, GRID)
    assert sum(densities) / 2 == pytest.approx(0.7)
    assert densities[0] < densities[1]  # the cheap layer gives up more


def test_block_error_is_what_the_thresholded_block_changes():
    model = make_model("bert")
    site = find_sites(model, "act").sites[0]
    inputs = make_inputs("bert", batch=2, length=8)
    seen = {}
    act = model.get_submodule(site.module)
    down = model.get_submodule(site.down)
    hooks = [act.register_forward_hook(lambda m, a, o: seen.__setitem__("a", o.reshape(-1, o.shape[-1]))),
             down.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o.reshape(-1, o.shape[-1])))]
    with torch.no_grad():
        model(**inputs)
        a, dense_out = seen["a"].clone(), seen["y"].clone()
        tau = quantile_of_magnitudes(a.abs().reshape(-1), 0.6)
        apply_thresholds(model, Thresholds(taus={s.module: (tau if s.module == site.module else 0.0)
                                                 for s in find_sites(model, "act")}, mode="tau"))
        model(**inputs)
    for h in hooks:
        h.remove()
    sparse_out = seen["y"]
    by_model = float((dense_out - sparse_out).pow(2).sum()) / a.shape[0]
    assert by_model > 0
    assert block_errors(down, a, a, [tau])[0] == pytest.approx(by_model, rel=1e-4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import tiny_run_config

    root = tmp_path_factory.mktemp("greedy")
    train(tiny_run_config(root), root / "run", progress=False)
    return root


def test_sparsify_greedy_meets_the_target_on_the_calibration_data(run, tmp_path):
    out = tmp_path / "greedy"
    assert main(["sparsify", "--run", str(run / "run"), "--density", "0.3", "--mode", "greedy",
                 "--calibration-samples", "32", "--output", str(out)]) == 0
    payload = json.loads((out / "sparsify.json").read_text())
    calibration = payload["thresholds"]["calibration"]
    assert payload["thresholds"]["mode"] == "greedy"
    assert calibration["density"] == pytest.approx(0.3, abs=0.01)
    assert payload["after"]["density_report"]["thresholds"]["mode"] == "greedy"
    assert json.loads((out / "thresholds.json").read_text())["mode"] == "greedy"
