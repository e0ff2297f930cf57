"""Bad input and faults end in one line on stderr, exit 2 (130 for Ctrl-C), nothing written —
and before a model is loaded where the input alone shows the problem."""

from __future__ import annotations

import shutil

import pytest

from deft.cli import main


def _train(tiny_bert_dir, data, out, *extra):
    return main(["train", "--model", tiny_bert_dir, "--tokenizer", "minilm", "--max-train-samples", "8",
                 "--max-eval-samples", "8", "--batch-size", "4", "--max-steps", "1", "--max-length", "16",
                 "--data-dir", str(data), "--output", str(out), *extra])


def _one_line(capsys) -> str:
    """The error line; progress bars aside (tokenizing runs before some checks), nothing else."""
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if line.strip() and "%|" not in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_task_without_training_data_fails_before_anything_is_written(tiny_bert_dir, shared_data, tmp_path,
                                                                         capsys, monkeypatch):
    """QNLI ships dev only: the run used to fail after the model loaded, leaving run_config.json."""
    import deft.training.run as run_module

    monkeypatch.setattr(run_module, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "qnli"
    assert _train(tiny_bert_dir, shared_data, out, "--task", "qnli") == 2
    assert "train" in _one_line(capsys) and not out.exists()


def test_a_header_only_training_file_is_named(tiny_bert_dir, shared_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(shared_data / "glue" / "SST-2", data / "glue" / "SST-2")
    train_tsv = data / "glue" / "SST-2" / "train.tsv"
    train_tsv.write_text(train_tsv.read_text().splitlines()[0] + "\n")
    out = tmp_path / "run"
    assert _train(tiny_bert_dir, data, out) == 2
    assert "no training examples" in _one_line(capsys) and not out.exists()


@pytest.mark.parametrize("extra,needle", [
    (["--method-options", "{r: 16"], "--method-options is not valid JSON"),
    (["--method-options", "[1, 2]"], "must be a JSON object"),
    (["--lambda", "-1"], "--lambda must be >= 0"),
    (["--max-train-samples", "-5"], "--max-train-samples must be >= 0"),
])
def test_bad_options_are_named_as_the_user_wrote_them(tiny_bert_dir, shared_data, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    argv = ["train", "--model", tiny_bert_dir, "--tokenizer", "minilm", "--data-dir", str(shared_data),
            "--output", str(out), *extra]
    assert main(argv) == 2
    assert needle in _one_line(capsys) and not out.exists()


def test_an_output_under_a_file_is_one_line(tiny_bert_dir, shared_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _train(tiny_bert_dir, shared_data, blocker / "run") == 2
    assert str(blocker) in _one_line(capsys)


def test_ctrl_c_says_how_to_resume(tiny_bert_dir, shared_data, tmp_path, capsys, monkeypatch):
    import deft.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deft.training, "train", interrupted)
    assert _train(tiny_bert_dir, shared_data, tmp_path / "run") == 130
    err = _one_line(capsys)
    assert "interrupted" in err and "--resume" in err and str(tmp_path / "run") in err
