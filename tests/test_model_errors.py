"""A model that cannot be loaded ends in one line and exit 2, quickly: a checkpoint whose head has
another label count, an empty directory or one without config.json, a name found nowhere while
offline or with the hub out of reach."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from deft.cli import main
from deft.io import models
from deft.io.models import ModelNotAvailableError, load_for_sequence_classification


def _one_line_error(capsys) -> str:
    """The error line; progress bars aside (a checkpoint's weights load before its head is found
    wrong), nothing else: no traceback, no retry warnings."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def three_label_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("head3")
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
                                    ).save_pretrained(path)
    return str(path)


def test_head_with_another_label_count(three_label_checkpoint):
    with pytest.raises(ModelNotAvailableError) as caught:
        load_for_sequence_classification(three_label_checkpoint, 2)
    message = str(caught.value)
    assert "classification head for 3 labels" in message and "the task has 2" in message and "\n" not in message
    assert load_for_sequence_classification(three_label_checkpoint, 3).config.num_labels == 3  # same count: loads


def test_head_with_another_label_count_on_the_command_line(three_label_checkpoint, shared_data, tmp_path, capsys):
    out = tmp_path / "density.json"
    assert main(["density", "--model", three_label_checkpoint, "--tokenizer", "minilm", "--task", "sst2",
                 "--max-samples", "4", "--data-dir", str(shared_data), "--json", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "3 labels" in line and "2" in line
    assert not out.exists()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_training_on_a_head_with_another_label_count(three_label_checkpoint, shared_data, tmp_path, capsys, method):
    out = tmp_path / "run"
    assert main(["train", "--task", "sst2", "--method", method, "--model", three_label_checkpoint, "--tokenizer",
                 "minilm", "--max-train-samples", "8", "--max-eval-samples", "8", "--max-steps", "1",
                 "--data-dir", str(shared_data), "--output", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "3 labels" in line and "the task has 2" in line
    assert not out.exists()


@pytest.mark.parametrize("content", ["empty", "no config"])
def test_directory_without_a_model(tmp_path, capsys, content):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    if content == "no config":
        (model_dir / "notes.txt").write_text("not a model")
    assert main(["inspect", "--model", str(model_dir)]) == 2
    line = _one_line_error(capsys)
    expected = "is an empty directory" if content == "empty" else "holds no model (no config.json)"
    assert f"{model_dir} {expected}" in line


def test_empty_directory_before_the_tokenizer(tmp_path, shared_data, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["density", "--model", str(empty), "--task", "sst2", "--max-samples", "4",
                 "--data-dir", str(shared_data)]) == 2
    assert "is an empty directory" in _one_line_error(capsys)


def test_unknown_name_offline_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["inspect", "--model", "not-a-model"]) == 2
    line = _one_line_error(capsys)
    assert "'not-a-model'" in line and "HF_HUB_OFFLINE" in line


def test_unknown_name_with_the_hub_out_of_reach_fails_without_retries(capsys, monkeypatch):
    # No offline mode, and the hub does not answer: only the local hub cache is searched (no
    # retries with back-off, whose warnings would add lines).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # were it asked: refused at once
    assert main(["inspect", "--model", "not-a-model"]) == 2
    line = _one_line_error(capsys)
    assert "'not-a-model'" in line and "cannot be reached" in line
