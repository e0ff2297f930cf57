"""The two generating SQuAD forms (seq2seq and decoder-only generative) and the choice of form.

See :mod:`deft.tasks.runners.squad` for the forms, windows and how density is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.capture import ActivationCapture
from ...core.metrics import DensityMeter
from ...core.sites import find_sites
from .squad import (MAX_ANSWER_TOKENS, ExtractiveRunner, PaddingCollator, SquadRunner, _first_answer, _pad, doc_stride,
                     infer_form)


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
    loss_counts_items = True  # causal-LM loss: Σ over answer tokens / num_items_in_batch
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


def squad_runner(task, config, model_config=None) -> SquadRunner:
    """The runner of the task's form; task ``squad`` (no form) picks it from the model's config."""
    if task.form is None and model_config is None:
        raise ValueError("task squad picks its form from the model: pass model_config, or use "
                         "squad-extractive, squad-seq2seq or squad-generative")
    form = task.form or infer_form(model_config())
    return FORM_RUNNERS[form](task, config, model_config)
