"""Distillation from a trained run: the student (thresholds in the loop, neurons removed) matches
the teacher's outputs as well as the labels (``--distill-from RUN``).

The teacher is the dense PEFT model the student is compared against. The labels of a small task
leave the student free to lose what the zeroed activations carried. The teacher's full output
distribution says how each example was answered, and training towards it asks the sparse student
to answer the same way.

Written by hand because neither transformers' ``Trainer`` nor peft has a distillation term, and
TRL's (GKD) is for causal language models. The term is Hinton et al.'s: KL(teacher ‖ student) of
the softened distributions at temperature T, times T² so its gradient keeps its scale as T
changes. A one-output regression head (STS-B) has no distribution, so it gets the squared error
to the teacher's prediction instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .rundir import RunDir

#: The outputs distilled: a classification / regression head's, or an extractive QA head's two.
OUTPUT_KEYS = ("logits", "start_logits", "end_logits")


def _output(outputs, key: str):
    return outputs.get(key) if isinstance(outputs, dict) else getattr(outputs, key, None)


def _aligned(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logits of one length: prompt tuning prepends its virtual tokens to one side's
    sequence, so the common positions are the last ones."""
    if student.dim() == 3 and student.shape[1] != teacher.shape[1]:
        n = min(student.shape[1], teacher.shape[1])
        student, teacher = student[:, -n:], teacher[:, -n:]
    if student.shape != teacher.shape:
        raise ValueError(f"the teacher's outputs have shape {tuple(teacher.shape)}, the student's "
                         f"{tuple(student.shape)}: distil from a run with the same task head")
    return student, teacher


def distillation_term(student_outputs, teacher_outputs, *, temperature: float,
                      masks: tuple[torch.Tensor | None, ...] = ()) -> torch.Tensor:
    """The distillation term, averaged over the distilled outputs present in both models.

    Rows are examples (a classifier; a QA head's softmax over positions) or, for per-token logits
    ``(batch, length, vocab)``, the tokens of the first of ``masks`` (the batch's attention
    masks: decoder's, then encoder's) shaped ``(batch, length)``; all tokens where none is.
    """
    terms = []
    for key in OUTPUT_KEYS:
        student, teacher = _output(student_outputs, key), _output(teacher_outputs, key)
        if student is None or teacher is None:
            continue
        student, teacher = _aligned(student, teacher.detach())
        student, teacher = student.float(), teacher.float()
        if student.shape[-1] == 1:  # a regression head: the teacher's prediction is the target
            terms.append(F.mse_loss(student, teacher))
            continue
        if student.dim() == 3:  # per-token logits: the real tokens only
            keep = next((m.bool() for m in masks if m is not None and m.shape == student.shape[:2]), None)
            if keep is not None:
                student, teacher = student[keep], teacher[keep]
            else:
                student, teacher = student.flatten(0, 1), teacher.flatten(0, 1)
        log_student = F.log_softmax(student / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher / temperature, dim=-1)
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
        terms.append(kl * temperature ** 2)
    if not terms:
        raise ValueError(f"distillation needs one of the outputs {OUTPUT_KEYS} from both models")
    return torch.stack(terms).mean()


def token_masks(inputs: dict, model: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The masks of the real positions of per-token logits, best first: an encoder-decoder's
    logits are over the decoder's tokens (its mask, else the labels that are not -100), a
    decoder's over the input's (the attention mask)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        labels = inputs.get("labels")
        return (inputs.get("decoder_attention_mask"),
                labels.ne(-100) if labels is not None and labels.dim() == 2 else None)
    return (inputs.get("attention_mask"),)


def check_teacher(run_dir: str | Path, config: TrainConfig) -> Path:
    """The teacher run's path; refused (one line) unless it is a finished run of the same task and
    model as ``config`` (so it reads the student's batches as they are)."""
    run = RunDir(run_dir)
    if not run.path.is_dir() or not run.is_run() or not (run / RunDir.METHOD).is_dir():
        raise FileNotFoundError(f"--distill-from {run.path}: not a finished deft run "
                                f"(needs {RunDir.CONFIG} and {RunDir.METHOD}/ written by `deft train`)")
    saved = TrainConfig.from_dict(run.read_config())
    for name in ("task", "model", "tokenizer", "max_length"):
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(f"--distill-from {run.path}: the teacher's {name} is {getattr(saved, name)!r}, this "
                             f"run's is {getattr(config, name)!r}; distil from a run of the same task and model")
    return run.path


def frozen_teacher(model: nn.Module) -> nn.Module:
    """The teacher in evaluation mode (no dropout) with no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model
