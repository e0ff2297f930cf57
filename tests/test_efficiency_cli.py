"""`deft energy`, `deft prune`, `deft prune-sweep` end to end on tiny trained runs (offline, CPU)."""

import json

import pytest

from deft.cli import main
from deft.core.loss import DensityLossConfig
from deft.training import RunDir, TrainConfig, load_run, train

SAMPLES = ["--max-samples", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A PEFT and a DEFT LoRA run of two steps on a tiny BERT with MiniLM's vocabulary."""
    from conftest import tiny_run_config

    root = tmp_path_factory.mktemp("eff")
    small = dict(max_train_samples=8, max_eval_samples=4, batch_size=4, eval_batch_size=4, max_length=16)
    train(tiny_run_config(root, mode="peft", **small), root / "peft", progress=False)
    train(tiny_run_config(root, density=DensityLossConfig(weight=5.0, eps=1e-2), **small), root / "deft",
          progress=False)
    return root


def test_energy_with_baseline_json(runs, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["energy", "--run", str(runs / "deft"), "--baseline", str(runs / "peft"), *SAMPLES,
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "energy ratio" in printed and "energy change" in printed and "baseline ratio" in printed
    assert "encoder.layer.1" in printed and "base_model.model" not in printed  # grouped, readable blocks
    e = json.loads(out.read_text())
    assert 0 < e["energy_ratio"] <= 1 and 0 < e["baseline"]["energy_ratio"] <= 1
    er_peft, er_deft = e["baseline"]["energy_ratio"], e["energy_ratio"]
    assert e["energy_change"] == pytest.approx((er_peft - er_deft) / er_peft * 100)
    assert e["samples"] == 4 and e["batch_size"] == 1 and e["report"]["batches"] == 4  # batch size 1 by default
    kinds = {b["kind"] for b in e["blocks"]}
    assert {"linear", "embedding", "norm", "activation", "attention_qk", "attention_av"} <= kinds
    assert sum(b["dense"] for b in e["blocks"]) == pytest.approx(e["report"]["dense_energy_pj"])


def test_energy_of_base_model(runs, tmp_path):
    out = tmp_path / "e.json"
    assert main(["energy", "--model", str(runs / "tiny"), "--tokenizer", "minilm", "--task", "sst2", *SAMPLES,
                 "--batch-size", "2", "--data-dir", json.loads((runs / "peft" / "run_config.json").read_text())[
                     "data_dir"], "--json", str(out)]) == 0
    e = json.loads(out.read_text())
    assert 0 < e["energy_ratio"] <= 1 and "energy_change" not in e and e["report"]["batches"] == 2


@pytest.mark.parametrize("extra,expected", [(["--sparsity", "0.5"], 0.5), (["--structure", "2:4"], 0.5),
                                            (["--sparsity", "0.25", "--targets", "all_linear"], 0.25)])
def test_prune_saves_a_loadable_pruned_run(runs, tmp_path, extra, expected):
    out = tmp_path / "pruned"
    assert main(["prune", "--run", str(runs / "deft"), *extra, "--calibration-samples", "4", *SAMPLES,
                 "--output", str(out)]) == 0
    info = json.loads((out / "prune.json").read_text())
    assert info["merged"] is True  # LoRA merged before pruning
    assert info["per_layer_sparsity"] and all(s == pytest.approx(expected) for s in info["per_layer_sparsity"].values())
    assert info["achieved_sparsity"] == pytest.approx(expected)
    assert 0 <= info["metric"] <= 1 and 0 < info["density"] <= 1 and info["samples"] == 4
    # all_linear: q, k, v, attention output, intermediate, output per layer, and the pooler (in the backbone)
    n_layers = 2 if extra[-1] != "all_linear" else 2 * 6 + 1
    assert len(info["per_layer_sparsity"]) == n_layers
    # The pruned run reloads with its zeros, in the N:M pattern where asked, and `deft eval` takes it.
    assert (out / RunDir.PRUNED_WEIGHTS).is_file() and (out / "run_config.json").is_file()
    _, model, _ = load_run(out)
    w = model.bert.encoder.layer[0].intermediate.dense.weight
    assert float((w == 0).float().mean()) == pytest.approx(expected)
    if "2:4" in extra:
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert main(["eval", "--run", str(out), *SAMPLES, "--json", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["metrics"]["accuracy"] == pytest.approx(info["metric"])
    assert ev["density"]["overall"] == pytest.approx(info["density"])


def test_energy_sees_pruned_weights(runs, tmp_path):
    main(["prune", "--run", str(runs / "peft"), "--sparsity", "0.9", "--calibration-samples", "2", "--max-samples",
          "2", "--output", str(tmp_path / "p")])
    ratios = {}
    for name, run in (("dense", runs / "peft"), ("pruned", tmp_path / "p")):
        assert main(["energy", "--run", str(run), "--max-samples", "2", "--json", str(tmp_path / f"{name}.json")]) == 0
        ratios[name] = json.loads((tmp_path / f"{name}.json").read_text())["energy_ratio"]
    assert ratios["pruned"] < ratios["dense"]  # zero weights are neither read nor multiplied


def test_prune_sweep_two_levels(runs, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["prune-sweep", "--run", str(runs / "peft"), "--run", str(runs / "deft"), "--sparsities", "0.25",
                 "--structure", "2:4", "--calibration-samples", "4", *SAMPLES, "--output", str(out)]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["label"] for r in sweep["runs"]] == ["PEFT", "DEFT"]
    for entry in sweep["runs"]:
        assert [(p["sparsity"], p["structure"]) for p in entry["points"]] == [(0.25, None), (0.5, "2:4")]
        assert [p["achieved_sparsity"] for p in entry["points"]] == pytest.approx([0.25, 0.5])
        for p in entry["points"]:
            assert 0 <= p["metric"] <= 1 and 0 < p["density_threshold"] <= p["density"] <= 1
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "DEFT" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["prune", "--run", "/no/such/run", "--sparsity", "0.5", "--output", "x"], "does not exist"),
    (["energy", "--run", "/no/such/run"], "does not exist"),
    (["prune-sweep", "--run", "/no/such/run", "--output", "x"], "does not exist"),
    (["prune", "--run", "{peft}", "--sparsity", "1.5", "--output", "x"], "sparsity must be"),
    (["prune", "--run", "{peft}", "--sparsity", "-0.1", "--output", "x"], "sparsity must be"),
    (["prune-sweep", "--run", "{peft}", "--sparsities", "0", "1", "--output", "x"], "sparsity must be"),
    (["prune", "--run", "{peft}", "--structure", "2-4", "--output", "x"], "malformed N:M"),
    (["prune", "--run", "{peft}", "--structure", "5:4", "--output", "x"], "must not exceed"),
    (["prune-sweep", "--run", "{peft}", "--structure", "2:x", "--output", "x"], "malformed N:M"),
    (["prune", "--run", "{peft}", "--structure", "2:4", "--sparsity", "0.3", "--output", "x"], "drop --sparsity"),
    (["prune", "--run", "{peft}", "--output", "x"], "--sparsity"),
    (["prune", "--run", "{peft}", "--sparsity", "0.5", "--output", "{peft}"], "source run itself"),
    (["energy"], "--run"),
    (["energy", "--run", "{peft}", "--baseline", "/no/such/base"], "does not exist"),
    (["energy", "--model", "minilm"], "--task"),
    (["prune", "--run", "{tiny}", "--sparsity", "0.5", "--output", "x"], "not a deft run"),
])
def test_bad_input_gives_clear_error(runs, argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(peft=runs / "peft", tiny=runs / "tiny") for a in argv]
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # rejected before anything is written


@pytest.mark.parametrize("method", ["adapter"])  # prefix/prompt take the same path (merge_peft leaves them), slower
def test_prune_unmergeable_method_reloads(runs, tmp_path, method):
    """Bottleneck adapters (the paper's method) cannot be merged: the pruned run keeps them and still reloads."""
    cfg = TrainConfig.from_dict({**json.loads((runs / "peft" / "run_config.json").read_text()), "method": method,
                                 "method_options": {}, "max_steps": 1})
    train(cfg, tmp_path / "run", progress=False)
    assert main(["prune", "--run", str(tmp_path / "run"), "--sparsity", "0.5", "--calibration-samples", "4",
                 *SAMPLES, "--output", str(tmp_path / "pruned")]) == 0
    info = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert info["merged"] is False and info["achieved_sparsity"] == pytest.approx(0.5)
    _, model, _ = load_run(tmp_path / "pruned")
    if method == "adapter":  # the adapters are back in the down projections
        assert any(type(m).__name__ == "BottleneckAdapter" for m in model.modules())
    else:  # prefix tuning still runs inside its peft wrapper
        assert hasattr(model, "peft_config")
    w = [m for n, m in model.named_modules() if n.endswith("layer.0.intermediate.dense")][0].weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5)
    assert main(["eval", "--run", str(tmp_path / "pruned"), *SAMPLES, "--json", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["metrics"]["accuracy"] == pytest.approx(info["metric"])
    assert ev["density"]["overall"] == pytest.approx(info["density"])


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_prune_of_an_ada_run_loads_and_evaluates(runs, tmp_path, method):
    """Bug: `deft prune` on an ADA run copied run_config.json and method/ but not adaptive/, so the
    pruned run could not be loaded (`deft eval` exited 2). Every part of the run now travels."""
    from conftest import SHARED_DATA

    base = json.loads((runs / "peft" / "run_config.json").read_text())
    cfg = TrainConfig.from_dict({**base, "mode": "deft", "method": method, "ada": True, "learning_rate": None,
                                 "method_options": None, "lambda_warmup": None, "data_dir": str(SHARED_DATA)})
    train(cfg, tmp_path / "ada", progress=False)
    out = tmp_path / "pruned"
    assert main(["prune", "--run", str(tmp_path / "ada"), "--sparsity", "0.5", "--calibration-samples", "4",
                 *SAMPLES, "--output", str(out)]) == 0
    assert (out / RunDir.ADAPTIVE / "adaptive.safetensors").is_file()
    assert main(["eval", "--run", str(out), *SAMPLES, "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    info = json.loads((out / "prune.json").read_text())
    assert evaluated["metrics"][info["main_metric"]] == pytest.approx(info["metric"])
    assert evaluated["density"]["overall"] == pytest.approx(info["density"])
    # α survived: the reloaded pruned model still scales its blocks by the trained α
    from deft.adaptive import adaptive_weights

    _, model, _ = load_run(out)
    _, source, _ = load_run(tmp_path / "ada")
    assert adaptive_weights(model).alphas() == pytest.approx(adaptive_weights(source).alphas())
