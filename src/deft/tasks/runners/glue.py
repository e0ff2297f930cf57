"""GLUE: sequence classification (regression for STS-B), trained and evaluated the one way.

Batches are padded per batch (``DataCollatorWithPadding``), not to a fixed length: GLUE
sentences are short, and padding would only be masked out again.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ...core.evaluation import evaluate
from ...core.sites import find_sites
from ..glue import HELDOUT_SPLIT, compute_glue_metrics, load_glue, predictions_from_logits
from .base import TaskEvaluation, TaskRunner


def tokenize_glue(dataset, tokenizer, max_length: int = 128):
    """Tokenize a dataset from :func:`deft.tasks.load_glue` (``text_a``, optional ``text_b``, ``label``)."""
    pair = "text_b" in dataset.column_names

    def encode(batch):
        return tokenizer(batch["text_a"], batch["text_b"] if pair else None, truncation=True, max_length=max_length)

    keep = {"label"}
    return dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep],
                       desc="tokenizing")


def make_loader(tokenized, tokenizer, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    columns = [c for c in tokenized.column_names]
    data = tokenized.with_format("python", columns=columns)
    renamed = [{("labels" if k == "label" else k): v for k, v in row.items()} for row in data]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(renamed, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def without_labels(loader):
    """The batches of ``loader`` without ``labels`` (forward-only passes: no loss over them)."""
    for batch in loader:
        batch = dict(batch)
        batch.pop("labels", None)
        yield batch


class GlueRunner(TaskRunner):
    task_type = "SEQ_CLS"

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self) -> dict:
        return {"num_labels": self.task.num_labels}

    def datasets(self, tokenizer):
        c = self.config
        train = load_glue(self.task.name, "train", data_dir=c.data_dir, max_samples=c.max_train_samples, seed=c.seed,
                          holdout=c.holdout_samples)
        dev = load_glue(self.task.name, self.task.dev_split, data_dir=c.data_dir, max_samples=c.max_eval_samples,
                        seed=c.seed)
        return tokenize_glue(train, tokenizer, c.max_length), tokenize_glue(dev, tokenizer, c.max_length)

    def metrics(self, logits, labels) -> dict:
        """The task's metrics (0–1 scale) of ``logits`` against ``labels``."""
        name = self.task.name
        return compute_glue_metrics(name, predictions_from_logits(name, logits), labels)

    def compute_metrics(self):
        def compute(eval_pred):
            preds = eval_pred.predictions
            return self.metrics(preds[0] if isinstance(preds, tuple) else preds, eval_pred.label_ids)

        return compute

    def resolve_split(self, split: str | None) -> str:
        """Canonical name of ``split`` (default: the dev split); ``heldout`` is the run's held-out
        training examples, where it has any."""
        if split == HELDOUT_SPLIT and not self.config.holdout_samples:
            raise ValueError(f"split {HELDOUT_SPLIT!r}: this run set no training examples aside (--holdout-samples)")
        return split if split == HELDOUT_SPLIT else self.task.resolve_split(split) if split else self.task.dev_split

    def eval_samples(self, split: str, max_samples: int | None) -> int | None:
        """Examples to evaluate on: the run's own evaluation subset on its dev split unless told
        (same seed, so an evaluation reproduces the run's), 0 = all."""
        if max_samples is None and self.task.name == self.config.task and split == self.task.dev_split:
            max_samples = self.config.max_eval_samples
        return max_samples or None

    def loader(self, tokenizer, split: str, *, max_samples: int | None, batch_size: int,
               data_dir: str | None = None, seed: int | None = None):
        """(dataset, DataLoader) of one split tokenized as in training; ``max_samples`` taken as
        given (None = all); ``seed`` default the run's."""
        c = self.config
        data = load_glue(self.task.name, split, data_dir=data_dir or c.data_dir, max_samples=max_samples,
                         seed=c.seed if seed is None else seed, holdout=c.holdout_samples)
        return data, make_loader(tokenize_glue(data, tokenizer, c.max_length), tokenizer, batch_size)

    def calibration_batches(self, tokenizer, model, *, samples, batch_size, data_dir=None):
        _, loader = self.loader(tokenizer, "train", max_samples=samples, batch_size=batch_size, data_dir=data_dir)
        return without_labels(loader)

    def evaluate_model(self, model, tokenizer, *, split=None, data_dir=None, max_samples=None, batch_size=None,
                       threshold=None, progress=True) -> TaskEvaluation:
        c = self.config
        split = self.resolve_split(split)
        data, loader = self.loader(tokenizer, split, max_samples=self.eval_samples(split, max_samples),
                                   batch_size=batch_size or c.eval_batch_size, data_dir=data_dir)
        out = evaluate(model, loader, sites=find_sites(model, c.site_point),
                       threshold=c.threshold if threshold is None else threshold, progress=progress,
                       desc=f"evaluating {self.task.name}/{split}")
        return TaskEvaluation(metrics=self.metrics(out.logits, out.labels), density=out.density.to_dict(),
                              split=split, samples=len(data))
