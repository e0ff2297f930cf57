"""Tests for the GLUE task/data layer (deft.tasks, deft.tasks.glue) on the real official tsv files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from deft.tasks import TASKS, get_task
from deft.tasks.glue import (
    DATA_DIR_ENV,
    GlueTask,
    compute_glue_metrics,
    load_glue,
    predictions_from_logits,
    resolve_data_dir,
)

# Tests reading the real files take conftest.py's ``shared_data`` fixture: the data root from
# $DEFT_DATA_DIR, else ../shared/data; they skip without it, and fail if $DEFT_DATA_DIR is set
# but has no glue/.


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # The code under test must not read the caller's $DEFT_DATA_DIR behind the tests' back: they
    # pass the data root explicitly (conftest.py read the variable at import time).
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# --- registry -----------------------------------------------------------------------------------


def test_registry_names_and_aliases() -> None:
    glue = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert {name for name, spec in TASKS.items() if getattr(spec, "kind", "glue") == "glue"} == glue
    assert get_task("SST-2") is get_task("sst2") is TASKS["sst2"]
    assert get_task("sts-b").name == "stsb"
    assert get_task("STS-B").glue_dir == "STS-B"


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        get_task("squad2")
    for name in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"):
        assert name in str(err.value)


def test_task_specs_match_hub_label_ids() -> None:
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    assert get_task("qnli").label_names == ("entailment", "not_entailment")
    assert get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    stsb = get_task("stsb")
    assert isinstance(stsb, GlueTask) and stsb.is_regression and stsb.num_labels == 1
    assert get_task("cola").main_metric == "matthews_correlation"
    assert stsb.main_metric == "pearson"
    assert get_task("mnli").main_metric == "accuracy"


def test_split_aliases() -> None:
    sst2, mnli = get_task("sst2"), get_task("mnli")
    assert isinstance(sst2, GlueTask) and isinstance(mnli, GlueTask)
    assert sst2.resolve_split("validation") == "dev"
    assert sst2.hub_split("dev") == "validation"
    assert mnli.resolve_split("dev") == mnli.resolve_split("validation") == "dev_matched"
    assert mnli.hub_split("dev_mismatched") == "validation_mismatched"
    with pytest.raises(ValueError, match="dev_matched"):
        mnli.resolve_split("devv")


# --- data directory -----------------------------------------------------------------------------


def test_resolve_data_dir_root_glue_env_and_none(monkeypatch: pytest.MonkeyPatch, shared_data: Path) -> None:
    glue = shared_data / "glue"
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(str(shared_data)) == glue
    assert resolve_data_dir(glue) == glue
    monkeypatch.setenv(DATA_DIR_ENV, str(shared_data))
    assert resolve_data_dir(None) == glue


def test_resolve_data_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_data_dir(tmp_path / "nope")


def test_missing_task_file_in_data_dir(tmp_path: Path) -> None:
    # A data directory without the task's file must not fall back to the hub. (Was: QQP read from
    # the shared data, which only held because that copy happens to lack QQP.)
    _write(tmp_path / "glue", "SST-2", "dev", "sentence\tlabel\nfine\t1\n")
    with pytest.raises(FileNotFoundError) as err:
        load_glue("qqp", "dev", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "glue" / "QQP" / "dev.tsv") in msg and "hub" in msg


# --- real files ---------------------------------------------------------------------------------

ROW_COUNTS = [
    ("sst2", "train", 67349),
    ("sst2", "dev", 872),
    ("mrpc", "train", 3668),
    ("mrpc", "dev", 408),
    ("rte", "train", 2490),
    ("rte", "dev", 277),
    ("cola", "train", 8551),
    ("cola", "dev", 1043),
    ("stsb", "train", 5749),
    ("stsb", "dev", 1500),
    ("qnli", "dev", 5463),
]


@pytest.mark.parametrize(("task", "split", "rows"), ROW_COUNTS)
def test_row_counts(task: str, split: str, rows: int, shared_data: Path) -> None:
    ds = load_glue(task, split, data_dir=shared_data)
    assert len(ds) == rows
    assert ds["idx"][:3] == [0, 1, 2] and ds["idx"][-1] == rows - 1
    pair = get_task(task).is_pair  # type: ignore[attr-defined]
    assert set(ds.column_names) == ({"text_a", "text_b", "label", "idx"} if pair else {"text_a", "label", "idx"})


def test_label_distributions_match_manifest(shared_data: Path) -> None:
    assert Counter(load_glue("sst2", "dev", shared_data)["label"]) == {0: 428, 1: 444}
    assert Counter(load_glue("mrpc", "train", shared_data)["label"]) == {0: 1194, 1: 2474}
    assert Counter(load_glue("rte", "train", shared_data)["label"]) == {0: 1249, 1: 1241}  # 0 = entailment
    assert Counter(load_glue("qnli", "dev", shared_data)["label"]) == {0: 2702, 1: 2761}


def test_mrpc_bom_header(shared_data: Path) -> None:
    ds = load_glue("mrpc", "train", data_dir=shared_data)
    row = ds[0]
    assert row["label"] == 1
    assert row["text_a"].startswith("Amrozi accused his brother")
    assert not any(t.startswith("\ufeff") for t in ds["text_a"][:5])


def test_cola_headerless_and_test_header(shared_data: Path) -> None:
    row = load_glue("cola", "train", data_dir=shared_data)[0]
    assert row == {
        "text_a": "Our friends won't buy this analysis, let alone the next one we propose.",
        "label": 1,
        "idx": 0,
    }
    test = load_glue("cola", "test", data_dir=shared_data)
    assert len(test) == 1063 and test[0]["text_a"] == "Bill whistled past the house." and test[0]["label"] == -1


def test_sst2_trailing_space_stripped_and_validation_alias(shared_data: Path) -> None:
    dev = load_glue("sst2", "validation", data_dir=shared_data)
    assert len(dev) == 872
    assert dev[0]["text_a"] == "it 's a charming and often affecting journey ."


def test_stsb_float_scores(shared_data: Path) -> None:
    ds = load_glue("stsb", "dev", data_dir=shared_data)
    assert ds.features["label"].dtype == "float32"
    assert ds[0]["label"] == 5.0 and ds[1]["label"] == pytest.approx(4.75)


def test_qnli_stray_quote_kept(shared_data: Path) -> None:
    ds = load_glue("qnli", "dev", data_dir=shared_data)
    for i in (694, 3428):
        assert ds[i]["idx"] == i
        assert ds[i]["text_b"].startswith('" ')
    assert ds[3428]["text_a"] == "Who reportedly wanted Tesla's company?"
    assert ds[3428]["label"] == 0


def test_max_samples_deterministic_subset(shared_data: Path) -> None:
    full = load_glue("rte", "dev", data_dir=shared_data)
    a = load_glue("rte", "dev", data_dir=shared_data, max_samples=50, seed=1)
    b = load_glue("rte", "dev", data_dir=shared_data, max_samples=50, seed=1)
    c = load_glue("rte", "dev", data_dir=shared_data, max_samples=50, seed=2)
    small = load_glue("rte", "dev", data_dir=shared_data, max_samples=10, seed=1)
    assert len(a) == 50 and a["idx"] == b["idx"] and a["idx"] != c["idx"]
    assert a["idx"] == sorted(a["idx"]) and set(small["idx"]) <= set(a["idx"])
    assert all(a[j]["text_a"] == full[a[j]["idx"]]["text_a"] for j in range(0, 50, 7))
    assert len(load_glue("rte", "dev", data_dir=shared_data, max_samples=10_000)) == 277


# --- malformed tsv ------------------------------------------------------------------------------


def _write(root: Path, task_dir: str, split: str, text: str) -> None:
    (root / task_dir).mkdir(parents=True, exist_ok=True)
    (root / task_dir / f"{split}.tsv").write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("task", "task_dir", "text", "line", "what"),
    [
        ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", 3, "columns"),
        ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", 3, "maybe"),
        ("sst2", "SST-2", "sentence\tlabel\nfine \t1\nbad \t2\n", 3, "'2'"),
        ("stsb", "STS-B", "index\tsentence1\tsentence2\tscore\n0\ta\tb\tfive\n", 2, "five"),
        ("cola", "CoLA", "gj04\t1\t\tok.\ngj04\t1\tok.\n", 2, "columns"),
    ],
)
def test_malformed_rows_name_file_and_line(
    tmp_path: Path, task: str, task_dir: str, text: str, line: int, what: str
) -> None:
    _write(tmp_path, task_dir, "train", text)
    with pytest.raises(ValueError) as err:
        load_glue(task, "train", data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / task_dir / "train.tsv") in msg and f"line {line}" in msg and what in msg


def test_tmp_tsv_quotes_crlf_and_env_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "glue", "RTE", "dev", 'index\tsentence1\tsentence2\tlabel\r\n0\t" a\tb "c\tnot_entailment\r\n')
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_glue("rte", "validation")[0] == {"text_a": '" a', "text_b": 'b "c', "label": 1, "idx": 0}


# --- hub path (offline: load_dataset is monkeypatched) -------------------------------------------


def test_hub_column_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str]] = []

    def fake_load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, -1], "idx": [0, 1]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_glue("MNLI", "dev", max_samples=5)
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert ds.column_names == ["text_a", "text_b", "label", "idx"]
    assert ds[0] == {"text_a": "p0", "text_b": "h0", "label": 2, "idx": 0}
    assert ds[1]["label"] == -1


def test_hub_single_sentence_and_regression(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        if name == "sst2":
            return datasets.Dataset.from_dict({"sentence": ["good"], "label": [1], "idx": [0]})
        return datasets.Dataset.from_dict(
            {"sentence1": ["a"], "sentence2": ["b"], "label": [3.8], "idx": [0]},
            features=datasets.Features(
                {
                    "sentence1": datasets.Value("string"),
                    "sentence2": datasets.Value("string"),
                    "label": datasets.Value("float32"),
                    "idx": datasets.Value("int32"),
                }
            ),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_glue("sst2", "train")[0] == {"text_a": "good", "label": 1, "idx": 0}
    stsb = load_glue("stsb", "train")
    assert stsb.features["label"].dtype == "float32" and stsb.features["idx"].dtype == "int64"
    assert stsb[0]["text_b"] == "b" and stsb[0]["label"] == pytest.approx(3.8)


def test_unreachable_hub_says_how_to_run_offline(monkeypatch: pytest.MonkeyPatch, tiny_bert_dir, capsys) -> None:
    from deft.cli import main
    from deft.tasks.hub import DataNotAvailableError
    from deft.tasks.squad import load_squad

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataNotAvailableError, match=r"--data-dir or \$DEFT_DATA_DIR.*tsv layout"):
        load_glue("sst2", "dev")
    with pytest.raises(DataNotAvailableError, match=r"squad/v1\.1/dev-v1\.1\.json"):
        load_squad("dev")
    # The command ends with that message and exit status 2, not a traceback.
    assert main(["density", "--model", tiny_bert_dir, "--tokenizer", "minilm", "--task", "sst2"]) == 2
    assert "cannot load 'nyu-mll/glue' from the Hugging Face hub" in capsys.readouterr().err


# --- metrics ------------------------------------------------------------------------------------


def test_accuracy() -> None:
    assert compute_glue_metrics("sst2", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    assert compute_glue_metrics("mnli", [0, 1, 2], [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}


def test_accuracy_and_f1() -> None:
    # tp=2 fp=1 fn=1 tn=2 -> precision 2/3, recall 2/3, F1 2/3; accuracy 4/6
    m = compute_glue_metrics("mrpc", [1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0])
    assert m == {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(2 / 3)}
    # tp=1 fp=0 fn=2 -> P=1, R=1/3, F1 = 2*(1*1/3)/(4/3) = 0.5
    assert compute_glue_metrics("qqp", [1, 0, 0, 0], [1, 1, 1, 0])["f1"] == pytest.approx(0.5)


def test_matthews() -> None:
    # tp=2 tn=1 fp=1 fn=0: (2*1 - 1*0) / sqrt(3*2*2*1) = 2/sqrt(12)
    m = compute_glue_metrics("cola", [1, 1, 1, 0], [1, 1, 0, 0])
    assert m == {"matthews_correlation": pytest.approx(2 / np.sqrt(12))}
    assert compute_glue_metrics("cola", [1, 0, 1, 0], [1, 0, 1, 0])["matthews_correlation"] == pytest.approx(1.0)


def test_correlations() -> None:
    m = compute_glue_metrics("stsb", [0.5, 1.5, 2.5, 3.5], [1.0, 3.0, 5.0, 7.0])
    assert m == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    # monotone but nonlinear: spearman 1, pearson < 1
    m = compute_glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 100.0])
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] < 0.9
    assert compute_glue_metrics("stsb", [1.0, 2.0, 3.0], [3.0, 2.0, 1.0])["pearson"] == pytest.approx(-1.0)


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        compute_glue_metrics("sst2", [1, 0], [1])
    with pytest.raises(ValueError, match="unlabeled"):
        compute_glue_metrics("sst2", [1, 0], [1, -1])


def test_predictions_from_logits() -> None:
    import torch

    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert predictions_from_logits("mnli", logits).tolist() == [1, 0]
    assert predictions_from_logits("sst2", torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16)).tolist() == [1]
    reg = predictions_from_logits("stsb", np.array([[1.5], [2.5]]))
    assert reg.shape == (2,) and reg.tolist() == [1.5, 2.5]
    with pytest.raises(ValueError, match="shape"):
        predictions_from_logits("sst2", logits)
