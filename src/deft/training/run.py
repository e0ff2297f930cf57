"""Training one run (PEFT or DEFT) and rebuilding a trained one: :func:`train`, :func:`load_run`.

What a run directory holds is :class:`~deft.training.rundir.RunDir`'s; the Trainer with the
density term is :mod:`deft.training.trainer`; what differs between task kinds is the task's
runner (:mod:`deft.tasks.runners`).
"""

from __future__ import annotations

import json
from dataclasses import replace
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..adaptive import AdaptiveConfig, apply_adaptive, checkpoint_callback, frozen_alphas, load_adaptive
from ..core.relufication import relufy
from ..core.sites import find_sites
from ..core.thresholds import applied_thresholds
from ..io.models import ensure_pad_token, load_tokenizer, model_load_errors, resolve_model_path
from ..methods import get_method, trainable_parameters
from ..tasks.runners import TaskRunner, runner_for
from .config import TrainConfig
from .distill import check_teacher, frozen_teacher
from .rundir import RunDir
from .schedules import add_in_loop_thresholds, epsilon_schedule, threshold_schedule, to_deployed
from .trainer import make_deft_trainer


def task_runner(config: TrainConfig, task: str | None = None) -> TaskRunner:
    """The runner of ``task`` (default the run's) with this run's settings; runners that depend on
    the architecture (task ``squad``) read the model's config when they need it."""

    def model_config():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_model_path(config.model))

    return runner_for(config, model_config, task)


def build_model(config: TrainConfig, tokenizer, runner: TaskRunner):
    """Base model for the task, loaded the way the method needs (e.g. 4-bit for QLoRA)."""
    from transformers.utils import logging as hf_logging

    method = get_method(config.method)
    method_config = method.resolve_config(config.method_options or None)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a base checkpoint's task head is new by design; no load report
    source = resolve_model_path(config.model)
    kwargs = runner.model_kwargs()
    try:
        with model_load_errors(config.model, source, kwargs.get("num_labels")):  # e.g. a head for other labels
            model = method.load_base(source, runner.auto_class(), method_config, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    ensure_pad_token(model, tokenizer)
    relufy(model, config.activation, config.activation_shift)  # before the method: its modules stay as they are
    return method, method_config, model


def train(config: TrainConfig, output_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Train one run (PEFT or DEFT) and write the run directory; returns ``results.json``'s content.

    A directory that already holds a run is refused unless ``resume`` (same settings: continue from
    its last checkpoint) or ``overwrite`` (replace it; its checkpoints are deleted first, so a later
    resume can never pick up the replaced run's weights).
    """
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    run = RunDir(output_dir)
    out = run.path
    # Under torchrun only rank 0 judges the directory: another rank that starts late would find the
    # run_config.json rank 0 has just written and refuse its own job (rank 0's refusal stops them all).
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process and run.is_run() and not resume and not overwrite:
        raise ValueError(f"{out} already holds a run ({RunDir.CONFIG}); --resume continues it, --overwrite "
                         "replaces it, or choose another --output")
    if main_process and resume and run.is_run():
        # read through from_dict: a run saved before a defaulted setting existed resumes with its default
        saved = TrainConfig.from_dict(run.read_config()).to_dict()
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(config.to_dict())):
            raise ValueError(f"--resume: {run / RunDir.CONFIG} was written with different settings; "
                             "resume with the same options or use a new --output")
    if config.distill_from:
        check_teacher(config.distill_from, config)  # a wrong teacher fails before any data or model loads
    runner = task_runner(config)
    task = runner.task
    tokenizer = load_tokenizer(config.model, config.tokenizer)
    # The data first: a missing split or an empty file fails before a model loads or anything is written.
    train_set, dev_set = runner.datasets(tokenizer)
    if len(train_set) == 0 or len(dev_set) == 0:
        raise ValueError(f"no {'training' if len(train_set) == 0 else 'evaluation'} examples for task {task.name} "
                         f"(data dir {config.data_dir or 'the hub'}): the file holds a header only?")
    set_seed(config.seed)
    method, method_config, model = build_model(config, tokenizer, runner)  # may fail: nothing written yet
    teacher = load_teacher(config) if config.distill_from else None  # so may this
    if overwrite and not resume and run.checkpoints.is_dir() and main_process:
        shutil.rmtree(run.checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        run.write_json(RunDir.CONFIG, config.to_dict())
    model = method.apply(model, method_config, task_type=runner.task_type)
    sites = find_sites(model, config.site_point)
    # α after the method: peft freezes every parameter that exists when it wraps the model.
    adaptive = apply_adaptive(model, sites, AdaptiveConfig(
        init=config.ada_init, init_std=config.ada_init_std, seed=config.seed,
        lr_scale=config.ada_lr_scale)) if config.ada else None
    in_loop = add_in_loop_thresholds(model, sites, config.ste, config.train_density, config.train_density_form,
                                     config.neuron_fill) if config.train_density is not None else {}
    trainable, total = trainable_parameters(model)

    steps_per_epoch = math.ceil(len(train_set) / (config.batch_size * config.gradient_accumulation_steps))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    eval_every = max(1, steps_per_epoch // config.evals_per_epoch)
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(run.checkpoints),
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
        save_strategy="steps", save_steps=config.save_steps or eval_every, save_total_limit=2,
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
        lambda_warmup_steps=int(config.lambda_warmup * total_steps), loss_counts_items=runner.loss_counts_items,
        model=model, args=args, train_dataset=train_set, eval_dataset=dev_set,
        data_collator=runner.collator(tokenizer, model), compute_metrics=runner.compute_metrics(),
        processing_class=tokenizer, teacher=teacher, distill_weight=config.distill_weight,
        distill_temperature=config.distill_temperature,
        callbacks=[checkpoint_callback(adaptive)] if adaptive else None,
    )
    if in_loop:
        trainer.add_callback(threshold_schedule(
            model, sites, in_loop, target=config.train_density, start=config.train_density_start,
            ramp=config.train_density_ramp, every=config.tau_every, total_steps=total_steps,
            form=config.train_density_form, fill=config.neuron_fill, rank=config.neuron_rank,
            window=config.neuron_rank_steps))
    if config.density_loss is not None and config.density.eps_final is not None:
        trainer.add_callback(epsilon_schedule(trainer.capture, config.density, total_steps))
    checkpoint = get_last_checkpoint(args.output_dir) if resume and Path(args.output_dir).is_dir() else None
    if resume and progress and main_process:  # say what --resume found
        print(f"resuming from {checkpoint}" if checkpoint else
              f"--resume: no checkpoint in {args.output_dir} yet, training from the start", file=sys.stderr)
    started = time.perf_counter()
    if adaptive and checkpoint and (Path(checkpoint) / RunDir.ADAPTIVE).is_dir():
        adaptive.load(Path(checkpoint) / RunDir.ADAPTIVE)  # peft checkpoints hold no α
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - started
    trainer.capture.detach()
    thresholds = to_deployed(model, in_loop, config.train_density) if in_loop else None

    metrics = runner.final_metrics(trainer, dev_set)
    main_process = trainer.is_world_process_zero()  # under torchrun every rank gets here; one writes
    if main_process:
        with frozen_alphas(model):  # α lives in adaptive/, not in the method's checkpoint
            method.save(model, run / RunDir.METHOD)
        if adaptive:
            adaptive.save(run / RunDir.ADAPTIVE)
        if thresholds is not None:  # the run loads with the thresholds it trained with
            thresholds.save(run.path)
        run.write_json(RunDir.HISTORY, trainer.state.log_history)
    results = {
        "task": task.name, "model": config.model, "method": config.method, "mode": config.mode,
        "seed": config.seed, "metrics": metrics, "main_metric": task.main_metric,
        "density": runner.final_density if runner.final_density is not None else trainer.last_density,
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "train_seconds": train_seconds, "steps": trainer.state.global_step,
        "train_samples": len(train_set), "eval_samples": len(dev_set), "resumed_from": checkpoint,
        **runner.result_fields(),
        "alphas": adaptive.report() if adaptive else None,
        "thresholds": {**thresholds.summary(), "taus": thresholds.taus} if thresholds is not None else None,
        "config": config.to_dict(),
    }
    if main_process:
        run.write_json(RunDir.RESULTS, results)
    return results


def load_teacher(config: TrainConfig) -> nn.Module:
    """The run ``config`` distils from (:mod:`deft.training.distill`), frozen in evaluation mode."""
    path = check_teacher(config.distill_from, config)
    # A fork of the RNG: loading the teacher (its head is drawn, then overwritten) must not change
    # the student's data order or dropout.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        _, teacher, _ = load_run(path)
    return frozen_teacher(teacher)


def load_run(run_dir: str | Path) -> tuple[TrainConfig, nn.Module, object]:
    """Rebuild a trained run: (config, model with its trained modules, tokenizer)."""
    run = RunDir(run_dir).check()
    config = TrainConfig.from_dict(run.read_config())
    tokenizer = load_tokenizer(config.model, config.tokenizer)
    method, _, base = build_model(config, tokenizer, task_runner(config))
    model = method.load(base, run / RunDir.METHOD)
    if config.ada:
        load_adaptive(model, run / RunDir.ADAPTIVE, find_sites(model, config.site_point))
    model = run.apply_pruned(model)  # a `deft prune` output: merged, pruned weights
    model = run.apply_thresholds(model)  # a `deft sparsify` output: exact zeros under τ
    applied = applied_thresholds(model)
    if applied and applied.get("point") and applied["point"] != config.site_point:
        config = replace(config, site_point=applied["point"])  # density is read where the deployed zeros are
    model = run.apply_shrink(model)  # a `deft shrink` output: merged, dead MLP neurons removed
    model.eval()
    return config, model, tokenizer
