"""The command line's surface: every option documented with its default, one output flag,
outputs only where --output says, --max-samples 0 = all everywhere."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from deft.cli import build_parser, main

# Commands that write files or directories: each takes --output.
WRITERS = {"train", "compare", "sparsify", "shrink", "density-sweep", "export", "prune", "prune-sweep",
           "bench-inference"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _shown(value) -> list[str]:
    """How a default reads in a help text: 0.01 as 0.01, 1.0 as 1, a list item by item."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [f"{v:g}" if isinstance(v, float) else str(v) for v in values]


def test_every_option_has_help_and_shows_its_default():
    missing, no_default = [], []
    for name, parser in _subcommands().items():
        formatter = parser._get_formatter()
        for action in _options(parser):
            if action.help == argparse.SUPPRESS:
                continue  # a hidden deprecated alias (checked below)
            flag = f"{name} {action.option_strings[0]}"
            text = formatter._expand_help(action) if action.help else ""
            if not text.strip():
                missing.append(flag)
                continue
            flag_only = action.nargs == 0  # store_true / store_false / version: on or off
            if action.required or flag_only or action.default is None:
                continue
            if "default" not in text or not all(v in text for v in _shown(action.default)):
                no_default.append(f"{flag} ({action.default!r}): {text}")
    assert not missing, f"options without help: {missing}"
    assert not no_default, "options whose help does not show the default:\n" + "\n".join(no_default)


def _helps(command: str) -> dict[str, str]:
    parser = _subcommands()[command]
    formatter = parser._get_formatter()
    return {a.dest: formatter._expand_help(a) for a in _options(parser) if a.help}


def test_help_shows_the_config_dataclasses_defaults():
    """`deft train`'s options default to None (unset: the TrainConfig decides); their help texts
    must still show TrainConfig's value, read from it rather than copied."""
    from deft.cli.runs import TRAIN_OPTIONS
    from deft.training import field_default

    helps = _helps("train")
    for option, field in TRAIN_OPTIONS.items():
        default = field_default(field)
        if default is None or default == -1:  # None: a preset or "all"; max_steps -1: "the epochs'"
            continue
        assert "default" in helps[option] and _shown(default)[0] in helps[option], (option, helps[option])
    density = _helps("density")
    assert f"default: {field_default('threshold'):g}" in density["threshold"]
    assert build_parser().parse_args(["density", "--task", "sst2"]).batch_size == field_default("eval_batch_size")


def test_every_output_flag_is_output():
    commands = _subcommands()
    assert WRITERS <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        assert not re.search(r"--(out|dir)\b", text), name  # old spellings parse, but are not shown
        if name in WRITERS:
            assert re.search(r"--output\b", text), name


@pytest.mark.parametrize("argv,dest,value", [
    (["export", "--run", "r", "--out", "X"], "output", "X"),
    (["bench-inference", "--run", "r", "--out", "X.json"], "output", "X.json"),
    (["load", "--dir", "X"], "export", "X"),
])
def test_old_spellings_still_parse(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


def _finished_run(path: Path, **config) -> Path:
    """A run directory as `deft train` leaves it once finished (the model parts as placeholders)."""
    from deft.training import RunDir, TrainConfig

    path.mkdir(parents=True)
    (path / RunDir.CONFIG).write_text(json.dumps(TrainConfig(**config).to_dict()))
    (path / RunDir.METHOD).mkdir()
    return path


def test_bench_inference_writes_where_output_says_never_into_the_cwd(tmp_path, monkeypatch, capsys):
    import deft.deploy

    payload = {"variants": {"ada_deft_skipped": {"median_seconds": 0.1, "param_bytes": 2 ** 20, "blocks_skipped": 1,
                                                 "metric": 90.0}}, "metric_name": "accuracy"}
    monkeypatch.setattr(deft.deploy, "bench_inference", lambda *a, **k: payload)
    run = _finished_run(tmp_path / "runs" / "ada", ada=True)
    monkeypatch.chdir(tmp_path)
    assert main(["bench-inference", "--run", str(run)]) == 0
    assert not (tmp_path / "benchmarks").exists()
    written = [p for p in tmp_path.rglob("*.json") if p.parent != run]
    assert written == [tmp_path / "runs" / "bench-inference" / "ada_ada.json"]
    out = tmp_path / "elsewhere" / "b.json"
    assert main(["bench-inference", "--run", str(run), "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == payload


def _tsv_rows(data: Path, task_dir: str, split: str) -> int:
    return len((data / "glue" / task_dir / f"{split}.tsv").read_text().strip().splitlines()) - 1


def test_density_max_samples_0_means_all_as_in_eval(tiny_bert_dir, shared_data, tmp_path):
    out = tmp_path / "d.json"
    assert main(["density", "--model", tiny_bert_dir, "--tokenizer", "minilm", "--task", "rte", "--max-samples", "0",
                 "--max-length", "16", "--data-dir", str(shared_data), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["samples"] == _tsv_rows(shared_data, "RTE", "dev")


def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["density", "--task", "rte", "--max-samples", "-1"], "--max-samples must be >= 0"),
    (["density", "--task", "rte", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["density", "--task", "rte", "--threshold", "-0.1"], "--threshold must be >= 0"),
    (["eval", "--max-samples", "-3"], "--max-samples must be >= 0"),
    (["eval", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["eval", "--split", "nope"], "nope"),
    (["eval", "--task", "nope"], "valid tasks"),
])
def test_bad_arguments_fail_before_a_model_loads(argv, needle, tmp_path, shared_data, monkeypatch, capsys):
    import deft.io.models
    import deft.training

    monkeypatch.setattr(deft.training, "load_run", lambda *a, **k: pytest.fail("a run was loaded"))
    monkeypatch.setattr(deft.io.models, "load_for_sequence_classification",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    run = _finished_run(tmp_path / "run", data_dir=str(shared_data))
    where = ["--run", str(run)] if argv[0] == "eval" else ["--data-dir", str(shared_data)]
    out = tmp_path / "out.json"
    assert main([*argv, *where, "--json", str(out)]) == 2
    assert needle in _one_line(capsys) and not out.exists()


def test_eval_of_an_unfinished_run_says_how_to_resume(tmp_path, monkeypatch, capsys):
    """A run stopped before its model was saved: run_config.json and checkpoints, no method/."""
    import deft.training
    from deft.training import RunDir, TrainConfig

    monkeypatch.setattr(deft.training, "load_run", lambda *a, **k: pytest.fail("a run was loaded"))
    run = tmp_path / "run"
    (run / RunDir.CHECKPOINTS / "checkpoint-2").mkdir(parents=True)
    (run / RunDir.CONFIG).write_text(json.dumps(TrainConfig().to_dict()))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["eval", "--run", str(run), "--json", str(tmp_path / "e.json")]) == 2
    line = _one_line(capsys)
    assert "unfinished" in line and "--resume" in line and str(run) in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_bad_command_line_is_one_line_naming_the_current_spelling(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--run", "r"])
    assert exit_.value.code == 2
    line = _one_line(capsys)  # was: the usage block, then the error
    assert "--output" in line and "--out " not in line and "/--out" not in line and "--help" in line
