"""Training PEFT and DEFT runs: every default (:mod:`~deft.training.config`), the Trainer with the
density term (:mod:`~deft.training.trainer`), the run directory (:mod:`~deft.training.rundir`),
training and reloading a run (:mod:`~deft.training.run`), PEFT vs DEFT over seeds
(:mod:`~deft.training.compare`)."""

from .compare import compare, summarize
from .config import METHOD_PRESETS, MODES, TrainConfig, field_default, preset
from .run import build_model, load_run, task_runner, train
from .rundir import RunDir
from .trainer import NonFiniteLossError, make_deft_trainer

__all__ = ["METHOD_PRESETS", "MODES", "NonFiniteLossError", "RunDir", "TrainConfig", "build_model", "compare",
           "field_default", "load_run", "make_deft_trainer", "preset", "summarize", "task_runner", "train"]
