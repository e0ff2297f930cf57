"""SQuAD v1.1: task specs, loading (local official json or the Hugging Face hub), the offline
by-article split, and the official answer normalisation, F1 and exact match.

Every split is returned as a :class:`datasets.Dataset` in the hub's schema:

- ``id`` (str), ``title`` (str, the Wikipedia article), ``context`` (str), ``question`` (str);
- ``answers``: ``{"text": [str, ...], "answer_start": [int, ...]}`` (character offsets into
  ``context``; dev questions carry up to ~5 gold answers, often repeated).

**Offline split.** Only the dev file (``dev-v1.1.json``, 48 articles, 10,570 questions) can be
had offline here. For offline runs the dev set is cut *by article* into ``offline_train``
(~80% of the articles) and ``offline_eval`` (the rest): the article titles, in file order, are
shuffled by a fixed seed (:data:`OFFLINE_SPLIT_SEED`, independent of the run seed, so every run
and seed evaluates on the same held-out articles) and the first ``round(0.2 · 48) = 10`` go to
``offline_eval``. No article — hence no context paragraph — is in both parts. Scores on
``offline_eval`` are **not** official SQuAD dev scores: they come from a model trained on other
dev articles, with a much smaller training set; results carry a ``split_note`` saying so.

Metrics follow the official v1.1 evaluation script: answers are lower-cased, punctuation and
the articles *a/an/the* removed, whitespace collapsed; F1 is the token-overlap F1 of the
normalised strings; both are the maximum over the gold answers, averaged over questions. They
are returned on a **0–1 scale** (as GLUE metrics in deft), not the script's 0–100.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import datasets
import numpy as np

from deft.tasks.glue import DATA_DIR_ENV, data_root
from deft.tasks.hub import load_hub_dataset

__all__ = [
    "FORMS",
    "HUB_DATASET",
    "OFFLINE_EVAL_SHARE",
    "OFFLINE_SPLIT_SEED",
    "SQUAD_TASKS",
    "SquadTask",
    "article_split",
    "default_splits",
    "exact_match_score",
    "f1_score",
    "load_squad",
    "normalize_answer",
    "read_squad_json",
    "split_note",
    "squad_data_dir",
    "squad_metrics",
]

HUB_DATASET = "rajpurkar/squad"
"""Hugging Face hub dataset used when no local data directory is configured."""

LOCAL_SUBDIR = Path("squad") / "v1.1"
"""Where the official files live under a data root (``$DEFT_DATA_DIR/squad/v1.1/``)."""

LOCAL_FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}
"""Official file names of the two public splits."""

OFFLINE_SPLIT_SEED = 0
"""Seed of the article shuffle behind ``offline_train`` / ``offline_eval`` (fixed, not the run seed)."""

OFFLINE_EVAL_SHARE = 0.2
"""Share of the dev articles held out as ``offline_eval``."""

FORMS = ("extractive", "seq2seq", "generative")
"""How a model answers: span head on an encoder, encoder–decoder generation, decoder-only generation."""

SPLITS = ("train", "dev", "offline_train", "offline_eval")
_SPLIT_ALIASES = {"validation": "dev", "val": "dev"}

_SPLIT_NOTES = {
    "train": "official SQuAD v1.1 train split",
    "dev": "official SQuAD v1.1 dev split",
    "offline_train": ("offline split: ~80% of the SQuAD v1.1 dev articles (by article, seed "
                      f"{OFFLINE_SPLIT_SEED}); not the official training set"),
    "offline_eval": ("offline split: held-out ~20% of the SQuAD v1.1 dev articles (by article, seed "
                     f"{OFFLINE_SPLIT_SEED}), disjoint from offline_train; NOT official SQuAD dev scores"),
}


@dataclass(frozen=True)
class SquadTask:
    """A SQuAD v1.1 task spec (registered in :data:`deft.tasks.TASKS`).

    ``form`` fixes how the model answers; ``None`` (task ``squad``) lets the runner pick it from
    the model: extractive for encoder-only models, seq2seq for encoder–decoder models,
    generative for decoder-only LMs. Registry keys are normalised names (``squad-seq2seq`` →
    ``squadseq2seq``), as for GLUE.
    """

    name: str
    """Canonical lowercase task name (the registry key)."""
    form: str | None = None
    """One of :data:`FORMS`, or ``None`` to choose by model type."""
    main_metric: str = "f1"
    """Metric used for model selection and ``deft compare`` (0–1 scale)."""
    kind: str = "squad"
    """Task kind: selects the runner in :data:`deft.tasks.runners.RUNNERS`."""
    max_length: int = 384
    """Standard maximum input length in tokens (the CLI's default ``--max-length`` for SQuAD)."""
    splits: tuple[str, ...] = SPLITS

    def __post_init__(self):
        if self.form is not None and self.form not in FORMS:
            raise ValueError(f"unknown SQuAD form {self.form!r}; choose one of {FORMS} or None")

    def resolve_split(self, split: str) -> str:
        """Canonical split name of ``split`` (``validation`` → ``dev``)."""
        return _resolve_split(split)

    @property
    def dev_split(self) -> str:
        """Default evaluation split when data comes from the hub; see :func:`default_splits`."""
        return "dev"


SQUAD_TASKS: Mapping[str, SquadTask] = MappingProxyType({
    "squad": SquadTask("squad"),
    "squadextractive": SquadTask("squadextractive", form="extractive"),
    "squadseq2seq": SquadTask("squadseq2seq", form="seq2seq"),
    "squadgenerative": SquadTask("squadgenerative", form="generative"),
})
"""SQuAD task specs by canonical name (read-only)."""


def _resolve_split(split: str) -> str:
    key = split.strip().lower().replace("-", "_")
    key = _SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        raise ValueError(f"Unknown SQuAD split {split!r}; valid: {', '.join([*SPLITS, *_SPLIT_ALIASES])}")
    return key


def split_note(split: str) -> str:
    """What a split is, for labelling results (offline splits say they are not official scores)."""
    return _SPLIT_NOTES[_resolve_split(split)]


# -- data ---------------------------------------------------------------------------------------
def squad_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The local directory holding the SQuAD v1.1 json files, or ``None`` to use the hub.

    ``data_dir`` wins, else ``$DEFT_DATA_DIR`` (the same variable as GLUE's). It may be a data
    root containing ``squad/v1.1/``, a directory containing ``v1.1/``, or the directory of the
    json files itself.

    Raises:
        FileNotFoundError: the configured directory does not exist or holds no SQuAD v1.1 file.
    """
    path = data_root(data_dir)
    if path is None:
        return None
    for candidate in (path / LOCAL_SUBDIR, path / "v1.1", path):
        if any((candidate / name).is_file() for name in LOCAL_FILES.values()):
            return candidate
    raise FileNotFoundError(
        f"no SQuAD v1.1 files under {str(path)!r}: expected {LOCAL_SUBDIR}/dev-v1.1.json "
        f"there; or pass no data_dir and unset ${DATA_DIR_ENV} to load {HUB_DATASET} from the hub")


def read_squad_json(path: str | os.PathLike[str]) -> dict[str, list]:
    """Columns (hub schema) of an official SQuAD v1.1 json file, questions in file order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    columns: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                columns["id"].append(qa["id"])
                columns["title"].append(article["title"])
                columns["context"].append(paragraph["context"])
                columns["question"].append(qa["question"])
                columns["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                           "answer_start": [int(a["answer_start"]) for a in qa["answers"]]})
    return columns


def article_split(titles: Iterable[str], eval_share: float = OFFLINE_EVAL_SHARE,
                  seed: int = OFFLINE_SPLIT_SEED) -> tuple[list[str], list[str]]:
    """Split article titles into (training titles, held-out titles), deterministically.

    Unique titles are taken in order of first appearance and shuffled with ``seed``; the first
    ``round(eval_share · n)`` (at least 1 when there are two or more articles) are held out.
    """
    if not 0 < eval_share < 1:
        raise ValueError(f"eval_share must be in (0, 1), got {eval_share}")
    unique = list(dict.fromkeys(titles))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_eval = min(max(1, round(eval_share * len(unique))), len(unique) - 1) if len(unique) > 1 else 0
    held = {unique[i] for i in order[:n_eval]}
    return [t for t in unique if t not in held], [t for t in unique if t in held]


def _from_hub(split: str) -> datasets.Dataset:
    hub_split = "validation" if split in ("dev", "offline_train", "offline_eval") else "train"
    ds = load_hub_dataset(HUB_DATASET, split=hub_split,
                          local_layout="a directory holding squad/v1.1/dev-v1.1.json (and train-v1.1.json)")
    return ds.select_columns(["id", "title", "context", "question", "answers"])


def _from_local(directory: Path, split: str) -> datasets.Dataset:
    source = "dev" if split in ("dev", "offline_train", "offline_eval") else "train"
    path = directory / LOCAL_FILES[source]
    if not path.is_file():
        hint = " (offline, use the by-article splits offline_train / offline_eval of the dev file)" \
            if source == "train" else ""
        raise FileNotFoundError(f"SQuAD v1.1 split {split!r} needs {path}, which does not exist{hint}")
    return datasets.Dataset.from_dict(read_squad_json(path))


def _subsample(ds: datasets.Dataset, max_samples: int | None, seed: int) -> datasets.Dataset:
    if max_samples is None or max_samples >= len(ds):
        return ds
    if max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    # As for GLUE: the first n of one seeded permutation, in file order (subsets are nested).
    keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:max_samples])
    return ds.select(keep.tolist())


def load_squad(split: str, data_dir: str | os.PathLike[str] | None = None, max_samples: int | None = None,
               seed: int = 0) -> datasets.Dataset:
    """Load one SQuAD v1.1 split (hub schema, see the module doc).

    Splits: ``train``, ``dev`` (alias ``validation``), and the offline by-article parts of dev,
    ``offline_train`` / ``offline_eval`` (available from the hub's validation split too, so
    offline and hub runs can be compared). Source: the json files under
    :func:`squad_data_dir` (``data_dir``, else ``$DEFT_DATA_DIR``), otherwise ``rajpurkar/squad``.
    ``max_samples`` keeps a seeded random subset of questions, as :func:`deft.tasks.load_glue`.
    """
    split = _resolve_split(split)
    directory = squad_data_dir(data_dir)
    ds = _from_hub(split) if directory is None else _from_local(directory, split)
    if split in ("offline_train", "offline_eval"):
        train_titles, eval_titles = article_split(ds["title"])
        keep = set(train_titles if split == "offline_train" else eval_titles)
        ds = ds.select([i for i, title in enumerate(ds["title"]) if title in keep])
    return _subsample(ds, max_samples, seed)


def default_splits(data_dir: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """(training split, evaluation split) of a run.

    Hub: ``train`` / ``dev``. Local directory with ``train-v1.1.json``: the same. Local
    directory with the dev file only (the case here): ``offline_train`` / ``offline_eval``.
    """
    directory = squad_data_dir(data_dir)
    if directory is None or (directory / LOCAL_FILES["train"]).is_file():
        return "train", "dev"
    return "offline_train", "offline_eval"


# -- metrics (official v1.1 definitions) -------------------------------------------------------
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (0 when nothing overlaps, as v1.1 scores empties)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"f1", "exact_match"}`` on a 0–1 scale: max over each question's gold answers, mean over questions."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        raise ValueError("cannot compute SQuAD metrics on zero questions")
    f1 = em = 0.0
    for prediction, answers in zip(predictions, golds):
        if not answers:
            raise ValueError("a question without gold answers (SQuAD v1.1 questions all have one)")
        f1 += max(f1_score(prediction, gold) for gold in answers)
        em += max(exact_match_score(prediction, gold) for gold in answers)
    return {"f1": f1 / len(predictions), "exact_match": em / len(predictions)}
