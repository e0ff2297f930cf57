"""SQuAD v1.1 training and evaluation in three forms, as :class:`deft.train.TaskRunner` subclasses.

Importing this module registers :class:`SquadRunner` under the task kind ``"squad"`` in
:data:`deft.train.RUNNERS` (``deft.train.task_runner`` imports it on first use). The runner picks
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
cannot see ``generate()``): an :class:`~deft.capture.ActivationCapture` with a
:class:`~deft.metrics.DensityMeter`, in the ``DensityReport.to_dict()`` shape, put in
``results.json`` by :func:`deft.train.train`. Each ``generate()`` call is one
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

from .capture import ActivationCapture
from .metrics import DensityMeter
from .sites import find_sites
from .tasks.squad import default_splits, load_squad, split_note, squad_metrics
from .train import RUNNERS, TaskEvaluation, TaskRunner

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


def _model_config(name: str):
    from transformers import AutoConfig

    from .models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(name))


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


class GenerationCapture(ActivationCapture):
    """An :class:`ActivationCapture` that stops counting a sequence once it has ended.

    ``generate()`` keeps running finished sequences (fed EOS, then padding) until the whole batch
    is done; those steps are not answer tokens. Each decoding call's newest input token is read
    from the call itself; a row whose input is EOS (after the first call of a generation) is
    marked finished and masked out of the decoder stack from then on. Call
    :meth:`begin_generation` before each ``generate()``.
    """

    def __init__(self, model: nn.Module, sites=None, *, meter: DensityMeter | None = None, eos_token_id: int):
        super().__init__(model, sites, meter=meter)
        self.eos_token_id = eos_token_id
        self._finished: torch.Tensor | None = None

    def begin_generation(self) -> None:
        self._finished = None

    def _on_model_call(self, signature, module, args, kwargs):
        super()._on_model_call(signature, module, args, kwargs)
        bound = self._bind(signature, args, kwargs)
        tokens = bound.get("decoder_input_ids" if self._encdec else "input_ids")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            return
        if self._finished is None or self._finished.shape[0] != tokens.shape[0]:
            # First call of a generation: the prompt / decoder start token (which is EOS for
            # some models, e.g. BART) never marks a row finished.
            self._finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            return
        self._finished |= tokens[:, -1] == self.eos_token_id
        if not bool(self._finished.any()):
            return
        alive = ~self._finished
        mask = self._masks["decoder"]
        if mask is None:
            mask = alive[:, None].expand(tokens.shape)
        else:
            mask = mask.to(torch.bool) & alive.to(mask.device)[:, None]
        self._masks["decoder"] = mask


class _StepLogProbs:
    """A logits processor that records, per decoding step, the log-probability of the greedy
    choice (max − logsumexp), without keeping the (batch × vocabulary) scores."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = scores.float()
        self.steps.append(s.max(dim=-1).values - torch.logsumexp(s, dim=-1))
        return scores


@dataclass
class Window:
    """One model input of a generating form: a question with one window of its context."""

    example: int
    """Row of the question in the examples dataset."""
    input_ids: list[int]
    """Prompt token ids (head + context window + tail)."""
    has_answer: bool
    """Whether the window contains the first gold answer entirely."""


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

    Instantiating ``SquadRunner(task, config)`` itself returns the form's subclass.
    """

    form: ClassVar[str] = ""

    def __new__(cls, task, config):
        if cls is SquadRunner:
            cls = FORM_RUNNERS[task.form or infer_form(_model_config(config.model))]
        return super().__new__(cls)

    def __init__(self, task, config):
        super().__init__(task, config)
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
        return TaskEvaluation(metrics=metrics, density=meter.result().to_dict(), split="", samples=len(examples),
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


class GeneratingRunner(SquadRunner):
    """The forms whose answers come from ``generate()``: windows, targets, scored generation."""

    max_answer_tokens: ClassVar[int] = MAX_ANSWER_TOKENS
    pad_left: ClassVar[bool] = False  # side of padding for generate()'s inputs
    reserve_answer: ClassVar[bool] = False  # whether the answer shares max_length with the prompt

    # -- prompt pieces (token ids) ----------------------------------------------------------
    def head(self, tokenizer, question: str) -> list[int]:
        raise NotImplementedError

    def tail(self, tokenizer) -> list[int]:
        raise NotImplementedError

    def target(self, tokenizer, answers: list[str]) -> list[list[int]]:
        """Answer token ids + EOS (capped at :attr:`max_answer_tokens`)."""
        eos = self.eos_token_id(tokenizer)
        ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        return [row[: self.max_answer_tokens - 1] + [eos] for row in ids]

    @staticmethod
    def eos_token_id(tokenizer) -> int:
        """End of an answer: the tokenizer's EOS, else its [SEP] (BERT-style tokenizers in tests)."""
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS (or SEP) token to end answers")
        return eos

    @classmethod
    def pad_token_id(cls, tokenizer) -> int:
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cls.eos_token_id(tokenizer)

    def _question_ids(self, tokenizer, text: str) -> list[int]:
        # Capped so that a freak long question cannot crowd the context out of the window.
        return tokenizer(text, add_special_tokens=False)["input_ids"][: self.config.max_length // 4]

    # -- windows -------------------------------------------------------------------------------
    def windows(self, examples, tokenizer) -> list[Window]:
        """Every context window of every question (see the module doc)."""
        max_length = self.config.max_length
        tail = self.tail(tokenizer)
        reserve = self.max_answer_tokens if self.reserve_answer else 0
        # A leading space makes the context's first word tokenize as it does mid-sentence.
        ctx = tokenizer([" " + c for c in examples["context"]], add_special_tokens=False,
                        return_offsets_mapping=True)
        out = []
        for i, (question, answers) in enumerate(zip(examples["question"], examples["answers"])):
            head = self.head(tokenizer, question)
            budget = max_length - len(head) - len(tail) - reserve
            if budget < 2:
                raise ValueError(f"max_length {max_length} leaves no room for the context "
                                 f"({len(head) + len(tail) + reserve} tokens of prompt and answer)")
            overlap = min(doc_stride(max_length), budget - 1)
            ids, offs = ctx["input_ids"][i], ctx["offset_mapping"][i]
            a0, a1, _ = _first_answer(answers, shift=1)
            start = 0
            while True:
                end = min(start + budget, len(ids))
                inside = end > start and offs[start][0] <= a0 and a1 <= offs[end - 1][1]
                out.append(Window(i, head + ids[start:end] + tail, inside))
                if end >= len(ids):
                    break
                start = end - overlap
        return out

    def features(self, examples, tokenizer):
        windows = [w for w in self.windows(examples, tokenizer) if w.has_answer]
        targets = self.target(tokenizer, [_first_answer(examples["answers"][w.example])[2] for w in windows])
        return self.encode_pairs([w.input_ids for w in windows], targets)

    def encode_pairs(self, prompts: list[list[int]], targets: list[list[int]]) -> dict[str, list]:
        raise NotImplementedError

    def collator(self, tokenizer, model):
        return PaddingCollator(self.pad_token_id(tokenizer))

    # -- generation ----------------------------------------------------------------------------
    def predict(self, model, tokenizer, examples, *, batch_size, threshold, progress=True):
        from transformers import LogitsProcessorList

        windows = self.windows(examples, tokenizer)
        eos, pad = self.eos_token_id(tokenizer), self.pad_token_id(tokenizer)
        sites = find_sites(model, self.config.site_point)
        meter = DensityMeter(sites.sites, threshold=threshold)
        device = next(model.parameters()).device
        best: dict[int, tuple[float, str]] = {}
        order = sorted(range(len(windows)), key=lambda k: len(windows[k].input_ids))  # less padding
        with GenerationCapture(model, sites, meter=meter, eos_token_id=eos) as capture:
            for lo in tqdm(range(0, len(order), batch_size), desc=f"squad {self.form}", disable=not progress,
                           leave=False):
                chunk = [windows[k] for k in order[lo:lo + batch_size]]
                prompts = [w.input_ids for w in chunk]
                input_ids = _pad(prompts, pad, left=self.pad_left).to(device)
                attention_mask = _pad([[1] * len(p) for p in prompts], 0, left=self.pad_left).to(device)
                scorer = _StepLogProbs()
                capture.begin_generation()
                with capture.sequence_group():
                    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         max_new_tokens=self.max_answer_tokens, do_sample=False, num_beams=1,
                                         eos_token_id=eos, pad_token_id=pad,
                                         logits_processor=LogitsProcessorList([scorer]),
                                         return_dict_in_generate=True)
                steps = len(scorer.steps)
                new = out.sequences[:, out.sequences.shape[1] - steps:]
                logp = torch.stack(scorer.steps, dim=1) if steps else torch.zeros(len(chunk), 0)
                is_eos = new == eos
                after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
                valid = (~after).float()
                scores = ((logp * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)).tolist()
                texts = tokenizer.batch_decode(new.masked_fill(after | is_eos, pad), skip_special_tokens=True)
                for w, score, text in zip(chunk, scores, texts):
                    if w.example not in best or score > best[w.example][0]:
                        best[w.example] = (score, text.strip())
        return [best.get(i, (0.0, ""))[1] for i in range(len(examples))], meter


class Seq2SeqRunner(GeneratingRunner):
    """Encoder–decoder (T5 / Flan-T5): ``question: … context: …</s>`` → ``answer</s>``."""

    form = "seq2seq"
    task_type = "SEQ_2_SEQ_LM"

    def auto_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def head(self, tokenizer, question):
        return self._question_ids(tokenizer, "question: " + question.strip()) + \
            tokenizer(" context:", add_special_tokens=False)["input_ids"]

    def tail(self, tokenizer):
        return [self.eos_token_id(tokenizer)]  # T5's tokenizer ends every input with </s>

    def encode_pairs(self, prompts, targets):
        return {"input_ids": prompts, "attention_mask": [[1] * len(p) for p in prompts], "labels": targets}


class GenerativeRunner(GeneratingRunner):
    """Decoder-only LM: ``Question: …\\nContext: …\\nAnswer:`` → `` answer<eos>``, loss on the answer only."""

    form = "generative"
    task_type = "CAUSAL_LM"
    pad_left = True
    reserve_answer = True

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @staticmethod
    def special_prefix(tokenizer) -> list[int]:
        """The special tokens the tokenizer puts before a text (BOS for Gemma/LLaMA, none for GPT-2)."""
        full = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        return full[: full.index(plain[0])] if plain and plain[0] in full else []

    def head(self, tokenizer, question):
        return self.special_prefix(tokenizer) + self._question_ids(tokenizer, "Question: " + question.strip()) + \
            tokenizer("\nContext:", add_special_tokens=False)["input_ids"]

    def tail(self, tokenizer):
        return tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]

    def target(self, tokenizer, answers):
        return super().target(tokenizer, [" " + a.strip() for a in answers])

    def encode_pairs(self, prompts, targets):
        ids = [p + t for p, t in zip(prompts, targets)]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                "labels": [[-100] * len(p) + t for p, t in zip(prompts, targets)]}


FORM_RUNNERS: dict[str, type[SquadRunner]] = {
    "extractive": ExtractiveRunner, "seq2seq": Seq2SeqRunner, "generative": GenerativeRunner}

RUNNERS["squad"] = SquadRunner
