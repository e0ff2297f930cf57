"""Held-out training examples (``--holdout-samples``): set aside from training, never seen by it or
by the thresholds' calibration, and scored as the pseudo-split ``heldout`` — where a per-task
operating point is chosen without touching dev."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deft.cli import main
from deft.tasks.glue import HELDOUT_SPLIT, load_glue
from deft.training import TrainConfig, load_run, task_runner, train


def test_heldout_and_train_partition_the_training_split(shared_data):
    full = load_glue("mrpc", "train", data_dir=shared_data)
    aside = load_glue("mrpc", HELDOUT_SPLIT, data_dir=shared_data, holdout=300)
    rest = load_glue("mrpc", "train", data_dir=shared_data, holdout=300)
    assert len(aside) == 300 and len(rest) == len(full) - 300
    assert not set(aside["idx"]) & set(rest["idx"]) and set(aside["idx"]) | set(rest["idx"]) == set(full["idx"])
    assert aside["idx"] == load_glue("mrpc", HELDOUT_SPLIT, data_dir=shared_data, holdout=300)["idx"]  # deterministic
    assert aside["idx"] != load_glue("mrpc", HELDOUT_SPLIT, data_dir=shared_data, holdout=300, seed=1)["idx"]
    # the held-out rows are spread over the file, not its head or tail
    assert np.mean(aside["idx"]) == pytest.approx(np.mean(full["idx"]), rel=0.1)
    small = load_glue("mrpc", "train", data_dir=shared_data, holdout=300, max_samples=100)
    assert len(small) == 100 and set(small["idx"]) <= set(rest["idx"])
    by_idx = {row["idx"]: row["text_a"] for row in full}
    assert all(row["text_a"] == by_idx[row["idx"]] for row in aside)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"split": HELDOUT_SPLIT}, "needs holdout"),
    ({"split": "train", "holdout": 10**6}, "holdout must lie"),
    ({"split": "train", "holdout": -1}, "holdout must be >= 0"),
])
def test_bad_holdout_requests_are_refused(shared_data, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        load_glue("rte", data_dir=shared_data, **kwargs)


def test_holdout_is_a_glue_option():
    with pytest.raises(ValueError, match="not a GLUE task"):
        TrainConfig(task="squad", holdout_samples=10)
    with pytest.raises(ValueError, match="holdout_samples must be >= 0"):
        TrainConfig(holdout_samples=-1)
    # a run saved before the option existed reads as one with nothing held out
    assert TrainConfig.from_dict({"task": "sst2"}).holdout_samples == 0


@pytest.fixture(scope="module")
def held_run(tmp_path_factory):
    from conftest import tiny_run_config

    root = tmp_path_factory.mktemp("holdout")
    train(tiny_run_config(root, task="rte", holdout_samples=40, max_steps=1), root / "run", progress=False)
    return root / "run"


def test_training_and_calibration_never_see_the_heldout_examples(held_run, monkeypatch, shared_data):
    import deft.tasks.runners.glue as glue_runner

    config, model, tokenizer = load_run(held_run)
    aside = set(load_glue("rte", HELDOUT_SPLIT, data_dir=shared_data, holdout=40)["idx"])
    loaded = []

    def recording(*args, **kwargs):
        data = load_glue(*args, **kwargs)
        loaded.append((args[1], set(data["idx"])))
        return data

    monkeypatch.setattr(glue_runner, "load_glue", recording)
    runner = task_runner(config)
    runner.datasets(tokenizer)
    list(runner.calibration_batches(tokenizer, model, samples=10**6, batch_size=512))
    trained = [idx for split, idx in loaded if split == "train"]
    assert len(trained) == 2 and all(not idx & aside for idx in trained)
    assert [len(idx) for idx in trained] == [32, 2490 - 40]  # the run's 32; calibration: all of RTE's train but the 40


def test_heldout_evaluation_scores_exactly_the_heldout_examples(held_run, shared_data):
    import torch

    from deft.tasks.runners.glue import make_loader, tokenize_glue

    config, model, tokenizer = load_run(held_run)
    result = task_runner(config).evaluate_model(model, tokenizer, split=HELDOUT_SPLIT, progress=False)
    assert result.split == HELDOUT_SPLIT and result.samples == 40
    # the same examples picked by hand from the full training file, scored with a plain loop
    full = load_glue("rte", "train", data_dir=shared_data)
    pick = np.sort(np.random.default_rng((config.seed, 1)).permutation(len(full))[:40])
    rows = full.select(pick.tolist())
    correct = 0
    with torch.no_grad():
        for batch in make_loader(tokenize_glue(rows, tokenizer, config.max_length), tokenizer, 8):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    assert 0 < correct < 40 or result.metrics["accuracy"] in (0.0, 1.0)
    assert result.metrics["accuracy"] == pytest.approx(correct / 40)


def test_density_sweep_on_the_heldout_split(held_run, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["density-sweep", "--run", str(held_run), "--densities", "1", "0.3", "--calibration-samples", "16",
                 "--split", HELDOUT_SPLIT, "--output", str(out)]) == 0
    payload = json.loads((out / "sweep.json").read_text())
    assert payload["split"] == HELDOUT_SPLIT
    assert [p["samples"] for p in payload["runs"][0]["points"]] == [40, 40]


def test_eval_cli_on_the_heldout_split(held_run, tmp_path, capsys):
    assert main(["eval", "--run", str(held_run), "--split", HELDOUT_SPLIT, "--json", str(tmp_path / "e.json")]) == 0
    payload = json.loads((tmp_path / "e.json").read_text())
    assert payload["split"] == HELDOUT_SPLIT and "(40 examples)" in capsys.readouterr().out


def test_heldout_split_of_a_run_without_one_is_a_one_line_error(tmp_path, capsys):
    from conftest import tiny_run_config

    train(tiny_run_config(tmp_path, max_steps=1), tmp_path / "run", progress=False)
    capsys.readouterr()
    out = tmp_path / "never"
    assert main(["density-sweep", "--run", str(tmp_path / "run"), "--densities", "1", "--split", HELDOUT_SPLIT,
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--holdout-samples" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(["eval", "--run", str(tmp_path / "run"), "--split", HELDOUT_SPLIT]) == 2
    err = capsys.readouterr().err
    assert "--holdout-samples" in err and len(err.strip().splitlines()) == 1


def test_train_cli_sets_examples_aside(tmp_path):
    from deft.cli.runs import train_config
    from deft.cli import build_parser

    args = build_parser().parse_args(["train", "--holdout-samples", "25", "--output", str(tmp_path / "r")])
    assert train_config(args).holdout_samples == 25


@pytest.mark.parametrize(("argv", "needle"), [
    (["--holdout-samples", "-1"], "--holdout-samples"),
    (["--train-density", "0.1", "--train-density-form", "neuron", "--neuron-rank-steps", "0"], "--neuron-rank-steps"),
    (["--train-density", "0.1", "--neuron-rank", "weight"], "--neuron-rank"),
    (["--task", "squad", "--holdout-samples", "10"], "not a GLUE task"),
])
def test_bad_train_options_are_one_line_and_write_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    try:
        code = main(["train", *argv, "--output", str(out)])
    except SystemExit as stop:  # argparse's own refusals (a choice not offered) exit from the parser
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not out.exists()
