"""One pass over an evaluation set: task predictions (logits) and activation density together."""

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
from .thresholds import applied_thresholds


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
    report = meter.result()
    report.thresholds = applied_thresholds(model)
    return EvalOutput(
        logits=torch.cat(logits).numpy() if logits else np.zeros((0,)),
        labels=torch.cat(labels).numpy() if labels else None,
        density=report)
