"""One pass over an evaluation set: task predictions and activation density together.

Batches are padded per batch (``DataCollatorWithPadding``), not to a fixed length: GLUE
sentences are short, and padding would only be masked out again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .capture import ActivationCapture
from .metrics import DensityMeter, DensityReport
from .sites import SiteMap, find_sites


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


@dataclass
class EvalOutput:
    logits: np.ndarray
    labels: np.ndarray | None
    density: DensityReport


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, sites: SiteMap | None = None, threshold: float = 1e-2,
             progress: bool = True, desc: str = "evaluating") -> EvalOutput:
    """Run ``model`` over ``loader``; return logits, labels and the density report of the whole set."""
    sites = sites if sites is not None else find_sites(model)
    meter = DensityMeter(sites.sites, threshold=threshold)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with ActivationCapture(model, sites, meter=meter):
            for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                gold = batch.pop("labels", None)
                out = model(**batch)
                logits.append(out.logits.float().cpu())
                if gold is not None:
                    labels.append(gold.cpu())
    finally:
        model.train(was_training)
    return EvalOutput(
        logits=torch.cat(logits).numpy() if logits else np.zeros((0,)),
        labels=torch.cat(labels).numpy() if labels else None,
        density=meter.result())
