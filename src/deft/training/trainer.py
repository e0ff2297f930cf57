"""The Hugging Face ``Trainer`` plus one term: λ·L_density from the capture hooks (eq. 8).

Everything else — checkpoints, ``--resume``, gradient accumulation, mixed precision, logging,
``accelerate launch``/``torchrun`` — is the library's. PEFT runs use the same class with λ = 0
and no hooks, so the two modes differ only by the loss.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.capture import ActivationCapture
from ..core.loss import DensityLossConfig, combine_terms
from ..core.metrics import DensityMeter
from ..core.sites import SiteMap
from ..core.thresholds import applied_thresholds
from .distill import distillation_term, token_masks


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stops instead of producing garbage."""


def _trainer_base():
    from transformers import Trainer

    return Trainer


def make_deft_trainer(*, sites: SiteMap, density: DensityLossConfig | None, threshold: float,
                      lambda_warmup_steps: int = 0, loss_counts_items: bool | None = None,
                      teacher: torch.nn.Module | None = None, distill_weight: float | None = None,
                      distill_temperature: float | None = None, **trainer_kwargs):
    """A :class:`transformers.Trainer` that adds λ·L_density and measures density at evaluation.

    With a ``teacher`` (:mod:`deft.training.distill`) the task loss L becomes
    (1 − w)·L + w·L_distill, w = ``distill_weight`` (both settings are the run's TrainConfig's).
    """
    if teacher is not None and (distill_weight is None or distill_temperature is None):
        raise ValueError("a teacher needs distill_weight and distill_temperature")
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
            self._measuring: ActivationCapture | None = None
            self.teacher = teacher
            self._distill_log: list[float] = []

        def current_lambda_scale(self) -> float:
            if self.lambda_warmup_steps <= 0:
                return 1.0
            return min(1.0, self.state.global_step / self.lambda_warmup_steps)

        def _micro_batch_term_divisor(self, num_items_in_batch) -> int:
            # Each added term (L_density, the distillation term) is a per-micro-batch mean.
            # training_step divides the loss by the accumulation steps unless it counts the loss as
            # normalised over the whole accumulated batch by num_items_in_batch (same condition as
            # transformers' Trainer.training_step); then we divide the term ourselves, so its
            # gradient does not grow with the accumulation steps.
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                    or self.compute_loss_func is not None
            if not scaled:
                return 1
            return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if self.teacher is not None and model.training:
                loss = self._with_distillation(loss, outputs, inputs, num_items_in_batch)
            if self.density_config is not None and model.training:
                term = combine_terms(self.capture.pop_terms(), self.density_config)
                if term is not None:
                    self._density_log.append(float(term.detach()) / self.density_config.weight)
                    steps = self._micro_batch_term_divisor(num_items_in_batch)
                    if steps != 1:
                        term = term / steps
                    loss = loss + self.current_lambda_scale() * term
            if model.training and not torch.isfinite(loss.detach()).all():
                raise NonFiniteLossError(
                    f"loss became {float(loss.detach())} at step {self.state.global_step + 1} "
                    f"(epoch {self.state.epoch or 0:.2f}); lower the learning rate or λ, or raise ε")
            return (loss, outputs) if return_outputs else loss

        def _with_distillation(self, loss, outputs, inputs, num_items_in_batch):
            device = next(self.model.parameters()).device
            if next(self.teacher.parameters()).device != device:
                self.teacher.to(device)
            with torch.no_grad():  # with the labels: an encoder-decoder builds its decoder inputs from them
                teacher_outputs = self.teacher(**inputs)
            term = distillation_term(outputs, teacher_outputs, temperature=distill_temperature,
                                     masks=token_masks(inputs, self.model))
            self._distill_log.append(float(term.detach()))
            steps = self._micro_batch_term_divisor(num_items_in_batch)
            return (1 - distill_weight) * loss + distill_weight * (term / steps if steps != 1 else term)

        def log(self, logs, *args, **kwargs):
            if self._distill_log and "loss" in logs:
                logs["distill_loss"] = float(np.mean(self._distill_log))
                self._distill_log.clear()
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

        def _real_rows(self, inputs) -> int | None:
            """How many leading rows of this evaluation batch are real samples (None: all).

            With even batches, accelerate's sharded dataloader completes the last round (rank p
            gets global batch step·world + p) with samples from the start of the set, which
            ``gather_for_metrics`` drops by keeping the first ``remainder`` gathered rows.
            """
            from transformers.trainer_pt_utils import find_batch_size

            state = self.accelerator.gradient_state
            if self.accelerator.num_processes == 1 or not self.accelerator.even_batches \
                    or not state.end_of_dataloader or state.remainder <= 0:
                return None
            rows = find_batch_size(inputs)
            if rows is None:
                return None
            return min(max(state.remainder - self.accelerator.process_index * rows, 0), rows)

        def prediction_step(self, model, inputs, *args, **kwargs):
            if self._measuring is None:
                return super().prediction_step(model, inputs, *args, **kwargs)
            self._measuring.meter_rows = self._real_rows(inputs)
            try:
                return super().prediction_step(model, inputs, *args, **kwargs)
            finally:
                self._measuring.meter_rows = None

        def evaluation_loop(self, *args, **kwargs):
            meter = DensityMeter(self.sites.sites, threshold=self.threshold)
            measuring = ActivationCapture(self.model, self.sites, meter=meter)
            self._measuring = measuring
            try:
                with measuring:
                    output = super().evaluation_loop(*args, **kwargs)
            finally:
                self._measuring = None
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            # Under torchrun each rank saw its shard of the evaluation set: sum the counts, so the
            # density is over the whole set (as the gathered metric is).
            meter.sync_processes()
            result = meter.result()
            result.thresholds = applied_thresholds(self.model)
            report = result.to_dict()
            output.metrics[f"{prefix}_density"] = report["overall"]
            output.metrics[f"{prefix}_density_threshold"] = report["threshold"]["overall"]
            output.metrics[f"{prefix}_union_density"] = report["union"]["overall"]
            self.last_density = report
            return output

    trainer = DeftTrainer(**trainer_kwargs)
    if loss_counts_items is False:
        # transformers 5 passes num_items_in_batch to any model whose forward takes **kwargs and then
        # skips dividing the loss by the accumulation steps, but classification and seq2seq heads
        # still return a per-micro-batch mean: their task gradient would grow with the steps.
        trainer.model_accepts_loss_kwargs = False
    return trainer
