"""Every default of a run, in one place: :class:`TrainConfig` (saved as ``run_config.json``).

The library and the command line read their defaults from here, so ``deft train --task T
--method M`` and ``train(TrainConfig(task=T, method=M), out)`` are the same experiment. Fields
left ``None`` are filled in from the method's preset (:data:`METHOD_PRESETS`) or the task
(``max_length``) when the config is built, so a saved config names every value it ran with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from ..core.loss import DensityLossConfig
from ..core.relufication import check_activation
from ..tasks import get_task

MODES = ("peft", "deft")

# Per-method settings for a laptop-sized run (63 steps on MiniLM SST-2), from probes there
# (README, Training): LoRA learns far faster at 5e-3 than 1e-3 (PEFT 80.73% vs 75.92%; MRPC
# leaves the majority class), and q/v-only LoRA barely learns in such a run, so LoRA also adapts
# the MLP's first dense layer. The zero-initialised bottleneck adapter does not move at 1e-3
# (50.92%, majority class) but reaches 81.31% at 1e-2; at that rate DEFT with λ = 1 from step 0
# collapses to one class, while ramping λ over the first half keeps 79.24%.
METHOD_PRESETS: dict[str, dict] = {
    "lora": {"learning_rate": 5e-3, "method_options": {"include_mlp": True}},
    "qlora": {"learning_rate": 5e-3, "method_options": {"include_mlp": True}},
    "adapter": {"learning_rate": 1e-2, "lambda_warmup": 0.5},
}
#: What a method without a preset entry gets (prefix and prompt tuning: not probed).
PRESET_FALLBACK: dict = {"learning_rate": 1e-3, "lambda_warmup": 0.0, "method_options": {}}


def preset(method: str, name: str):
    """The method's default for ``name`` (``learning_rate``, ``lambda_warmup``, ``method_options``)."""
    value = METHOD_PRESETS.get(method.lower(), {}).get(name, PRESET_FALLBACK[name])
    return dict(value) if isinstance(value, dict) else value


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``run_config.json``).

    Defaults are sized for a laptop CPU on the built-in MiniLM: 2,000 training examples, one
    epoch (63 steps of batch 32), not the paper's 10 epochs (``epochs``/``max_train_samples``
    scale it up; ``max_train_samples=None`` is the full set). ``lambda_warmup`` ramps λ
    linearly from 0 over that share of the steps (ProSparse-style), letting the task head
    settle before sparsity is pushed. ``threshold`` is τ of the reported |a| > τ density.
    """

    task: str = "sst2"
    method: str = "lora"
    mode: str = "deft"
    model: str = "minilm"
    tokenizer: str | None = None
    method_options: dict | None = None  # None → METHOD_PRESETS
    density: DensityLossConfig = field(default_factory=DensityLossConfig)
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float | None = None  # None → METHOD_PRESETS
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int | None = None  # None → the task's (GLUE 128, SQuAD 384)
    max_train_samples: int | None = 2000
    max_eval_samples: int | None = None
    holdout_samples: int = 0  # training examples set aside (GLUE split "heldout"): an operating point chosen off dev
    warmup_ratio: float = 0.06
    lambda_warmup: float | None = None  # None → METHOD_PRESETS
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    threshold: float = 1e-2
    evals_per_epoch: int = 1
    save_steps: int | None = None  # checkpoint interval in steps (None: at every evaluation)
    seed: int = 0
    data_dir: str | None = None
    site_point: str = "act"
    # ADA-PEFT / ADA-DEFT (METHOD.md §4, deft.adaptive): one trainable α per MLP block.
    ada: bool = False
    ada_init: float = 0.8
    ada_init_std: float = 0.05
    ada_lr_scale: float = 1.0  # α moves this many times faster than the PEFT modules (Adam)
    # Training for deployment (deft.training.schedules, deft.core.relufication).
    activation: str | None = None  # "relu" / "shifted-relu": replace σ before training (ReLU-fication)
    activation_shift: float = 0.0  # b of the shifted ReLU max(0, x − b)
    train_density: float | None = None  # threshold in the loop: target density of the forward's zeros
    train_density_start: float = 1.0  # ... ramped linearly from this density
    train_density_ramp: float = 0.5  # ... over this share of the steps
    tau_every: int = 10  # steps between re-calibrations of the in-loop thresholds
    train_density_form: str = "token"  # the in-loop zeros: entries |a| ≤ τ ("token") or whole neurons ("neuron")
    neuron_fill: str = "zero"  # neuron form: a removed neuron outputs 0 ("zero") or its mean over real tokens ("mean")
    neuron_rank: str = "rms"  # neuron form: rank neurons by σ's RMS ("rms") or by Σa²·‖W_down[:, j]‖² ("output")
    neuron_rank_steps: int = 1  # neuron form: steps whose activations each re-ranking reads (1: its own step's)
    ste: bool = True  # straight-through gradient at the zeroed entries (False: blocked, as ReLU)
    # Distillation (deft.training.distill): the loss is (1 − w)·task + w·KL to a trained run's outputs.
    distill_from: str | None = None  # the teacher: a finished run of the same task and model (the dense PEFT run)
    distill_weight: float = 0.5  # w
    distill_temperature: float = 2.0  # T of the softened distributions (regression heads: squared error)

    def __post_init__(self):
        if isinstance(self.density, dict):
            self.density = DensityLossConfig(**self.density)
        for name in ("learning_rate", "lambda_warmup", "method_options"):
            if getattr(self, name) is None:
                setattr(self, name, preset(self.method, name))
        if self.max_length is None:
            self.max_length = get_task(self.task).max_length
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if not 0 <= self.lambda_warmup <= 1:
            raise ValueError(f"lambda_warmup is a share of the steps in [0, 1], got {self.lambda_warmup}")
        for name in ("batch_size", "eval_batch_size", "max_length", "gradient_accumulation_steps", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.holdout_samples < 0:
            raise ValueError(f"holdout_samples must be >= 0, got {self.holdout_samples}")
        if self.holdout_samples and get_task(self.task).kind != "glue":
            raise ValueError(f"holdout_samples sets GLUE training examples aside; {self.task} is not a GLUE task")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"save_steps must be >= 1, got {self.save_steps}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("train for epochs > 0 or max_steps > 0")
        check_activation(self.activation, self.activation_shift)
        if self.train_density is not None:
            if not 0 < self.train_density <= 1:
                raise ValueError(f"train_density is a share of active entries in (0, 1], got {self.train_density}")
            if not self.train_density <= self.train_density_start <= 1:
                raise ValueError(f"train_density_start must lie in [train_density, 1], got {self.train_density_start}")
            if not 0 <= self.train_density_ramp <= 1:
                raise ValueError(f"train_density_ramp is a share of the steps in [0, 1], got {self.train_density_ramp}")
            if self.train_density_form not in ("token", "neuron"):
                raise ValueError(f"unknown train_density_form {self.train_density_form!r}; choose token or neuron")
            if self.neuron_fill not in ("zero", "mean"):
                raise ValueError(f"unknown neuron_fill {self.neuron_fill!r}; choose zero or mean")
            if self.neuron_fill != "zero" and self.train_density_form != "neuron":
                raise ValueError("neuron_fill applies to train_density_form 'neuron' only")
            if self.neuron_rank not in ("rms", "output"):
                raise ValueError(f"unknown neuron_rank {self.neuron_rank!r}; choose rms or output")
            if self.neuron_rank != "rms" and self.train_density_form != "neuron":
                raise ValueError("neuron_rank applies to train_density_form 'neuron' only")
            if self.neuron_rank_steps < 1:
                raise ValueError(f"neuron_rank_steps must be >= 1, got {self.neuron_rank_steps}")
            if self.neuron_rank_steps > 1 and self.train_density_form != "neuron":
                raise ValueError("neuron_rank_steps applies to train_density_form 'neuron' only")
            if self.tau_every < 1:
                raise ValueError(f"tau_every must be >= 1, got {self.tau_every}")

        if not 0 < self.distill_weight <= 1:
            raise ValueError(f"distill_weight is a share of the loss in (0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")

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


def field_default(name: str):
    """The default of a :class:`TrainConfig` field (for help texts)."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default
