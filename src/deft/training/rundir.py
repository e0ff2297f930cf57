"""The run directory: one class that knows every part of a run, writes them and reads them back.

    run_config.json           the TrainConfig (enough to rebuild the model)
    method/                   the trained PEFT modules (see deft.methods), + deft_method.json
    adaptive/                 ADA-DEFT's α (deft.adaptive), for --ada runs
    checkpoints/              Trainer checkpoints (for --resume)
    history.json              metric and density at every evaluation, against the step
    results.json              task, model, method, mode, seed, metrics, density, trainable_params, ...
    pruned_model.safetensors  `deft prune`: every weight of the pruned model, as it runs
    prune.json                `deft prune`: how it was pruned, per-layer sparsity, metric, density
    thresholds.json           `deft sparsify`: activation thresholds, re-applied on every load
    sparsify.json             `deft sparsify`: calibration, metric and density before and after
    shrink.json               `deft shrink`: MLP neurons kept per block (+ summary); re-applied on every load
    shrink.safetensors        `deft shrink`: what the removed neurons add to the down biases

A run derived from another (``deft prune``) carries over every part that rebuilds the model
(:data:`RunDir.MODEL_PARTS`) through :meth:`RunDir.derive`, so whatever a run holds, its
derived run loads the same way.

Why a pruned run stores a full state dict on top of the rebuilt run rather than a
``save_pretrained`` directory: only LoRA-like adapters can be merged into the base weights. A
bottleneck adapter is injected into the down projection and prefix/prompt tuning runs inside the
peft wrapper, so a plain transformers directory could not hold those runs. Loading rebuilds the
run exactly as trained (base model + ``method/`` + ``adaptive/``), merges what
:func:`deft.methods.merge_peft` merges — the step pruning took, so the module tree is the same —
and then loads the pruned weights strictly (any mismatch is an error, never a partial load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from ..adaptive import ADAPTIVE_DIR
from ..core.neurons import SHRINK_FILE, SHRINK_WEIGHTS_FILE, NeuronRemoval, apply_removal
from ..core.thresholds import THRESHOLDS_FILE, Thresholds, apply_thresholds
from ..methods import merge_peft


class RunDir:
    """A run directory (module doc); ``RunDir(path).check()`` fails clearly on anything else."""

    CONFIG = "run_config.json"
    METHOD = "method"
    ADAPTIVE = ADAPTIVE_DIR
    CHECKPOINTS = "checkpoints"
    HISTORY = "history.json"
    RESULTS = "results.json"
    PRUNED_WEIGHTS = "pruned_model.safetensors"
    PRUNE_INFO = "prune.json"
    THRESHOLDS = THRESHOLDS_FILE
    SHRINK = SHRINK_FILE
    SHRINK_WEIGHTS = SHRINK_WEIGHTS_FILE
    #: What rebuilds the trained model; a derived run copies all of it.
    MODEL_PARTS = (CONFIG, METHOD, ADAPTIVE, PRUNED_WEIGHTS, THRESHOLDS, SHRINK, SHRINK_WEIGHTS)

    def __init__(self, path: "str | Path | RunDir"):
        self.path = Path(path)

    def __fspath__(self) -> str:  # a RunDir is accepted wherever a path is
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # -- what is there ---------------------------------------------------------------------
    def is_run(self) -> bool:
        return (self.path / self.CONFIG).is_file()

    def check(self) -> "RunDir":
        """Itself, if it is a run directory; a clear error before any model is loaded otherwise."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"run directory {self.path} does not exist")
        if not self.is_run():
            raise FileNotFoundError(f"{self.path} is not a deft run directory (no {self.CONFIG}); "
                                    "give a directory written by `deft train`, `deft compare` or `deft prune`")
        return self

    @property
    def has_adaptive(self) -> bool:
        return (self.path / self.ADAPTIVE).is_dir()

    @property
    def is_shrunk(self) -> bool:
        return (self.path / self.SHRINK).is_file()

    @property
    def is_pruned(self) -> bool:
        return (self.path / self.PRUNED_WEIGHTS).is_file()

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    # -- JSON parts ------------------------------------------------------------------------
    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    def write_json(self, name: str, payload) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / name
        path.write_text(json.dumps(payload, indent=2))
        return path

    def read_config(self) -> dict:
        config = self.read_json(self.CONFIG)
        if config is None:
            self.check()
        return config

    def results(self) -> dict | None:
        return self.read_json(self.RESULTS)

    # -- derived runs ----------------------------------------------------------------------
    def derive(self, output: str | Path) -> "RunDir":
        """A new run directory at ``output`` holding every model part of this run (to which the
        caller adds its own, e.g. pruned weights). ``output`` must not be this run."""
        out = RunDir(output)
        if out.path.resolve() == self.path.resolve():
            raise ValueError(f"--output {output} is the source run itself: choose a new directory")
        out.path.mkdir(parents=True, exist_ok=True)
        for name in self.MODEL_PARTS:
            src, dst = self.path / name, out.path / name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.is_file():
                shutil.copy2(src, dst)
        return out

    def save_pruned(self, model: nn.Module, info: dict) -> None:
        """Write ``model``'s weights (already passed through ``merge_peft``) and ``prune.json``."""
        from safetensors.torch import save_model

        self.path.mkdir(parents=True, exist_ok=True)
        # save_model (not save_file) copes with tied weights, e.g. an LM head sharing the embeddings.
        save_model(model, str(self.path / self.PRUNED_WEIGHTS))
        self.write_json(self.PRUNE_INFO, info)

    def apply_thresholds(self, model: nn.Module) -> nn.Module:
        """``model`` with the run's activation thresholds, if it has any."""
        thresholds = Thresholds.load(self.path)
        return apply_thresholds(model, thresholds) if thresholds is not None else model

    def apply_pruned(self, model: nn.Module) -> nn.Module:
        """For a pruned run: ``model`` (the rebuilt run) merged as pruning merged it, with the
        pruned weights loaded; any other run's model is returned unchanged."""
        if not self.is_pruned:
            return model
        from safetensors.torch import load_model

        model = merge_peft(model)
        load_model(model, str(self.path / self.PRUNED_WEIGHTS), strict=True)
        model.eval()
        return model

    def apply_shrink(self, model: nn.Module) -> nn.Module:
        """For a `deft shrink` output: ``model`` merged (``merge_peft``, as shrinking merged it) with
        its removed MLP neurons gone; any other run's model is returned unchanged."""
        removal = NeuronRemoval.load(self.path)
        if removal is None:
            return model
        model = merge_peft(model)
        apply_removal(model, removal)
        model.eval()
        return model
