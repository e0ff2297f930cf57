"""Task registry: benchmark task specs by name (GLUE, SQuAD); how each kind trains and evaluates is
in :mod:`deft.tasks.runners`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

from deft.tasks.glue import (
    GLUE_TASKS,
    GlueTask,
    compute_glue_metrics,
    load_glue,
    normalize_task_name,
    predictions_from_logits,
    resolve_data_dir,
)
from deft.tasks.squad import SQUAD_TASKS, SquadTask, load_squad, squad_metrics

__all__ = [
    "TASKS",
    "GlueTask",
    "SquadTask",
    "TaskSpec",
    "compute_glue_metrics",
    "get_task",
    "load_glue",
    "load_squad",
    "predictions_from_logits",
    "resolve_data_dir",
    "squad_metrics",
]


class TaskSpec(Protocol):
    """What every registered task spec provides; benchmark-specific specs add their own fields."""

    @property
    def name(self) -> str:
        """Canonical lowercase task name (the registry key)."""
        ...

    @property
    def main_metric(self) -> str:
        """Metric key used for model selection."""
        ...

    @property
    def kind(self) -> str:
        """Task kind (``glue``, ``squad``): selects the runner in :data:`deft.tasks.runners.RUNNERS`."""
        ...

    @property
    def max_length(self) -> int:
        """Standard maximum input length in tokens."""
        ...


# Read-only so the registry is fixed at import time; new benchmarks add their specs here.
TASKS: Mapping[str, TaskSpec] = MappingProxyType({**GLUE_TASKS, **SQUAD_TASKS})
"""All tasks by canonical name."""


def get_task(name: str) -> TaskSpec:
    """Return the spec for ``name``, case-insensitively and ignoring ``-``/``_`` (``"SST-2"`` -> ``sst2``).

    Raises:
        ValueError: unknown name; the message lists the valid task names.
    """
    spec = TASKS.get(normalize_task_name(name))
    if spec is None:
        raise ValueError(f"Unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return spec
