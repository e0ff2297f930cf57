"""One runner per task kind: how a run of that kind trains and evaluates (:class:`TaskRunner`)."""

from __future__ import annotations

from collections.abc import Callable

from .. import get_task
from .base import TaskEvaluation, TaskRunner
from .glue import GlueRunner
from .squad_generate import squad_runner

__all__ = ["RUNNERS", "TaskEvaluation", "TaskRunner", "GlueRunner", "runner_for"]

#: Task kind → runner factory ``(task, config, model_config) -> TaskRunner``.
RUNNERS: dict[str, Callable[..., TaskRunner]] = {"glue": GlueRunner, "squad": squad_runner}


def runner_for(config, model_config: Callable[[], object] | None = None, task: str | None = None) -> TaskRunner:
    """The runner of ``task`` (default ``config.task``) for a run with settings ``config``.
    ``model_config``: returns the model's transformers config, for kinds that depend on it."""
    spec = get_task(task or config.task)
    if spec.kind not in RUNNERS:
        raise ValueError(f"no runner for task kind {spec.kind!r} (known: {sorted(RUNNERS)})")
    return RUNNERS[spec.kind](spec, config, model_config)
