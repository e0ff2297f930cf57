"""The energy model (:mod:`deft.analysis.energy`) applied to saved runs and base models:
``deft energy`` and ``benchmarks/efficiency.py``."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torch import nn
from tqdm.auto import tqdm

from ..io.models import load_for_sequence_classification, load_tokenizer
from ..tasks import get_task
from ..tasks.runners.glue import GlueRunner, without_labels
from ..training import RunDir, TrainConfig, load_run, task_runner
from .energy import estimate_energy

# Hub model wrappers add these in front of the transformers model's own paths.
_WRAPPER_PREFIX = re.compile(r"^(base_model\.model\.)+")
_BLOCK = re.compile(r"^(.*?\.\d+)(?=[.:]|$)")


def glue_runner(config: TrainConfig, what: str) -> GlueRunner:
    """The run's task runner, which must be GLUE's (the energy and pruning analyses read GLUE data)."""
    runner = task_runner(config)
    if not isinstance(runner, GlueRunner):
        raise ValueError(f"{what} measures GLUE tasks; {config.task!r} is a {runner.task.kind} task")
    return runner


@dataclass
class Subject:
    """What ``deft energy`` measures: a loaded run or base model, and the settings that feed it
    (the run's, or defaults for a base model)."""

    name: str
    model: nn.Module
    tokenizer: object
    task: object
    config: TrainConfig
    info: dict


def load_subject(*, run: str | None = None, model: str | None = None, tokenizer: str | None = None,
                 task: str | None = None, data_dir: str | None = None, max_length: int | None = None) -> Subject:
    """A saved run (``run``) or a base model with a fresh task head (``model`` + ``task``)."""
    if run is not None:
        config, net, tok = load_run(RunDir(run).check())
        spec = get_task(task or config.task)
        feed = replace(config, task=spec.name, max_length=max_length or config.max_length,
                       data_dir=data_dir or config.data_dir)
        return Subject(str(run), net, tok, spec, feed,
                       {"run": str(run), "mode": config.mode, "method": config.method, "model": config.model,
                        "task": config.task})
    if model is None or task is None:
        raise ValueError("give --run DIR, or --model M with --task T")
    spec = get_task(task)
    tok = load_tokenizer(model, tokenizer)
    net = load_for_sequence_classification(model, spec.num_labels, tokenizer=tok)
    net.eval()
    feed = TrainConfig(task=spec.name, model=model, tokenizer=tokenizer, max_length=max_length or 128,
                       data_dir=data_dir)
    return Subject(model, net, tok, spec, feed, {"model": model, "task": spec.name})


def measure_energy(subject: Subject, *, split: str | None = None, max_samples: int | None = None,
                   batch_size: int = 1, seed: int = 0, config=None, progress: bool = True):
    """(EnergyReport, number of inputs, split) of ``subject`` on a GLUE split (default: dev)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    task = subject.task
    split = task.resolve_split(split) if split else task.dev_split
    data, loader = glue_runner(subject.config, "energy").loader(subject.tokenizer, split, max_samples=max_samples,
                                                                batch_size=batch_size, seed=seed)
    batches = tqdm(without_labels(loader), total=len(loader), desc=f"energy {subject.name}", disable=not progress,
                   leave=False)
    return estimate_energy(subject.model, batches, config), len(data), split


def _block(name: str) -> str:
    """The block a module or attention product belongs to: the path up to the first layer
    index (``bert.encoder.layer.3``), else its parent (``bert.embeddings``) or itself."""
    name = _WRAPPER_PREFIX.sub("", name)
    m = _BLOCK.match(name)
    if m:
        return m.group(1)
    path = name.split(":")[0]
    return path.rsplit(".", 1)[0] if "." in path else path


def block_breakdown(report: dict) -> list[dict]:
    """Per-layer rows of an ``EnergyReport.to_dict()`` summed per (block, kind), in forward order.

    Blocks (:func:`_block`) hold the peft/adapter modules of their layer too, and the peft
    wrapper's path prefix is dropped, so runs of different methods line up row by row.
    """
    rows: dict[tuple[str, str], dict] = {}
    for r in report["per_layer"]:
        block = _block(r["name"])
        agg = rows.setdefault((block, r["kind"]), {"block": block, "kind": r["kind"], "modules": 0,
                                                   "dense": 0.0, "sparse": 0.0})
        agg["modules"] += 1
        agg["dense"] += r["dense"]
        agg["sparse"] += r["sparse"]
    total = report["dense_energy_pj"] or 1.0
    for agg in rows.values():
        agg["ratio"] = agg["sparse"] / agg["dense"] if agg["dense"] else 1.0
        agg["share"] = agg["dense"] / total
    return list(rows.values())
