"""SQuAD v1.1 training and evaluation in three forms, as :class:`~deft.tasks.runners.base.TaskRunner`
subclasses (this module: the common part and the extractive form; the generating forms are in
:mod:`deft.tasks.runners.squad_generate`, registered for the task kind ``"squad"``). The runner picks
its form from the task (``squad-extractive`` / ``squad-seq2seq`` / ``squad-generative``) or, for
task ``squad``, from the model (:func:`infer_form`):

* **extractive** (:class:`ExtractiveRunner`, encoder + span head, e.g. ``minilm``): the standard
  Hugging Face recipe — question and context as a pair, the context cut into windows of
  ``max_length`` tokens overlapping by the document stride, windows without the answer labelled
  with the [CLS] position; answers are the best n-best start/end span over an example's windows.
* **seq2seq** (:class:`Seq2SeqRunner`, T5 / Flan-T5): ``"question: … context: …"`` → answer
  text; answers come from ``generate()``.
* **generative** (:class:`GenerativeRunner`, decoder-only LM): ``"Question: …\\nContext: …\\nAnswer:"``
  → `` answer<eos>``, loss on the answer tokens only; answers from ``generate()`` with left padding.

**Long contexts in the generating forms.** Inputs are built from a fixed head (the question,
capped at a quarter of ``max_length``), a window of context tokens and a fixed tail, windows
overlapping by the document stride (``max_length // 3``: 128 at the standard 384). Training
uses only the windows that contain the (first) gold answer — a window without it has no
grounded target, and training on it would teach the model to invent answers; a question none
of whose windows contains the whole answer is dropped. At evaluation every window of a
question is answered, and the answer with the highest mean token log-probability wins (greedy
decoding). Every window's forward pass is counted in the density.

**Density.** The final evaluation measures density itself (the Trainer's evaluation loop
cannot see ``generate()``): an :class:`~deft.core.capture.ActivationCapture` with a
:class:`~deft.core.metrics.DensityMeter`, in the ``DensityReport.to_dict()`` shape, put in
``results.json`` by :func:`deft.training.train`. Each ``generate()`` call is one
``sequence_group`` (union density accumulates over its decoding steps). Decoder density
counts each decoding step of a live sequence once: once a sequence has emitted EOS, the steps
``generate()`` still runs for it while others finish are excluded (:class:`GenerationCapture`).
Encoder–decoder models report ``density.encoder`` and ``density.decoder`` apart; decoder-only
models count the prompt (prefill) and the generated tokens in ``density.decoder``.

Metrics are ``f1`` and ``exact_match`` on a 0–1 scale (:func:`deft.tasks.squad.squad_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.capture import ActivationCapture
from ...core.metrics import DensityMeter
from ...core.sites import find_sites
from ...core.thresholds import applied_thresholds
from ..squad import default_splits, load_squad, split_note, squad_metrics
from .base import TaskEvaluation, TaskRunner

MAX_ANSWER_TOKENS = 32
"""Longest generated answer (and longest training target), EOS included."""
N_BEST = 20
"""Start and end candidates per window considered by the extractive postprocessing."""
MAX_ANSWER_SPAN = 30
"""Longest extractive answer span in tokens."""


def doc_stride(max_length: int) -> int:
    """Overlap of consecutive context windows: a third of ``max_length`` (128 at 384, as usual)."""
    return max(1, max_length // 3)


def infer_form(model_config) -> str:
    """SQuAD form for a model: seq2seq for encoder–decoder, extractive for encoders (a masked-LM
    family), generative for decoder-only LMs."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    )

    model_type = getattr(model_config, "model_type", "")
    if getattr(model_config, "is_encoder_decoder", False):
        return "seq2seq"
    # BERT-like encoders also have a causal-LM class in transformers, so the masked-LM check comes first.
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "extractive"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "generative"
    if model_type in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES:
        return "extractive"
    raise ValueError(f"cannot tell the SQuAD form for model type {model_type!r}; use task squad-extractive, "
                     "squad-seq2seq or squad-generative")


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"SQuAD needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is not one")


def _first_answer(answers: dict, shift: int = 0) -> tuple[int, int, str]:
    """(start char, end char, text) of the first gold answer, start shifted by ``shift``."""
    text = answers["text"][0]
    start = answers["answer_start"][0] + shift
    return start, start + len(text), text


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r)))
                         for r in rows], dtype=torch.long)


@dataclass
class PaddingCollator:
    """Right-pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0) and ``labels`` (-100).

    No ``decoder_input_ids`` are built for seq2seq models: the model shifts the labels itself,
    and the capture then takes the decoder's real tokens from ``labels != -100``.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": _pad([f["input_ids"] for f in features], self.pad_token_id),
                 "attention_mask": _pad([f["attention_mask"] for f in features], 0)}
        if "labels" in features[0]:
            batch["labels"] = _pad([f["labels"] for f in features], -100)
        return batch


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_strided(mine: list, world: int, total: int) -> list:
    """Reassemble a list sharded as ``items[rank::world]`` from every rank (a collective)."""
    import torch.distributed as dist

    shards: list[list] = [[] for _ in range(world)]
    dist.all_gather_object(shards, mine)
    full = [None] * total
    for rank, shard in enumerate(shards):
        full[rank::world] = shard
    return full


# -- the runners ----------------------------------------------------------------------------------
class SquadRunner(TaskRunner):
    """Common part of the three SQuAD forms: splits, the evaluation loop's bookkeeping, results.

    :func:`deft.tasks.runners.squad_generate.squad_runner` picks the form's subclass.
    """

    form: ClassVar[str] = ""

    def __init__(self, task, config, model_config=None):
        super().__init__(task, config, model_config)
        self.train_split, self.eval_split = default_splits(config.data_dir)
        self.final_density = None
        self._eval_examples = None
        self._tokenizer = None

    # -- data ------------------------------------------------------------------------------
    def datasets(self, tokenizer):
        import datasets

        _require_fast(tokenizer)
        c = self.config
        train = load_squad(self.train_split, c.data_dir, max_samples=c.max_train_samples, seed=c.seed)
        self._eval_examples = load_squad(self.eval_split, c.data_dir, max_samples=c.max_eval_samples, seed=c.seed)
        self._tokenizer = tokenizer
        return (datasets.Dataset.from_dict(self.features(train, tokenizer)),
                datasets.Dataset.from_dict(self.features(self._eval_examples, tokenizer)))

    def features(self, examples, tokenizer) -> dict[str, list]:
        """Tokenized training features (model inputs + labels) of ``examples``."""
        raise NotImplementedError

    def calibration_batches(self, tokenizer, model, *, samples, batch_size, data_dir=None):
        # Training windows as the model trains on them (for the generative form: prompt and
        # answer, so both the prompt's prefill and the answer's tokens are measured).
        _require_fast(tokenizer)
        examples = load_squad(self.train_split if data_dir is None else default_splits(data_dir)[0],
                              data_dir or self.config.data_dir, max_samples=samples, seed=self.config.seed)
        features = self.features(examples, tokenizer)
        rows = [{k: features[k][i] for k in features} for i in range(len(next(iter(features.values()))))]
        collate = self.collator(tokenizer, model)
        for lo in range(0, len(rows), batch_size):
            batch = dict(collate(rows[lo:lo + batch_size]))
            for key in ("labels", "start_positions", "end_positions"):
                batch.pop(key, None)
            yield batch

    # -- evaluation ------------------------------------------------------------------------
    def predict(self, model: nn.Module, tokenizer, examples, *, batch_size: int, threshold: float,
                progress: bool = True) -> tuple[list[str], DensityMeter]:
        """One answer per question of ``examples``, and the density meter of the whole pass."""
        raise NotImplementedError

    def _run_predict(self, model, tokenizer, examples, batch_size, threshold, progress) -> TaskEvaluation:
        # Under torchrun every rank answers every world-th question; answers and density counts
        # are then gathered, so each question is answered (and measured) once.
        rank, world = _rank_and_world()
        mine = examples.select(range(rank, len(examples), world)) if world > 1 else examples
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                answers, meter = self.predict(model, tokenizer, mine, batch_size=batch_size,
                                              threshold=threshold, progress=progress and rank == 0)
        finally:
            model.train(was_training)
        meter.sync_processes()
        if world > 1:
            answers = _gather_strided(answers, world, len(examples))
        metrics = squad_metrics(answers, [a["text"] for a in examples["answers"]])
        report = meter.result()
        report.thresholds = applied_thresholds(model)
        return TaskEvaluation(metrics=metrics, density=report.to_dict(), split="", samples=len(examples),
                              extra={"form": self.form})

    def final_metrics(self, trainer, eval_set) -> dict:
        tokenizer = self._tokenizer or trainer.processing_class
        out = self._run_predict(trainer.model, tokenizer, self._eval_examples, self.config.eval_batch_size,
                                self.config.threshold, progress=not trainer.args.disable_tqdm)
        self.final_density = out.density
        return out.metrics

    def evaluate_model(self, model, tokenizer, *, split: str | None = None, data_dir: str | None = None,
                       max_samples: int | None = None, batch_size: int | None = None,
                       threshold: float | None = None, progress: bool = True, **_) -> TaskEvaluation:
        """F1 / EM and density of a trained model on ``split`` (default: the run's evaluation split)."""
        _require_fast(tokenizer)
        c = self.config
        data_dir = data_dir or c.data_dir
        split = self.task.resolve_split(split) if split else default_splits(data_dir)[1]
        max_samples = c.max_eval_samples if max_samples is None else max_samples  # 0 = all
        examples = load_squad(split, data_dir, max_samples=max_samples or None, seed=c.seed)
        out = self._run_predict(model, tokenizer, examples, batch_size or c.eval_batch_size,
                                c.threshold if threshold is None else threshold, progress)
        out.split = split
        out.extra["split_note"] = split_note(split)
        return out

    def result_fields(self) -> dict:
        return {"form": self.form, "train_split": self.train_split, "eval_split": self.eval_split,
                "split_note": split_note(self.eval_split),
                "eval_questions": len(self._eval_examples) if self._eval_examples is not None else None}


class ExtractiveRunner(SquadRunner):
    """Encoder + span head (``AutoModelForQuestionAnswering``)."""

    form = "extractive"
    task_type = "QUESTION_ANS"

    def auto_class(self):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def _encode(self, examples, tokenizer):
        # Leading spaces of some SQuAD questions would only waste window room.
        return tokenizer([q.lstrip() for q in examples["question"]], list(examples["context"]),
                         truncation="only_second", max_length=self.config.max_length,
                         stride=doc_stride(self.config.max_length), return_overflowing_tokens=True,
                         return_offsets_mapping=True)

    def features(self, examples, tokenizer):
        enc = self._encode(examples, tokenizer)
        samples = enc.pop("overflow_to_sample_mapping")
        offsets = enc.pop("offset_mapping")
        answers = examples["answers"]
        starts, ends = [], []
        for i, offs in enumerate(offsets):
            seq = enc.sequence_ids(i)
            ids = enc["input_ids"][i]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            a0, a1, _ = _first_answer(answers[samples[i]])
            context = [k for k, s in enumerate(seq) if s == 1]
            if not context or offs[context[0]][0] > a0 or offs[context[-1]][1] < a1:
                starts.append(cls), ends.append(cls)  # the answer is not (entirely) in this window
                continue
            first, last = context[0], context[-1]
            s = first
            while s <= last and offs[s][0] <= a0:
                s += 1
            e = last
            while e >= first and offs[e][1] >= a1:
                e -= 1
            starts.append(s - 1), ends.append(e + 1)
        return {**{k: list(v) for k, v in enc.items()}, "start_positions": starts, "end_positions": ends}

    def predict(self, model, tokenizer, examples, *, batch_size, threshold, progress=True):
        from transformers import DataCollatorWithPadding

        enc = self._encode(examples, tokenizer)
        samples = enc.pop("overflow_to_sample_mapping")
        offsets = [[o if s == 1 else None for o, s in zip(offs, enc.sequence_ids(i))]
                   for i, offs in enumerate(enc.pop("offset_mapping"))]
        rows = [{k: enc[k][i] for k in enc.keys()} for i in range(len(samples))]
        collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        sites = find_sites(model, self.config.site_point)
        meter = DensityMeter(sites.sites, threshold=threshold)
        device = next(model.parameters()).device
        contexts = examples["context"]
        best: dict[int, tuple[float, str]] = {}
        with ActivationCapture(model, sites, meter=meter):
            for lo in tqdm(range(0, len(rows), batch_size), desc="squad extractive", disable=not progress, leave=False):
                batch = collate(rows[lo:lo + batch_size])
                out = model(**{k: v.to(device) for k, v in batch.items()})
                start_logits = out.start_logits.float().cpu().numpy()
                end_logits = out.end_logits.float().cpu().numpy()
                for j in range(start_logits.shape[0]):
                    f = lo + j
                    ex = samples[f]
                    span = best_span(start_logits[j], end_logits[j], offsets[f])
                    if span is not None and (ex not in best or span[0] > best[ex][0]):
                        best[ex] = (span[0], contexts[ex][span[1]:span[2]])
        return [best.get(i, (0.0, ""))[1] for i in range(len(examples))], meter


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offsets: list, n_best: int = N_BEST,
              max_answer_span: int = MAX_ANSWER_SPAN) -> tuple[float, int, int] | None:
    """(score, start char, end char) of the best valid context span of one window, or None.

    Candidates are the ``n_best`` highest start and end logits; a span is valid when both ends
    are context tokens (``offsets`` entry not None), end ≥ start and it spans ≤ ``max_answer_span``
    tokens. Its score is start logit + end logit.
    """
    n = len(offsets)
    start_logits, end_logits = start_logits[:n], end_logits[:n]
    top_starts = np.argsort(start_logits)[::-1][:n_best]
    top_ends = np.argsort(end_logits)[::-1][:n_best]
    best = None
    for s in top_starts:
        if offsets[s] is None:
            continue
        for e in top_ends:
            if offsets[e] is None or e < s or e - s + 1 > max_answer_span:
                continue
            score = float(start_logits[s] + end_logits[e])
            if best is None or score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best
