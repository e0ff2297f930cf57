"""Training end to end on tiny models: results schema, save/reload, resume, NaN stop, compare."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deft.cli.format import comparison_table
from deft.training import compare
from deft.core.loss import DensityLossConfig
from deft.training import NonFiniteLossError, RunDir, TrainConfig, load_run, train

RESULT_KEYS = {"task", "model", "method", "mode", "seed", "metrics", "density", "trainable_params", "train_seconds"}


def tiny_config(model_dir, shared_data, **overrides):
    base = dict(model=model_dir, tokenizer="minilm", task="sst2", method="lora", max_train_samples=16,
                max_eval_samples=16, batch_size=8, eval_batch_size=8, max_steps=2, max_length=32,
                data_dir=str(shared_data), learning_rate=1e-3)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt", "qlora"])
def test_train_two_steps_saves_and_reloads_same_outputs(method, tiny_bert_dir, shared_data, tmp_path):
    cfg = tiny_config(tiny_bert_dir, shared_data, method=method)
    results = train(cfg, tmp_path / "run", progress=False)
    assert RESULT_KEYS <= set(results)
    assert results["steps"] == 2 and results["mode"] == "deft" and results["method"] == method
    assert 0 < results["trainable_params"] < results["total_params"]
    assert set(results["density"]) >= {"overall", "per_layer", "encoder", "decoder", "threshold"}
    assert results["density"]["decoder"] is None and len(results["density"]["per_layer"]) == 2
    assert "accuracy" in results["metrics"]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["metrics"] == results["metrics"]
    # reload twice from disk: the trained modules are restored, outputs identical
    _, model_a, tok = load_run(tmp_path / "run")
    _, model_b, _ = load_run(tmp_path / "run")
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model_a(**batch).logits, model_b(**batch).logits)


def test_reloaded_run_reproduces_saved_metric_and_density(tiny_bert_dir, shared_data, tmp_path):
    from deft.cli import main

    cfg = tiny_config(tiny_bert_dir, shared_data)
    results = train(cfg, tmp_path / "run", progress=False)
    assert main(["eval", "--run", str(tmp_path / "run"), "--max-samples", "16", "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["metrics"]["accuracy"] == pytest.approx(results["metrics"]["accuracy"])
    assert again["density"]["overall"] == pytest.approx(results["density"]["overall"])
    # `deft density --model RUN_DIR` measures the saved fine-tuned run, not the base model
    assert main(["density", "--model", str(tmp_path / "run"), "--task", "sst2", "--max-samples", "16",
                 "--data-dir", str(shared_data), "--json", str(tmp_path / "d.json")]) == 0
    measured = json.loads((tmp_path / "d.json").read_text())["density"]
    assert measured["overall"] == pytest.approx(results["density"]["overall"])


def test_peft_and_deft_differ_only_by_the_loss(tiny_bert_dir, shared_data, tmp_path):
    peft = train(tiny_config(tiny_bert_dir, shared_data, mode="peft"), tmp_path / "p", progress=False)
    deft0 = train(tiny_config(tiny_bert_dir, shared_data, density=DensityLossConfig(weight=0.0)), tmp_path / "d",
                  progress=False)
    # λ = 0 is PEFT exactly: same data order, same updates, same result
    assert deft0["metrics"]["loss"] == pytest.approx(peft["metrics"]["loss"], rel=1e-5)
    deft = train(tiny_config(tiny_bert_dir, shared_data, density=DensityLossConfig(weight=50.0, eps=1e-2)),
                 tmp_path / "d2", progress=False)
    assert deft["metrics"]["loss"] != pytest.approx(peft["metrics"]["loss"], rel=1e-5)


def test_evaluation_cadence_does_not_change_training(tiny_bert_dir, shared_data, tmp_path):
    # Each evaluation builds a DataLoader iterator, which draws a seed from torch's global RNG and
    # so shifts every later dropout mask: without isolation, --evals-per-epoch changed the result.
    def final_weights(evals, name):
        cfg = tiny_config(tiny_bert_dir, shared_data, max_steps=-1, epochs=1.0, max_train_samples=32,
                          evals_per_epoch=evals)
        train(cfg, tmp_path / name, progress=False)
        _, model, _ = load_run(tmp_path / name)
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}

    once, every_step = final_weights(1, "once"), final_weights(4, "every-step")
    assert once and once.keys() == every_step.keys()
    for key in once:
        torch.testing.assert_close(every_step[key], once[key], rtol=0, atol=0, msg=key)


def test_resume_continues_from_checkpoint(tiny_bert_dir, shared_data, tmp_path):
    first = train(tiny_config(tiny_bert_dir, shared_data, max_steps=2), tmp_path / "run", progress=False)
    assert first["resumed_from"] is None
    (tmp_path / "run" / "run_config.json").unlink()  # settings change: allowed once the old config is gone
    more = train(tiny_config(tiny_bert_dir, shared_data, max_steps=4), tmp_path / "run", resume=True, progress=False)
    assert more["resumed_from"] and more["resumed_from"].endswith("checkpoint-2")
    assert more["steps"] == 4


def test_resume_accepts_a_run_saved_before_a_defaulted_setting_existed(tiny_bert_dir, shared_data, tmp_path):
    # A run directory from an older deft lacks settings added since (with their defaults): it resumes.
    train(tiny_config(tiny_bert_dir, shared_data), tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    del saved["train_density_form"]
    (tmp_path / "run" / "run_config.json").write_text(json.dumps(saved))
    more = train(tiny_config(tiny_bert_dir, shared_data), tmp_path / "run", resume=True, progress=False)
    assert more["resumed_from"] and more["resumed_from"].endswith("checkpoint-2")


def test_resume_with_different_settings_is_refused(tiny_bert_dir, shared_data, tmp_path):
    train(tiny_config(tiny_bert_dir, shared_data), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="different settings"):
        train(tiny_config(tiny_bert_dir, shared_data, learning_rate=5e-3), tmp_path / "run", resume=True,
              progress=False)


def test_nan_loss_stops_with_the_step(tiny_bert_dir, shared_data, tmp_path, monkeypatch):
    original = torch.optim.AdamW.step

    def poisoning_step(self, *args, **kwargs):  # the first update turns the weights into NaN
        out = original(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    cfg = tiny_config(tiny_bert_dir, shared_data, max_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"step 2"):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.parametrize("bad,match", [
    (dict(mode="half"), "mode"), (dict(lambda_warmup=2.0), "lambda_warmup"), (dict(batch_size=0), "batch_size"),
])
def test_bad_train_config_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_unknown_method_lists_choices(tiny_bert_dir, shared_data, tmp_path):
    with pytest.raises(ValueError, match="lora"):
        train(tiny_config(tiny_bert_dir, shared_data, method="ia3"), tmp_path / "run", progress=False)


def test_compare_writes_table_json_and_plot(tiny_bert_dir, shared_data, tmp_path):
    cfg = tiny_config(tiny_bert_dir, shared_data, density=DensityLossConfig(weight=5.0, eps=1e-2))
    payload = compare(cfg, [0, 1], tmp_path / "cmp", progress=False)
    s = payload["summary"]
    assert len(payload["runs"]["peft"]) == 2 and len(payload["runs"]["deft"]) == 2
    expected = (s["peft"]["density"]["mean"] - s["deft"]["density"]["mean"]) / s["peft"]["density"]["mean"] * 100
    assert s["density_change"]["density"] == pytest.approx(expected)
    assert math.isfinite(s["metric_delta"])
    assert (tmp_path / "cmp" / "comparison.json").exists()
    assert (tmp_path / "cmp" / "density_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    table = comparison_table(payload)
    assert "PEFT" in table and "DEFT" in table and "change %" in table
    # a second compare reuses the finished runs instead of training again
    mtime = (tmp_path / "cmp" / "peft-seed0" / "results.json").stat().st_mtime
    compare(cfg, [0, 1], tmp_path / "cmp", progress=False)
    assert (tmp_path / "cmp" / "peft-seed0" / "results.json").stat().st_mtime == mtime
    # another λ / ε / warm-up trains a new DEFT run but reuses the PEFT run, which they do not shape
    shutil.copytree(tmp_path / "cmp" / "peft-seed0", tmp_path / "cmp2" / "peft-seed0")
    other = replace(cfg, density=DensityLossConfig(weight=1.0, eps=0.1), lambda_warmup=0.5)
    again = compare(other, [0], tmp_path / "cmp2", progress=False)
    assert (tmp_path / "cmp2" / "peft-seed0" / "results.json").stat().st_mtime == mtime
    assert again["runs"]["deft"][0]["config"]["lambda_warmup"] == 0.5


def test_gradient_checkpointing_is_enabled_non_reentrant_and_keeps_the_density_term(
        tiny_bert_dir, shared_data, tmp_path, monkeypatch):
    import transformers

    calls = []
    original = transformers.PreTrainedModel.activation_checkpointing_enable

    def recording(self, *args, **kwargs):
        calls.append(kwargs.get("activation_checkpointing_kwargs") or (args[0] if args else None))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "activation_checkpointing_enable", recording)
    cfg = tiny_config(tiny_bert_dir, shared_data, gradient_checkpointing=True, evals_per_epoch=1)
    with warnings.catch_warnings():
        # no deprecated TrainingArguments names (peft's own `is_gradient_checkpointing` use is not ours)
        warnings.filterwarnings("error", message=r"`gradient_checkpointing(_kwargs)?` is deprecated")
        train(cfg, tmp_path / "run", progress=False)
    assert calls and calls[-1] == {"use_reentrant": False}
    logged = [e["density_loss"] for e in json.loads((tmp_path / "run" / "history.json").read_text())
              if "density_loss" in e]
    assert logged and all(v > 0 for v in logged)


def test_run_identity_ignores_density_settings_only_for_peft():
    peft = TrainConfig(mode="peft", density=DensityLossConfig(weight=1.0, eps=1e-2))
    assert peft.same_run(replace(peft, density=DensityLossConfig(weight=3.0, eps=0.1), lambda_warmup=0.5).to_dict())
    assert not peft.same_run(replace(peft, learning_rate=1e-3).to_dict())
    assert not peft.same_run(replace(peft, mode="deft").to_dict())
    deft = replace(peft, mode="deft")
    assert not deft.same_run(replace(deft, density=DensityLossConfig(weight=3.0, eps=1e-2)).to_dict())
    assert not deft.same_run(replace(deft, lambda_warmup=0.5).to_dict())
    assert deft.same_run(json.loads(json.dumps(deft.to_dict())))


def test_torchrun_two_processes_gloo(tiny_bert_dir, shared_data, tmp_path):
    """A 2-process CPU run through torchrun: the Trainer shards the data, both ranks train."""
    script = tmp_path / "dist_train.py"
    script.write_text(
        "import sys, json\n"
        "from deft.training import TrainConfig, train\n"
        f"cfg = TrainConfig(model={tiny_bert_dir!r}, tokenizer='minilm', task='sst2', method='lora', "
        f"max_train_samples=32, max_eval_samples=8, batch_size=4, eval_batch_size=4, max_steps=2, max_length=16, "
        f"data_dir={str(shared_data)!r})\n"
        "import torch.distributed as dist\n"
        f"r = train(cfg, {str(tmp_path / 'run')!r}, progress=False)\n"
        # one file per rank: two processes printing to one pipe is not a reliable channel
        "import os, pathlib\n"
        f"out = pathlib.Path({str(tmp_path)!r}) / ('rank' + os.environ['RANK'] + '.json')\n"
        "out.write_text(json.dumps({'world': dist.get_world_size() if dist.is_initialized() else 1, "
        "'steps': r['steps']}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks == [{"world": 2, "steps": 2}] * 2, proc.stdout[-2000:]
    # Each rank evaluated half the dev subset; the saved density must cover all of it, as a
    # single-process re-measurement of the same run does (it counted one shard before the fix).
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    from deft.cli import main

    assert main(["eval", "--run", str(tmp_path / "run"), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [r["tokens"] for r in saved["density"]["per_layer"]] == [r["tokens"] for r in again["density"]["per_layer"]]
    assert saved["density"]["overall"] == pytest.approx(again["density"]["overall"])


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_deft_lowers_density(act, tiny_bert_dir, shared_data, tmp_path):
    """The method's central claim on a tiny model: a few dozen steps with λ > 0 leave the MLP
    activations sparser than the same run (same seed, data, steps) with λ = 0 — at τ on GELU
    (never exactly 0 there), and exactly on ReLU."""
    import transformers as T

    model_dir = tiny_bert_dir
    if act == "relu":
        model_dir = str(tmp_path / "relu-bert")
        config = T.BertConfig.from_pretrained(tiny_bert_dir, hidden_act="relu")
        torch.manual_seed(0)
        T.BertModel(config).save_pretrained(model_dir)
    common = dict(max_train_samples=256, max_eval_samples=64, batch_size=8, max_steps=32, learning_rate=5e-3)
    dense = train(tiny_config(model_dir, shared_data, density=DensityLossConfig(weight=0.0), **common),
                  tmp_path / "lam0", progress=False)
    sparse = train(tiny_config(model_dir, shared_data, density=DensityLossConfig(weight=1.0), **common),
                   tmp_path / "lam1", progress=False)
    assert dense["steps"] == sparse["steps"] == 32
    d0, d1 = dense["density"], sparse["density"]
    key = "density_threshold" if act == "gelu" else "density"
    before, after = [r[key] for r in d0["per_layer"]], [r[key] for r in d1["per_layer"]]
    assert sum(after) / len(after) < sum(before) / len(before) - 0.05, (before, after)
    assert all(a < b for a, b in zip(after, before)), (before, after)  # every layer, not one outlier


def test_an_output_holding_another_run_is_refused_unless_overwritten(tiny_bert_dir, shared_data, tmp_path, capsys):
    """Issue: a second run into the same --output silently replaced a finished run, and a later
    --resume picked up the first run's checkpoints (its λ 1 weights saved labelled λ 0.5)."""
    from deft.cli import main

    out = tmp_path / "run"
    first = train(tiny_config(tiny_bert_dir, shared_data, evals_per_epoch=1), out, progress=False)
    saved = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(tiny_bert_dir, shared_data, density=DensityLossConfig(weight=0.5)), out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == saved  # nothing touched
    argv = ["train", "--model", tiny_bert_dir, "--tokenizer", "minilm", "--max-train-samples", "16",
            "--max-eval-samples", "16", "--batch-size", "8", "--max-steps", "2", "--max-length", "32",
            "--data-dir", str(shared_data), "--lambda", "0.5", "--output", str(out)]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    old_checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert old_checkpoints
    assert main([*argv, "--overwrite"]) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["config"]["density"]["weight"] == 0.5 and first["config"]["density"]["weight"] == 1.0
    assert second["resumed_from"] is None


def test_a_late_rank_does_not_refuse_the_config_rank_0_just_wrote(tiny_bert_dir, shared_data, tmp_path,
                                                                  monkeypatch):
    """CI failure: under torchrun rank 1 started after rank 0 had written run_config.json, took the
    directory for an earlier run and refused its own job. Only rank 0 judges the directory."""
    cfg = tiny_config(tiny_bert_dir, shared_data)
    out = tmp_path / "run"
    RunDir(out).write_json(RunDir.CONFIG, cfg.to_dict())  # what rank 0 wrote a moment earlier
    monkeypatch.setenv("RANK", "1")  # no WORLD_SIZE: the Trainer itself runs single-process
    assert train(cfg, out, progress=False)["steps"] == cfg.max_steps
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="already holds a run"):  # rank 0 still refuses it
        train(cfg, out, progress=False)


def test_save_steps_checkpoints_mid_epoch_and_resume_says_what_it_found(tiny_bert_dir, shared_data, tmp_path,
                                                                         capsys):
    """Issue: checkpoints came only at evaluations (once per epoch by default), and --resume with
    no checkpoint silently started from scratch."""
    cfg = tiny_config(tiny_bert_dir, shared_data, max_train_samples=64, max_steps=3, save_steps=1)
    train(cfg, tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    without = tiny_config(tiny_bert_dir, shared_data, max_train_samples=64, max_steps=3)
    train(without, tmp_path / "eval-only", progress=False)  # 8 steps per epoch: only the end's checkpoint
    assert sorted(p.name for p in (tmp_path / "eval-only" / "checkpoints").iterdir()) == ["checkpoint-3"]
    capsys.readouterr()
    train(without, tmp_path / "fresh", resume=True, progress=True)
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "run" / "run_config.json").unlink()  # longer run, same weights: allowed once the old config is gone
    resumed = train(replace(cfg, max_steps=4), tmp_path / "run", resume=True, progress=True)
    assert "resuming from" in capsys.readouterr().err and resumed["resumed_from"].endswith("checkpoint-3")
    with pytest.raises(ValueError, match="save_steps"):
        tiny_config(tiny_bert_dir, shared_data, save_steps=0)
