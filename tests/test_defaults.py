"""One source of defaults: the command line builds exactly the library's TrainConfig, so
`deft train X` and `train(TrainConfig(X))` are the same experiment."""

from __future__ import annotations

import pytest

from deft.cli import build_parser, train_config
from deft.core.approx import make_approx
from deft.core.loss import DensityLossConfig
from deft.training import TrainConfig


def cli_config(*argv: str, command: str = "train") -> TrainConfig:
    extra = ["--output", "x"] if command == "train" else []
    return train_config(build_parser().parse_args([command, *argv, *extra]))


@pytest.mark.parametrize("argv,library", [
    ((), {}),
    (("--method", "adapter"), {"method": "adapter"}),
    (("--method", "qlora", "--task", "mrpc"), {"method": "qlora", "task": "mrpc"}),
    (("--method", "prefix", "--task", "squad-extractive"), {"method": "prefix", "task": "squad-extractive"}),
    (("--peft", "--lr", "1e-3", "--lambda", "0.5"), {"mode": "peft", "learning_rate": 1e-3,
                                                     "density": DensityLossConfig(weight=0.5)}),
    (("--approx", "tanh", "--beta", "2"), {"density": DensityLossConfig(approx="tanh", beta=2.0)}),
    (("--max-train-samples", "0", "--grad-accum", "2", "--ada"), {"max_train_samples": None,
                                                                   "gradient_accumulation_steps": 2, "ada": True}),
    (("--max-eval-samples", "0"), {"max_eval_samples": None}),  # 0 = all, as for every --max-*-samples
])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_cli_and_library_build_the_same_experiment(argv, library, command):
    if command == "compare":  # compare trains both modes: it has no --peft
        argv, library = tuple(a for a in argv if a != "--peft"), {k: v for k, v in library.items() if k != "mode"}
    assert cli_config(*argv, command=command) == TrainConfig(**library)


def test_the_defaults_are_the_documented_ones():
    """The values the README and help texts promise, read off the config objects."""
    c = TrainConfig()
    assert (c.task, c.method, c.mode, c.model) == ("sst2", "lora", "deft", "minilm")
    assert c.density == DensityLossConfig(weight=1.0, approx="l0", eps=0.1)
    assert make_approx("l0").eps == c.density.eps == 0.1  # approximation and loss agree on ε
    assert (c.learning_rate, c.lambda_warmup, c.method_options) == (5e-3, 0.0, {"include_mlp": True})
    adapter = TrainConfig(method="adapter")
    assert (adapter.learning_rate, adapter.lambda_warmup, adapter.method_options) == (1e-2, 0.5, {})
    assert (TrainConfig(method="prompt").learning_rate, TrainConfig(task="squad").max_length) == (1e-3, 384)
    assert (c.max_length, c.max_train_samples, c.batch_size, c.epochs) == (128, 2000, 32, 1.0)


def test_given_values_win_over_presets():
    c = TrainConfig(method="adapter", learning_rate=3e-4, lambda_warmup=0.0, method_options={"reduction_factor": 4})
    assert (c.learning_rate, c.lambda_warmup, c.method_options) == (3e-4, 0.0, {"reduction_factor": 4})
    assert TrainConfig.from_dict(c.to_dict()) == c  # a saved run_config.json rebuilds the same config
