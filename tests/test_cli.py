"""The command line, end to end, offline: the real MiniLM shipped on PyPI and tiny saved models."""

import json

import pytest
import transformers as T

from deft.cli import main


def test_inspect_minilm_table(capsys):
    assert main(["inspect", "--model", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "family rule: bert" in out
    assert out.count("intermediate_act_fn") == 6 and "1536" in out and "GELUActivation" in out


def test_inspect_json(capsys):
    assert main(["inspect", "--model", "minilm", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family_rule"] == "bert" and len(info["sites"]) == 6
    assert info["parameters"]["total"] == 22_713_216
    assert {"module", "stack", "layer", "width", "activation"} <= set(info["sites"][0])


def test_density_minilm_sst2_json(tmp_path, shared_data, capsys):
    out_file = tmp_path / "d.json"
    code = main(["density", "--model", "minilm", "--task", "sst2", "--split", "dev", "--max-samples", "48",
                 "--batch-size", "16", "--data-dir", str(shared_data), "--json", str(out_file)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "union/seq" in printed
    result = json.loads(out_file.read_text())
    d = result["density"]
    assert result["samples"] == 48
    assert 0.9 < d["overall"] <= 1.0  # GELU is almost never exactly 0 in a pretrained model
    assert d["encoder"] == d["overall"] and d["decoder"] is None
    assert len(d["per_layer"]) == 6 and d["threshold"]["tau"] == 0.01
    assert d["threshold"]["overall"] < d["overall"]


def test_density_tiny_model_dir_with_foreign_tokenizer(tmp_path, shared_data):
    model_dir = tmp_path / "tiny"
    T.BertForSequenceClassification(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, hidden_act="relu")).save_pretrained(model_dir)
    out_file = tmp_path / "d.json"
    assert main(["density", "--model", str(model_dir), "--tokenizer", "minilm", "--task", "rte", "--max-samples", "8",
                 "--data-dir", str(shared_data), "--json", str(out_file)]) == 0
    d = json.loads(out_file.read_text())["density"]
    assert 0.2 < d["overall"] < 0.8  # ReLU on random init: about half the entries are exactly 0


@pytest.mark.parametrize("argv,needle", [
    (["density", "--task", "nope"], "valid tasks"),
    (["inspect", "--model", "/no/such/dir"], "alias"),
    (["density", "--task", "sst2", "--split", "trainz"], "Unknown split"),
])
def test_bad_input_gives_clear_error(argv, needle, capsys, request):
    # only the density commands read data: `inspect` runs (and checks its error) without it
    data = ["--data-dir", str(request.getfixturevalue("shared_data"))] if argv[0] == "density" else []
    assert main(argv + data) == 2
    assert needle in capsys.readouterr().err


def test_missing_data_dir_is_clear(capsys):
    assert main(["density", "--task", "sst2", "--data-dir", "/no/such/data"]) == 2
    assert "/no/such/data" in capsys.readouterr().err


@pytest.mark.parametrize("argv, lr, warmup", [
    (["--method", "lora"], 5e-3, 0.0),
    (["--method", "prompt"], 1e-3, 0.0),
    (["--method", "adapter"], 1e-2, 0.5),  # adapter stays at the majority class at 1e-3 in a short run
    (["--method", "adapter", "--lr", "3e-4", "--lambda-warmup", "0"], 3e-4, 0.0),
    (["--method", "prefix", "--lambda-warmup", "0.2"], 1e-3, 0.2),
])
def test_train_defaults_per_method(argv, lr, warmup):
    from deft.cli import train_config, build_parser

    config = train_config(build_parser().parse_args(["train", *argv, "--output", "x"]))
    assert config.learning_rate == lr
    assert config.lambda_warmup == warmup
