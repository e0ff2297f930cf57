"""Batches as models take them: moved to a device, passed as keywords or positionally."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def move_batch(batch, device):
    """Tensors of a batch (a mapping, tuple or tensor) moved to ``device``."""
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v.to(device) if isinstance(v, torch.Tensor) else v for v in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def call_model(model: nn.Module, batch):
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
