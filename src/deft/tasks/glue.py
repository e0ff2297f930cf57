"""GLUE tasks: task specs, loading (local official tsv files or the Hugging Face hub) and metrics.

Every split is returned as a :class:`datasets.Dataset` with one schema:

- ``text_a`` (str): the first (or only) sentence;
- ``text_b`` (str): the second sentence, present only for sentence-pair tasks;
- ``label`` (int64 class id, float32 score for STS-B; ``-1`` on unlabeled test splits);
- ``idx`` (int64): 0-based row position in the original split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import datasets
import numpy as np

from deft.tasks.holdout import HELDOUT_SPLIT, holdout_indices
from deft.tasks.hub import DATA_DIR_ENV, load_hub_dataset

__all__ = [
    "DATA_DIR_ENV",
    "GLUE_TASKS",
    "HUB_DATASET",
    "GlueTask",
    "HELDOUT_SPLIT",
    "compute_glue_metrics",
    "glue_task",
    "holdout_indices",
    "load_glue",
    "normalize_task_name",
    "predictions_from_logits",
    "read_glue_tsv",
    "resolve_data_dir",
]

"""Environment variable naming a local data directory (used when no ``data_dir`` is passed)."""

HUB_DATASET = "nyu-mll/glue"
"""Hugging Face hub dataset used when no local data directory is configured."""

UNLABELED = -1
"""Label value of rows without a gold label (GLUE test splits), as on the hub."""

_SPLIT_ALIASES = {"validation": "dev"}
_MNLI_SPLIT_ALIASES = {
    "dev": "dev_matched",
    "validation": "dev_matched",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
    "test": "test_matched",
}


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Column names refer to the header of GLUE's official tsv files; the hub columns are
    listed separately because ``nyu-mll/glue`` renames some of them (e.g. MNLI premise/hypothesis).
    """

    name: str
    """Canonical lowercase name, e.g. ``"sst2"``."""
    glue_dir: str
    """Directory name in the official GLUE layout, e.g. ``"SST-2"``."""
    text_columns: tuple[str, ...]
    """Sentence column(s) in the tsv header (1 for single-sentence tasks, 2 for pairs)."""
    label_column: str
    """Label column in the tsv header."""
    hub_config: str
    """Config name of ``nyu-mll/glue``."""
    hub_text_columns: tuple[str, ...]
    """Sentence column(s) on the hub, in the same order as ``text_columns``."""
    label_names: tuple[str, ...]
    """Class names indexed by label id, as on the hub; empty for regression (STS-B)."""
    tsv_label_values: tuple[str, ...]
    """Raw label strings in the tsv, indexed by label id; empty for regression."""
    main_metric: str
    """Key of :func:`compute_glue_metrics` used for model selection (MNLI: accuracy on dev_matched)."""
    splits: tuple[str, ...] = ("train", "dev", "test")
    """Canonical split names; also the tsv file stems (``<split>.tsv``)."""
    headerless_splits: frozenset[str] = frozenset()
    """Splits whose tsv has no header line (CoLA train/dev)."""
    headerless_columns: tuple[str, ...] = ()
    """Column names to assume for ``headerless_splits``."""
    kind: str = "glue"
    """Task kind: selects the runner in :data:`deft.tasks.runners.RUNNERS`."""
    max_length: int = 128
    """Standard maximum input length in tokens (the default ``max_length`` of a run)."""

    @property
    def is_regression(self) -> bool:
        """True for STS-B, whose label is a similarity score in [0, 5]."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Output size of the classification head (1 for regression)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True if examples are sentence pairs (a ``text_b`` column is produced)."""
        return len(self.text_columns) == 2

    @property
    def dev_split(self) -> str:
        """Split used for evaluation and model selection (MNLI: ``dev_matched``)."""
        return self.resolve_split("dev")

    @property
    def id2label(self) -> dict[int, str]:
        """Label id to name, for model configs (empty for regression)."""
        return dict(enumerate(self.label_names))

    def resolve_split(self, split: str) -> str:
        """Map ``split`` (or an alias such as ``"validation"``) to a canonical split name."""
        key = split.strip().lower()
        aliases = _MNLI_SPLIT_ALIASES if self.name == "mnli" else _SPLIT_ALIASES
        key = aliases.get(key, key)
        if key not in self.splits:
            valid = sorted({*self.splits, *aliases})
            raise ValueError(f"Unknown split {split!r} for GLUE task {self.name!r}; valid: {', '.join(valid)}")
        return key

    def hub_split(self, split: str) -> str:
        """Split name on the hub (``dev`` -> ``validation``, ``dev_matched`` -> ``validation_matched``)."""
        return self.resolve_split(split).replace("dev", "validation")


def _pair(
    name: str,
    glue_dir: str,
    text_columns: tuple[str, str],
    label_column: str,
    hub_text_columns: tuple[str, str],
    label_names: tuple[str, ...],
    tsv_label_values: tuple[str, ...],
    main_metric: str = "accuracy",
    **kwargs: Any,
) -> GlueTask:
    return GlueTask(
        name=name,
        glue_dir=glue_dir,
        text_columns=text_columns,
        label_column=label_column,
        hub_config=name,
        hub_text_columns=hub_text_columns,
        label_names=label_names,
        tsv_label_values=tsv_label_values,
        main_metric=main_metric,
        **kwargs,
    )


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: Mapping[str, GlueTask] = MappingProxyType(
    {
        "cola": GlueTask(
            name="cola",
            glue_dir="CoLA",
            text_columns=("sentence",),
            label_column="label",
            hub_config="cola",
            hub_text_columns=("sentence",),
            label_names=("unacceptable", "acceptable"),
            tsv_label_values=_BINARY,
            main_metric="matthews_correlation",
            # Official quirk: CoLA train/dev are the raw CoLA files without header; test has one.
            headerless_splits=frozenset({"train", "dev"}),
            headerless_columns=("source", "label", "original_label_mark", "sentence"),
        ),
        "sst2": GlueTask(
            name="sst2",
            glue_dir="SST-2",
            text_columns=("sentence",),
            label_column="label",
            hub_config="sst2",
            hub_text_columns=("sentence",),
            label_names=("negative", "positive"),
            tsv_label_values=_BINARY,
            main_metric="accuracy",
        ),
        "mrpc": _pair(
            "mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"), _BINARY,
        ),
        "qqp": _pair(
            "qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"),
            ("not_duplicate", "duplicate"), _BINARY,
        ),
        "stsb": _pair(
            "stsb", "STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"),
            (), (), main_metric="pearson",
        ),
        "mnli": _pair(
            "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"),
            splits=("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"),
        ),
        "qnli": _pair(
            "qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"), _NLI2, _NLI2,
        ),
        "rte": _pair(
            "rte", "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), _NLI2, _NLI2,
        ),
    }
)
"""All GLUE tasks by canonical name (read-only)."""


def normalize_task_name(name: str) -> str:
    """Lowercase and drop ``-``, ``_`` and spaces, so ``"SST-2"``, ``"sst_2"`` and ``"sst2"`` agree."""
    return "".join(ch for ch in name.strip().lower() if ch not in "-_ ")


def glue_task(task: str | GlueTask) -> GlueTask:
    """Return the :class:`GlueTask` for a name or alias (case-insensitive), or ``task`` itself."""
    if isinstance(task, GlueTask):
        return task
    spec = GLUE_TASKS.get(normalize_task_name(task))
    if spec is None:
        raise ValueError(f"Unknown GLUE task {task!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    return spec


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """Return the local GLUE directory to read from, or ``None`` to use the hub.

    ``data_dir`` wins, else the ``DEFT_DATA_DIR`` environment variable, else ``None``.
    The directory may be a data root containing ``glue/`` (that subdirectory is returned)
    or the GLUE directory itself (containing ``SST-2/`` etc.).

    Raises:
        FileNotFoundError: the configured directory does not exist.
        NotADirectoryError: it exists but is not a directory.
    """
    path = data_root(data_dir)
    if path is None:
        return None
    return path / "glue" if (path / "glue").is_dir() else path


def data_root(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The configured data directory (argument, else ``$DEFT_DATA_DIR``), checked; None → the hub.

    Shared by every task kind: each then looks for its own sub-directory (``glue/``, ``squad/``).
    """
    source = "data_dir"
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        source = f"${DATA_DIR_ENV}"
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Data directory {str(path)!r} (from {source}) does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"Data directory {str(path)!r} (from {source}) is not a directory")
    return path


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{where}: cannot parse score {raw!r} as a float") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: score {raw!r} is not finite")
        return value
    try:
        return task.tsv_label_values.index(raw)
    except ValueError:
        raise ValueError(
            f"{where}: unknown label {raw!r} for {task.name} (expected one of {', '.join(task.tsv_label_values)})"
        ) from None


def read_glue_tsv(task: str | GlueTask, split: str, path: str | os.PathLike[str]) -> dict[str, list[Any]]:
    """Parse one official GLUE tsv file into columns ``text_a``[, ``text_b``], ``label``, ``idx``.

    Quoting is disabled (sentences contain unbalanced ``"``), lines are split on ``\\n`` only,
    a leading UTF-8 BOM is ignored (MRPC) and trailing whitespace of sentences is stripped
    (SST-2 sentences end with a space). Splits without a label column get label ``-1``.

    Raises:
        ValueError: a row has the wrong number of columns, an unknown label or an unparsable
            score; the message names the file and the 1-based line number.
    """
    spec = glue_task(task)
    split = spec.resolve_split(split)
    path = Path(path)
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list[int | float] = []
    header: list[str] | None = list(spec.headerless_columns) if split in spec.headerless_splits else None
    text_pos: list[int] = []
    label_pos: int | None = None

    def locate(columns: list[str], where: str) -> None:
        nonlocal text_pos, label_pos
        missing = [c for c in spec.text_columns if c not in columns]
        if missing:
            raise ValueError(f"{where}: header {columns} lacks column(s) {missing}")
        text_pos = [columns.index(c) for c in spec.text_columns]
        label_pos = columns.index(spec.label_column) if spec.label_column in columns else None
        if label_pos is None and not split.startswith("test"):
            raise ValueError(f"{where}: header {columns} lacks label column {spec.label_column!r}")

    if header is not None:
        locate(header, str(path))
    # Binary mode so only b"\n" ends a line: a stray "\r" or other Unicode line break inside a
    # sentence must not split a row (text mode would split on lone "\r").
    with path.open("rb") as fh:
        for lineno, raw_line in enumerate(fh, start=1):
            where = f"{path}, line {lineno}"
            if lineno == 1 and raw_line.startswith(b"\xef\xbb\xbf"):
                raw_line = raw_line[3:]
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not valid UTF-8 ({err})") from None
            line = line[:-1] if line.endswith("\n") else line
            line = line[:-1] if line.endswith("\r") else line  # tolerate CRLF files
            fields = line.split("\t")
            if header is None:
                header = fields
                locate(header, where)
                continue
            if len(fields) != len(header):
                raise ValueError(f"{where}: expected {len(header)} tab-separated columns, got {len(fields)}")
            text_a.append(fields[text_pos[0]].rstrip())
            if spec.is_pair:
                text_b.append(fields[text_pos[1]].rstrip())
            labels.append(UNLABELED if label_pos is None else _parse_label(spec, fields[label_pos], where))
    if header is None:
        raise ValueError(f"{path}: empty file (no header line)")

    columns: dict[str, list[Any]] = {"text_a": text_a}
    if spec.is_pair:
        columns["text_b"] = text_b
    columns["label"] = labels
    columns["idx"] = list(range(len(text_a)))
    return columns


def _features(spec: GlueTask) -> datasets.Features:
    features = {"text_a": datasets.Value("string")}
    if spec.is_pair:
        features["text_b"] = datasets.Value("string")
    # float32 for STS-B matches the hub's dtype, so both sources give identical values.
    features["label"] = datasets.Value("float32" if spec.is_regression else "int64")
    features["idx"] = datasets.Value("int64")
    return datasets.Features(features)


def _from_hub(spec: GlueTask, split: str) -> datasets.Dataset:
    """Download a split from ``nyu-mll/glue`` and map it to the common schema."""
    ds = load_hub_dataset(HUB_DATASET, spec.hub_config, split=spec.hub_split(split),
                          local_layout="a directory in GLUE's tsv layout (<dir>/glue/SST-2/train.tsv, ...)")
    targets = ("text_a", "text_b")[: len(spec.hub_text_columns)]
    ds = ds.select_columns([*spec.hub_text_columns, "label", "idx"])
    ds = ds.rename_columns(dict(zip(spec.hub_text_columns, targets)))
    return ds.cast(_features(spec))


def _subsample(ds: datasets.Dataset, max_samples: int | None, seed: int) -> datasets.Dataset:
    if max_samples is None:
        return ds
    if max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    if max_samples >= len(ds):
        return ds
    # Sorting the first n of one seeded permutation keeps file order and makes subsets nested
    # (n=100 is contained in n=1000 for the same seed).
    keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:max_samples])
    return ds.select(keep.tolist())


def load_glue(
    task: str | GlueTask,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    holdout: int = 0,
) -> datasets.Dataset:
    """Load one GLUE split with columns ``text_a``[, ``text_b``], ``label``, ``idx``.

    Source: the official tsv under the directory from :func:`resolve_data_dir` (``data_dir``,
    else ``$DEFT_DATA_DIR``), otherwise the ``nyu-mll/glue`` hub dataset. A configured directory
    lacking the file is an error rather than a silent hub download.

    Args:
        task: task name/alias (``"sst-2"``, ``"STS-B"``, ...) or a :class:`GlueTask`.
        split: ``train``, ``dev`` (alias ``validation``; MNLI: ``dev_matched``/``dev_mismatched``)
            or ``test`` (MNLI: ``test_matched``/``test_mismatched``).
        max_samples: if set and smaller than the split, keep a random subset of that size: the
            first ``max_samples`` of a permutation seeded by ``seed``, in original row order.
            Deterministic for a given seed, and smaller subsets are contained in larger ones.
        seed: seed for ``max_samples`` subsampling (and for the held-out rows).
        holdout: set this many training examples aside (:func:`holdout_indices`): ``train`` is
            then the rest, and the pseudo-split ``heldout`` (:data:`HELDOUT_SPLIT`) is them — data
            to choose an operating point on without touching dev.

    Raises:
        FileNotFoundError: the data directory or the split's tsv file in it does not exist.
        ValueError: unknown task or split, or a malformed tsv row.
    """
    spec = glue_task(task)
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")
    if split == HELDOUT_SPLIT or (holdout and spec.resolve_split(split) == "train"):
        if not holdout:
            raise ValueError(f"split {HELDOUT_SPLIT!r} needs holdout > 0 (examples set aside from train)")
        full = load_glue(spec, "train", data_dir=data_dir)
        aside = holdout_indices(len(full), holdout, seed)
        keep = aside if split == HELDOUT_SPLIT else np.setdiff1d(np.arange(len(full)), aside)
        return _subsample(full.select(keep.tolist()), max_samples, seed)
    split = spec.resolve_split(split)
    glue_dir = resolve_data_dir(data_dir)
    if glue_dir is None:
        ds = _from_hub(spec, split)
    else:
        path = glue_dir / spec.glue_dir / f"{split}.tsv"
        if not path.is_file():
            raise FileNotFoundError(
                f"GLUE {spec.name} split {split!r} not found: {path} does not exist. Provide the file, or pass "
                f"no data_dir and unset ${DATA_DIR_ENV} to load {HUB_DATASET} ({spec.hub_config}) from the hub."
            )
        ds = datasets.Dataset.from_dict(read_glue_tsv(spec, split, path), features=_features(spec))
    return _subsample(ds, max_samples, seed)


def compute_glue_metrics(
    task: str | GlueTask, predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """GLUE metrics on a 0-1 scale (correlations in [-1, 1]).

    cola: ``matthews_correlation``; sst2/qnli/rte/mnli: ``accuracy``; mrpc/qqp: ``accuracy``, ``f1``
    (positive class 1); stsb: ``pearson``, ``spearman``. ``predictions`` are class ids, or scores for
    STS-B (see :func:`predictions_from_logits`).
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = glue_task(task)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if preds.shape != gold.shape or preds.ndim != 1:
        raise ValueError(f"predictions {preds.shape} and labels {gold.shape} must be 1-D of equal length")
    if preds.size == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if spec.is_regression:
        preds, gold = preds.astype(np.float64), gold.astype(np.float64)
        return {"pearson": float(pearsonr(preds, gold)[0]), "spearman": float(spearmanr(preds, gold)[0])}
    if np.any(gold == UNLABELED):
        raise ValueError("labels contain -1 (unlabeled test rows); GLUE test labels are not public")
    preds, gold = preds.astype(np.int64), gold.astype(np.int64)
    if spec.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(gold, preds))}
    metrics = {"accuracy": float(accuracy_score(gold, preds))}
    if spec.name in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0.0))
    return metrics


def predictions_from_logits(task: str | GlueTask, logits: Any) -> np.ndarray:
    """Turn model outputs of shape ``(n, num_labels)`` into predictions for :func:`compute_glue_metrics`.

    Classification: argmax class ids (int64). Regression (STS-B): the scores, ``(n, 1)`` squeezed to ``(n,)``.
    Accepts numpy arrays, nested sequences or torch tensors (any device/dtype).
    """
    spec = glue_task(task)
    if hasattr(logits, "detach"):  # torch tensor; bf16 has no numpy dtype, hence .float()
        logits = logits.detach().float().cpu().numpy()
    arr = np.asarray(logits)
    if spec.is_regression:
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"{spec.name}: expected regression outputs of shape (n,) or (n, 1), got {arr.shape}")
        return arr.astype(np.float64)
    if arr.ndim != 2 or arr.shape[1] != spec.num_labels:
        raise ValueError(f"{spec.name}: expected logits of shape (n, {spec.num_labels}), got {arr.shape}")
    return arr.argmax(axis=-1).astype(np.int64)
