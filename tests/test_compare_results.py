"""comparison.json: one scale, with its units written down; a single seed shows no spread."""

from __future__ import annotations

import importlib
import json
import statistics

import pytest

from deft.cli.format import comparison_table
from deft.training import TrainConfig, compare

# the module (deft.training.compare is also the name of the function the package exports)
compare_module = importlib.import_module("deft.training.compare")

# Per (mode, seed): accuracy, overall / |a|>τ / union density, per-layer (exact, |a|>τ) densities; fractions
# as results.json holds them.
RUNS = {
    ("peft", 0): (0.80, 0.90, 0.50, 0.95, [(0.92, 0.55), (0.88, 0.45)]),
    ("peft", 1): (0.84, 0.86, 0.40, 0.97, [(0.90, 0.41), (0.82, 0.39)]),
    ("deft", 0): (0.78, 0.60, 0.20, 0.70, [(0.62, 0.25), (0.58, 0.15)]),
    ("deft", 1): (0.79, 0.50, 0.30, 0.80, [(0.55, 0.31), (0.45, 0.29)]),
}


def _results(mode: str, seed: int) -> dict:
    acc, overall, thr, union, layers = RUNS[mode, seed]
    return {"task": "sst2", "mode": mode, "seed": seed, "main_metric": "accuracy", "metrics": {"accuracy": acc},
            "density": {"overall": overall, "threshold": {"overall": thr, "tau": 0.01}, "union": {"overall": union},
                        "per_layer": [{"density": d, "density_threshold": t} for d, t in layers]}}


@pytest.fixture
def fake_train(monkeypatch):
    monkeypatch.setattr(compare_module, "train", lambda config, out, **_: _results(config.mode, config.seed))


def test_comparison_json_is_in_percent_throughout_and_says_so(fake_train, tmp_path):
    compare(TrainConfig(), [0, 1], tmp_path, progress=False)
    payload = json.loads((tmp_path / "comparison.json").read_text())
    s, units = payload["summary"], payload["units"]
    # By hand from the per-seed fractions above, in percent: the summary has one scale.
    assert s["peft"]["metric"]["mean"] == pytest.approx(82.0)
    assert s["peft"]["metric"]["std"] == pytest.approx(100 * statistics.stdev([0.80, 0.84]))
    assert s["deft"]["density_threshold"]["mean"] == pytest.approx(25.0)
    assert s["peft"]["per_layer"] == pytest.approx([91.0, 85.0])  # was [0.91, 0.85] next to 88.0 overall
    assert s["deft"]["per_layer_threshold"] == pytest.approx([28.0, 22.0])
    assert s["metric_delta"] == pytest.approx(78.5 - 82.0)
    assert s["density_change"]["density"] == pytest.approx((88.0 - 55.0) / 88.0 * 100)
    assert s["peft"]["metric"]["n"] == 2
    for key in ("metric", "density", "per_layer", "density_change", "metric_delta", "runs"):
        assert units[key], key
    assert "percent" in units["density"] and "points" in units["metric_delta"] and "[0, 1]" in units["runs"]


def test_a_single_seed_shows_no_spread(fake_train, tmp_path):
    payload = compare(TrainConfig(), [0], tmp_path, progress=False)
    assert payload["summary"]["peft"]["metric"]["std"] is None  # not 0.0: one value has no spread
    table = comparison_table(payload)
    assert "±" not in table and "n=1" in table
    assert "80.00" in table  # the one seed's accuracy, in percent


def test_several_seeds_show_mean_and_std(fake_train, tmp_path):
    table = comparison_table(compare(TrainConfig(), [0, 1], tmp_path, progress=False))
    assert f"82.00 ± {100 * statistics.stdev([0.80, 0.84]):.2f}" in table and "n=2" in table
