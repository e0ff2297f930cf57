"""The deployed-density benchmark's headline over several seeds, on made-up rows whose averages are
worked out by hand below."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the benchmark imports its helpers as `lib.*`
    try:
        spec = importlib.util.spec_from_file_location("deployed_density_bench", BENCH / "deployed_density.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


BUDGETS = {"sst2": {"epochs": 3.0, "max_train_samples": 2000}, "rte": {"epochs": 3.0, "max_train_samples": 0}}


def row(task, variant, target, density, metric, seed):
    r = {"model": "minilm", "task": task, "variant": variant, "target_density": target, "deployed_density": density,
         "metric": metric, "learned": True, "steps": 10, **BUDGETS[task]}
    return r if seed is None else {**r, "seed": seed}  # None: a row written before rows named their seed


def test_seed_mean_averages_each_seed_against_its_own_dense_run(bench):
    rows = []
    # seed 0 (rows without a seed key): dense 80 / 60 at density 1.0; the variant at 0.5: 79 and 57
    for seed, (d_sst, d_rte, v_sst, v_rte) in {None: (80, 60, 79, 57), 1: (76, 62, 76, 62)}.items():
        rows += [row("sst2", "peft+thresholds", 1.0, 1.0, d_sst, seed), row("rte", "peft+thresholds", 1.0, 0.8, d_rte, seed),
                 row("sst2", "v", 0.5, 0.5, v_sst, seed), row("rte", "v", 0.5, 0.4, v_rte, seed)]
    for r in rows:
        r["metric_delta_vs_dense_peft"] = r["metric"] - next(
            d["metric"] for d in rows if d["task"] == r["task"] and d.get("seed") == r.get("seed")
            and d["target_density"] == 1.0)
    [entry] = [e for e in bench.seed_mean(rows, BUDGETS, "b") if e["variant"] == "v"]
    # seed 0: Δ (−1 − 3) / 2 = −2; seed 1: Δ 0. Density change 0.5 for both tasks at both seeds.
    assert entry["seed"] == [0, 1] and [p["avg_metric_delta"] for p in entry["per_seed"]] == [-2.0, 0.0]
    assert entry["avg_metric_delta"] == -1.0 and entry["avg_density_change"] == pytest.approx(0.5)
    assert not entry["meets_target"]
    # a seed trained for one task only is left out of the mean, not allowed to empty it
    partial = [{**r, "seed": 2} for r in rows if r.get("seed") == 1 and r["task"] == "sst2"]
    assert bench.seed_mean(rows + partial, BUDGETS, "b") == bench.seed_mean(rows, BUDGETS, "b")
    # one seed alone has no mean; the single-seed summary reads its own seed's rows only
    assert bench.seed_mean([r for r in rows if "seed" not in r], BUDGETS, "b") == []
    [one] = [e for e in bench.summary(rows, BUDGETS, "b", seed=1) if e["variant"] == "v"]
    assert one["avg_metric_delta"] == 0.0 and one["meets_target"]


def test_run_directories_name_the_seed_except_seed_0(bench):
    budget = {"epochs": 3.0, "max_train_samples": 2000, "holdout_samples": 400}
    assert bench.budget_tag(budget) == "e3-n2000-h400"  # where seed-0 runs have always lived
    assert bench.budget_tag(budget, 2) == "e3-n2000-h400-s2"


def test_merging_keeps_a_run_at_another_learning_rate_or_seed(bench):
    """Bug: rows were keyed without the learning rate, so SST-2 at lr 1e-3 (189 steps, seed 1)
    replaced the rows of SST-2 at the budget's lr (also 189 steps, seed 1)."""
    base = {**row("sst2", "v", 0.5, 0.5, 70.0, 1), "holdout_samples": 400}
    other_lr = {**base, "learning_rate": 1e-3, "metric": 80.0}
    other_seed = {**base, "seed": 2, "metric": 75.0}
    again = {**base, "metric": 71.0}
    assert bench.merge_rows([base], [other_lr, other_seed]) == [base, other_lr, other_seed]
    assert bench.merge_rows([base, other_lr], [again]) == [other_lr, again]  # the same run measured again
