"""PEFT and DEFT training on the Hugging Face ``Trainer``.

:class:`DeftTrainer` is ``transformers.Trainer`` plus one term: λ·L_density from the
capture hooks (eq. 8). Everything else — checkpoints, ``--resume``, gradient accumulation,
mixed precision, logging, ``accelerate launch``/``torchrun`` — is the library's. PEFT runs
use the same class with λ = 0 and no hooks, so the two modes differ only by the loss.

A run directory holds::

    run_config.json   the TrainConfig (enough to rebuild the model)
    method/           the trained modules only (see deft.methods), + deft_method.json
    checkpoints/      Trainer checkpoints (for --resume)
    history.json      metric and density at every evaluation, against the step
    results.json      task, model, method, mode, seed, metrics, density, trainable_params, ...
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .capture import ActivationCapture
from .adaptive import (ADAPTIVE_DIR, AdaptiveConfig, apply_adaptive, checkpoint_callback, frozen_alphas,
                       load_adaptive)
from .loss import DensityLossConfig, combine_terms
from .metrics import DensityMeter
from .sites import SiteMap, find_sites

MODES = ("peft", "deft")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``run_config.json``).

    Defaults are sized for a laptop CPU on the built-in MiniLM: a short run, not the paper's
    10 epochs (``epochs``/``max_train_samples`` scale it up). ``lambda_warmup`` ramps λ
    linearly from 0 over that share of the steps (ProSparse-style), letting the task head
    settle before sparsity is pushed.
    """

    task: str = "sst2"
    method: str = "lora"
    mode: str = "deft"
    model: str = "minilm"
    tokenizer: str | None = None
    method_options: dict = field(default_factory=dict)
    density: DensityLossConfig = field(default_factory=lambda: DensityLossConfig(weight=1.0, approx="l0", eps=1e-2))
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    max_train_samples: int | None = 2000
    max_eval_samples: int | None = None
    warmup_ratio: float = 0.06
    lambda_warmup: float = 0.0
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    threshold: float = 1e-2
    evals_per_epoch: int = 1
    seed: int = 0
    data_dir: str | None = None
    site_point: str = "act"
    # ADA-PEFT / ADA-DEFT (METHOD.md §4, deft.adaptive): one trainable α per MLP block.
    ada: bool = False
    ada_init: float = 0.8
    ada_init_std: float = 0.05
    ada_lr_scale: float = 1.0  # α moves this many times faster than the PEFT modules (Adam)

    def __post_init__(self):
        if isinstance(self.density, dict):
            self.density = DensityLossConfig(**self.density)
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if not 0 <= self.lambda_warmup <= 1:
            raise ValueError(f"lambda_warmup is a share of the steps in [0, 1], got {self.lambda_warmup}")
        for name in ("batch_size", "eval_batch_size", "max_length", "gradient_accumulation_steps", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("train for epochs > 0 or max_steps > 0")

    @property
    def density_loss(self) -> DensityLossConfig | None:
        """The density loss of this run; None for PEFT (λ = 0 means no hooks at all)."""
        return self.density if self.mode == "deft" and self.density.weight > 0 else None

    def to_dict(self) -> dict:
        return asdict(self)

    def run_identity(self) -> dict:
        """The settings that shape the trained model. A PEFT run ignores the density-loss settings
        (λ, approximation, warm-up), so PEFT runs that differ only there are the same run."""
        data = json.loads(json.dumps(self.to_dict()))
        if self.mode == "peft":
            data.pop("density")
            data.pop("lambda_warmup")
        return data

    def same_run(self, saved: dict) -> bool:
        """Whether a saved ``run_config.json`` / results ``config`` describes the run this config trains."""
        return TrainConfig.from_dict(saved).run_identity() == self.run_identity()

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stops instead of producing garbage."""


def _trainer_base():
    from transformers import Trainer

    return Trainer


def make_deft_trainer(*, sites: SiteMap, density: DensityLossConfig | None, threshold: float,
                      lambda_warmup_steps: int = 0, **trainer_kwargs):
    """A :class:`transformers.Trainer` that adds λ·L_density and measures density at evaluation."""
    Trainer = _trainer_base()

    class DeftTrainer(Trainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.sites = sites
            self.density_config = density
            self.threshold = threshold
            self.lambda_warmup_steps = lambda_warmup_steps
            approx = density.build_approx() if density is not None else None
            self.capture = ActivationCapture(self.model, sites, approx=approx)
            if density is not None:
                self.capture.attach()
            self._density_log: list[float] = []

        def current_lambda_scale(self) -> float:
            if self.lambda_warmup_steps <= 0:
                return 1.0
            return min(1.0, self.state.global_step / self.lambda_warmup_steps)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if self.density_config is not None and model.training:
                term = combine_terms(self.capture.pop_terms(), self.density_config)
                if term is not None:
                    self._density_log.append(float(term.detach()) / self.density_config.weight)
                    loss = loss + self.current_lambda_scale() * term
            if model.training and not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(
                    f"loss became {float(loss.detach())} at step {self.state.global_step + 1} "
                    f"(epoch {self.state.epoch or 0:.2f}); lower the learning rate or λ, or raise ε")
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if self._density_log and "loss" in logs:
                logs["density_loss"] = float(np.mean(self._density_log))
                logs["lambda_scale"] = self.current_lambda_scale()
                self._density_log.clear()
            super().log(logs, *args, **kwargs)

        def evaluate(self, *args, **kwargs):
            # Every DataLoader iterator draws its base seed from torch's global RNG, so an
            # evaluation mid-training would shift all later dropout masks: the result would depend
            # on --evals-per-epoch. Evaluate on a forked RNG so training never sees it.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                return super().evaluate(*args, **kwargs)

        def evaluation_loop(self, *args, **kwargs):
            meter = DensityMeter(self.sites.sites, threshold=self.threshold)
            measuring = ActivationCapture(self.model, self.sites, meter=meter)
            with measuring:
                output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            # Under torchrun each rank saw its shard of the evaluation set: sum the counts, so the
            # density is over the whole set (as the gathered metric is).
            meter.sync_processes()
            report = meter.result().to_dict()
            output.metrics[f"{prefix}_density"] = report["overall"]
            output.metrics[f"{prefix}_density_threshold"] = report["threshold"]["overall"]
            output.metrics[f"{prefix}_union_density"] = report["union"]["overall"]
            self.last_density = report
            return output

    return DeftTrainer(**trainer_kwargs)


# -- what differs between tasks ---------------------------------------------------------------
class TaskRunner:
    """The task-specific half of a run: which head to load, the data, the collator, the metrics.

    ``train()`` is task-agnostic and asks a runner for these; GLUE is :class:`GlueRunner`.
    Other task kinds register a runner class in :data:`RUNNERS` under their ``TaskSpec.kind``.
    """

    task_type = "SEQ_CLS"  # peft's task type
    #: Density of the final evaluation when ``final_metrics`` measured it itself (generate-based
    #: evaluation runs outside the Trainer's loop); None → the Trainer's last evaluation.
    final_density: dict | None = None

    def __init__(self, task, config: "TrainConfig"):
        self.task, self.config = task, config

    def result_fields(self) -> dict:
        """Task-specific extra keys for ``results.json`` (e.g. which split the metrics are on)."""
        return {}

    def evaluate_model(self, model, tokenizer, **options) -> "TaskEvaluation | None":
        """Metrics and density of a trained model outside a Trainer (``deft eval``); None → not
        provided by this runner (``deft eval`` then uses its GLUE path)."""
        return None

    def auto_class(self):
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        return {}

    def datasets(self, tokenizer):
        """(tokenized train set, tokenized evaluation set)."""
        raise NotImplementedError

    def collator(self, tokenizer, model):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self):
        return None

    def final_metrics(self, trainer, eval_set) -> dict:
        """Metrics of the trained model on the evaluation set (keys without ``eval_``)."""
        final = trainer.evaluate(eval_set)
        skip = ("eval_density", "eval_union", "eval_runtime", "eval_samples", "eval_steps")
        return {k[len("eval_"):]: v for k, v in final.items() if k.startswith("eval_") and not k.startswith(skip)}


class GlueRunner(TaskRunner):
    task_type = "SEQ_CLS"

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self) -> dict:
        return {"num_labels": self.task.num_labels}

    def datasets(self, tokenizer):
        from .evaluation import tokenize_glue
        from .tasks import load_glue

        c = self.config
        train = load_glue(self.task.name, "train", data_dir=c.data_dir, max_samples=c.max_train_samples, seed=c.seed)
        dev = load_glue(self.task.name, self.task.dev_split, data_dir=c.data_dir, max_samples=c.max_eval_samples,
                        seed=c.seed)
        return tokenize_glue(train, tokenizer, c.max_length), tokenize_glue(dev, tokenizer, c.max_length)

    def compute_metrics(self):
        from .tasks import compute_glue_metrics, predictions_from_logits

        name = self.task.name

        def compute(eval_pred):
            preds = eval_pred.predictions
            logits = preds[0] if isinstance(preds, tuple) else preds
            return compute_glue_metrics(name, predictions_from_logits(name, logits), eval_pred.label_ids)

        return compute


@dataclass
class TaskEvaluation:
    """What :meth:`TaskRunner.evaluate_model` returns: metrics, ``DensityReport.to_dict()``, and
    the split, its size and any notes (e.g. ``split_note``)."""

    metrics: dict
    density: dict
    split: str
    samples: int
    extra: dict = field(default_factory=dict)


RUNNERS: dict[str, type[TaskRunner]] = {"glue": GlueRunner}


def task_runner(config: "TrainConfig") -> TaskRunner:
    from .tasks import get_task

    task = get_task(config.task)
    kind = getattr(task, "kind", "glue")
    if kind not in RUNNERS and getattr(task, "runner_module", None):
        importlib.import_module(task.runner_module)  # registers the kind's runner in RUNNERS
    if kind not in RUNNERS:
        raise ValueError(f"no training support for task kind {kind!r} (known: {sorted(RUNNERS)})")
    return RUNNERS[kind](task, config)


def build_model(config: TrainConfig, tokenizer, runner: TaskRunner):
    """Base model for the task, loaded the way the method needs (e.g. 4-bit for QLoRA)."""
    from transformers.utils import logging as hf_logging

    from .methods import get_method
    from .models import resolve_model_path

    method = get_method(config.method)
    method_config = method.resolve_config(config.method_options or None)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a base checkpoint's task head is new by design; no load report
    try:
        model = method.load_base(resolve_model_path(config.model), runner.auto_class(), method_config,
                                 **runner.model_kwargs())
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
    return method, method_config, model


def train(config: TrainConfig, output_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train one run (PEFT or DEFT) and write the run directory; returns ``results.json``'s content."""
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from .methods import trainable_parameters
    from .models import load_tokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved_config = out / "run_config.json"
    if resume and saved_config.exists():
        previous = json.loads(saved_config.read_text())
        if previous != json.loads(json.dumps(config.to_dict())):
            raise ValueError(f"--resume: {saved_config} was written with different settings; "
                             "resume with the same options or use a new --output")
    if int(os.environ.get("RANK", "0")) == 0:
        saved_config.write_text(json.dumps(config.to_dict(), indent=2))

    runner = task_runner(config)
    task = runner.task
    set_seed(config.seed)
    tokenizer = load_tokenizer(config.model, config.tokenizer)
    method, method_config, model = build_model(config, tokenizer, runner)
    model = method.apply(model, method_config, task_type=runner.task_type)
    sites = find_sites(model, config.site_point)
    # α after the method: peft freezes every parameter that exists when it wraps the model.
    adaptive = apply_adaptive(model, sites, AdaptiveConfig(
        init=config.ada_init, init_std=config.ada_init_std, seed=config.seed,
        lr_scale=config.ada_lr_scale)) if config.ada else None
    trainable, total = trainable_parameters(model)
    train_set, dev_set = runner.datasets(tokenizer)

    steps_per_epoch = math.ceil(len(train_set) / (config.batch_size * config.gradient_accumulation_steps))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a share of the steps in transformers 5
        lr_scheduler_type="linear",
        weight_decay=config.weight_decay,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        activation_checkpointing=config.gradient_checkpointing,
        # Re-entrant checkpointing runs the forward without gradients: the density terms would be lost.
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        eval_strategy="steps", eval_steps=eval_every,
        save_strategy="steps", save_steps=eval_every, save_total_limit=2,
        logging_steps=max(1, min(10, eval_every)),
        seed=config.seed, data_seed=config.seed,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    trainer = make_deft_trainer(
        sites=sites, density=config.density_loss, threshold=config.threshold,
        lambda_warmup_steps=int(config.lambda_warmup * total_steps),
        model=model, args=args, train_dataset=train_set, eval_dataset=dev_set,
        data_collator=runner.collator(tokenizer, model), compute_metrics=runner.compute_metrics(),
        processing_class=tokenizer,
        callbacks=[checkpoint_callback(adaptive)] if adaptive else None,
    )
    checkpoint = get_last_checkpoint(args.output_dir) if resume and Path(args.output_dir).is_dir() else None
    started = time.perf_counter()
    if adaptive and checkpoint and (Path(checkpoint) / ADAPTIVE_DIR).is_dir():
        adaptive.load(Path(checkpoint) / ADAPTIVE_DIR)  # peft checkpoints hold no α
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - started
    trainer.capture.detach()

    metrics = runner.final_metrics(trainer, dev_set)
    main_process = trainer.is_world_process_zero()  # under torchrun every rank gets here; one writes
    if main_process:
        with frozen_alphas(model):  # α lives in adaptive/, not in the method's checkpoint
            method.save(model, out / "method")
        if adaptive:
            adaptive.save(out / ADAPTIVE_DIR)
        (out / "history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    results = {
        "task": task.name, "model": config.model, "method": config.method, "mode": config.mode,
        "seed": config.seed, "metrics": metrics, "main_metric": task.main_metric,
        "density": runner.final_density if runner.final_density is not None else trainer.last_density,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "train_seconds": train_seconds, "steps": trainer.state.global_step,
        "train_samples": len(train_set), "eval_samples": len(dev_set), "resumed_from": checkpoint,
        **runner.result_fields(),
        "alphas": adaptive.report() if adaptive else None,
        "config": config.to_dict(),
    }
    if main_process:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def load_run(run_dir: str | Path) -> tuple[TrainConfig, nn.Module, object]:
    """Rebuild a trained run: (config, model with its trained modules, tokenizer)."""
    from .models import load_tokenizer

    run = Path(run_dir)
    config_file = run / "run_config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{run} is not a deft run directory (no run_config.json)")
    config = TrainConfig.from_dict(json.loads(config_file.read_text()))
    tokenizer = load_tokenizer(config.model, config.tokenizer)
    method, _, base = build_model(config, tokenizer, task_runner(config))
    model = method.load(base, run / "method")
    if config.ada:
        load_adaptive(model, run / ADAPTIVE_DIR, find_sites(model, config.site_point))
    from .pruned_run import apply_pruned_weights  # a `deft prune` output: merged, pruned weights

    model = apply_pruned_weights(model, run)
    model.eval()
    return config, model, tokenizer
