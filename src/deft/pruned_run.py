"""A pruned run directory: what ``deft prune`` writes and :func:`deft.train.load_run` reads back.

Layout (next to the source run's ``run_config.json`` and ``method/``, copied unchanged)::

    pruned_model.safetensors   every weight of the pruned model, as it runs
    prune.json                 how it was pruned, per-layer achieved sparsity, metric, density

Why a full state dict on top of the rebuilt run rather than a ``save_pretrained`` model
directory: only LoRA-like adapters can be merged into the base weights. A bottleneck adapter
(the paper's main method) is injected into the down projection and prefix/prompt tuning runs
inside the peft wrapper, so a plain transformers directory could not hold those runs. Loading
rebuilds the run exactly as trained (base model + ``method/``), merges what
:func:`deft.prune.merge_peft` merges — the same step pruning took, so the module tree is the
same — and then loads the pruned weights strictly (any mismatch is an error, never a silent
partial load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

PRUNED_WEIGHTS = "pruned_model.safetensors"
PRUNE_INFO = "prune.json"


def is_pruned_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / PRUNED_WEIGHTS).is_file()


def save_pruned_run(model: nn.Module, source_run: str | Path, output_dir: str | Path, info: dict) -> Path:
    """Write a loadable pruned run: the source's config and trained modules, the pruned weights
    of ``model`` (already passed through ``merge_peft``) and ``prune.json`` (``info``)."""
    from safetensors.torch import save_model

    src, out = Path(source_run).resolve(), Path(output_dir).resolve()
    if out == src:
        raise ValueError(f"--output {output_dir} is the source run itself: choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "run_config.json", out / "run_config.json")
    if (src / "method").is_dir():
        shutil.copytree(src / "method", out / "method", dirs_exist_ok=True)
    # save_model (not save_file) copes with tied weights, e.g. an LM head sharing the embeddings.
    save_model(model, str(out / PRUNED_WEIGHTS))
    (out / PRUNE_INFO).write_text(json.dumps(info, indent=2))
    return out


def apply_pruned_weights(model: nn.Module, run_dir: str | Path) -> nn.Module:
    """For a pruned run: ``model`` (the rebuilt run) merged like pruning merged it, with the
    pruned weights loaded; any other run's model is returned unchanged."""
    path = Path(run_dir) / PRUNED_WEIGHTS
    if not path.is_file():
        return model
    from safetensors.torch import load_model

    from .prune import merge_peft

    model = merge_peft(model)
    load_model(model, str(path), strict=True)
    model.eval()
    return model


__all__ = ["PRUNED_WEIGHTS", "PRUNE_INFO", "is_pruned_run", "save_pruned_run", "apply_pruned_weights"]
