"""What differs between task kinds when a run trains and evaluates: :class:`TaskRunner`.

Training (:func:`deft.training.train`) is task-agnostic and asks a runner for the model class,
the data, the collator and the metrics; ``deft eval``, pruning and the deployment benchmarks ask
it to evaluate a model (:meth:`TaskRunner.evaluate_model`): one evaluation per task kind.

A runner reads the run's settings from ``config`` — any object with the fields of
:class:`deft.training.TrainConfig` that it uses (``data_dir``, ``seed``, ``max_length``,
``max_train_samples``, ``max_eval_samples``, ``eval_batch_size``, ``threshold``, ``site_point``,
``model``) — so tasks depend on nothing above :mod:`deft.core`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TaskEvaluation:
    """What :meth:`TaskRunner.evaluate_model` returns: metrics (0–1 scale), the density report
    (``DensityReport.to_dict()``), the split, its size and extra notes (e.g. ``split_note``)."""

    metrics: dict
    density: dict
    split: str
    samples: int
    extra: dict = field(default_factory=dict)

    def summary(self, main_metric: str) -> dict:
        """The flat keys results files use: main metric, exact / |a|>τ / union density, the report."""
        d = self.density
        return {"split": self.split, "samples": self.samples, "metrics": self.metrics, "main_metric": main_metric,
                "metric": self.metrics[main_metric], "density": d["overall"],
                "density_threshold": d["threshold"]["overall"], "union_density": d["union"]["overall"],
                "density_report": d}


class TaskRunner:
    """The task-specific half of a run: which head to load, the data, the collator, the metrics,
    and the evaluation of a trained model. Subclasses register under their task kind in
    :data:`deft.tasks.runners.RUNNERS`."""

    task_type = "SEQ_CLS"  # peft's task type
    #: Whether the model's task loss sums over tokens and divides by the Trainer's
    #: ``num_items_in_batch`` (causal LMs); heads that return a per-batch mean do not, and the
    #: Trainer must then divide by the accumulation steps itself.
    loss_counts_items = False
    #: Density of the final evaluation when ``final_metrics`` measured it itself (generate-based
    #: evaluation runs outside the Trainer's loop); None → the Trainer's last evaluation.
    final_density: dict | None = None

    def __init__(self, task, config, model_config: Callable[[], object] | None = None):
        """``model_config``: returns the model's transformers config, for runners whose behaviour
        depends on the architecture (loaded only when asked for)."""
        self.task, self.config = task, config
        self._model_config = model_config

    def result_fields(self) -> dict:
        """Task-specific extra keys for ``results.json`` (e.g. which split the metrics are on)."""
        return {}

    def evaluate_model(self, model, tokenizer, *, split: str | None = None, data_dir: str | None = None,
                       max_samples: int | None = None, batch_size: int | None = None,
                       threshold: float | None = None, progress: bool = True) -> TaskEvaluation:
        """Metrics and density of a trained model outside a Trainer. ``split``: default the run's
        evaluation split; ``max_samples``: default the run's own evaluation subset, 0 = all;
        ``batch_size``/``threshold``: default the run's."""
        raise NotImplementedError

    def calibration_batches(self, tokenizer, model, *, samples: int, batch_size: int, data_dir: str | None = None):
        """Forward-only batches (no labels) over ``samples`` training examples of the task,
        tokenized as in training: the data thresholds are calibrated on (``deft sparsify``)."""
        raise NotImplementedError(f"calibration on {self.task.kind} tasks is not supported")

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
