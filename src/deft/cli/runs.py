"""``deft inspect``, ``deft density``, ``deft train``, ``deft compare``, ``deft eval``."""

from __future__ import annotations

import json
from pathlib import Path

from .format import comparison_table, density_summary, format_table, pct, write_json

# The library is imported inside the commands: `deft --help` stays fast (no torch import).


def finished_run(path):
    """``path`` as a :class:`~deft.training.RunDir` whose training finished; one clear line otherwise.

    A run stopped before its trained modules were saved (Ctrl-C, a crash, a killed job) holds
    ``run_config.json`` and checkpoints but no ``method/``: say so and how to continue it, before
    anything loads (loading it failed deep inside peft)."""
    from ..training import RunDir

    run = RunDir(path).check()
    if not (run / RunDir.METHOD).is_dir():
        compare = " (or rerun its `deft compare`, which resumes unfinished runs)" \
            if run.path.name.startswith(("peft-seed", "deft-seed")) else ""
        raise ValueError(f"{run} is an unfinished run (no trained model in {run / RunDir.METHOD}): continue it with "
                         f"`deft train --output {run} --resume` and the options it was started with "
                         f"({run / RunDir.CONFIG}){compare}")
    return run


# -- inspect ---------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from transformers import AutoModel

    from ..core.capture import site_calls
    from ..core.sites import find_sites
    from ..io.models import load_pretrained

    model = load_pretrained(AutoModel, args.model)
    sites = find_sites(model, args.point)
    calls = site_calls(model, sites)  # >1: one module shared by several layers (ALBERT)
    total = sum(p.numel() for p in model.parameters())
    parts = tuple(f"{path}." for s in sites for path in s.parts)  # first/up/down, or the experts module
    mlp = sum(p.numel() for n, p in model.named_parameters() if n.startswith(parts))
    payload = {
        "model": args.model, "model_type": sites.model_type, "class": type(model).__name__,
        "family_rule": sites.family, "point": sites.point, "gated": sites.gated, "experts": sites.experts,
        "parameters": {"total": total, "mlp": mlp},
        "sites": [{**s.to_dict(), "calls_per_forward": calls[i] if calls else None} for i, s in enumerate(sites)],
    }
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(f"model {args.model}: {type(model).__name__} (model_type {sites.model_type!r}), "
          f"family rule: {sites.family}{' (gated MLP)' if sites.gated else ''}, site point: {sites.point}"
          f"{f', mixture of experts: {sites.experts} routed experts per layer' if sites.experts else ''}")
    print(f"parameters: {total:,} total, {mlp:,} in MLP blocks ({100 * mlp / total:.1f}%)\n")
    print(format_table(["stack", "layer", "site", "width", "gated", "experts", "activation"],
                       [(s.stack, layer, s.module, s.width, "yes" if s.gated else "no", s.experts or "-", s.activation)
                        for s, layer in zip(sites, _layer_labels(sites, calls))]))
    if calls and any(c > 1 for c in calls):
        print("\nlayers a-b: one MLP module runs as several layers (shared weights); density and the loss count "
              "every call as its own layer")
    return 0


def _layer_labels(sites, calls: list[int] | None) -> list[str]:
    """Each site's layer; where a stack has a module that runs several times per forward (shared
    weights), the range of layers it serves, counted in forward order."""
    if not calls or all(c <= 1 for c in calls):
        return [str(s.layer) for s in sites]
    labels, seen = [], {}
    for s, c in zip(sites, calls):
        first = seen.get(s.stack, 0)
        seen[s.stack] = first + max(c, 1)
        labels.append(str(first) if c <= 1 else f"{first}-{first + c - 1}")
    return labels


# -- density ---------------------------------------------------------------------------------
def cmd_density(args) -> int:
    from ..core.evaluation import evaluate
    from ..core.sites import find_sites
    from ..io.models import load_for_sequence_classification, load_tokenizer
    from ..tasks import get_task, load_glue
    from ..tasks.runners.glue import make_loader, tokenize_glue
    from ..training import RunDir, load_run

    task = get_task(args.task)
    if task.kind != "glue":
        raise ValueError(f"deft density measures GLUE tasks; for {task.name} use deft eval on a trained run")
    split = task.resolve_split(args.split)
    is_run = RunDir(args.model).is_run()  # a saved fine-tuned run
    if is_run:
        finished_run(args.model)
    # 0 = all, as in eval; the data is read before any model loads.
    dataset = load_glue(task.name, split, data_dir=args.data_dir, max_samples=args.max_samples or None, seed=args.seed)
    if is_run:
        _, model, tokenizer = load_run(args.model)
    else:
        tokenizer = load_tokenizer(args.model, args.tokenizer)
        model = load_for_sequence_classification(args.model, task.num_labels, tokenizer=tokenizer)
    max_length = task.max_length if args.max_length is None else args.max_length
    loader = make_loader(tokenize_glue(dataset, tokenizer, max_length), tokenizer, args.batch_size)
    out = evaluate(model, loader, sites=find_sites(model, args.point), threshold=args.threshold,
                   desc=f"density {task.name}/{split}")
    density = out.density.to_dict()
    print(f"{args.model} on {task.name}/{split} ({len(dataset)} examples, real tokens only)\n")
    print(density_summary(density))
    write_json(args.json, {"model": args.model, "task": task.name, "split": split, "samples": len(dataset),
                           "point": args.point, "density": density})
    return 0


# -- train / compare / eval --------------------------------------------------------------------
# Command-line option → TrainConfig field; an option left unset keeps the config's own default,
# so `deft train X` and `train(TrainConfig(X))` are the same experiment.
TRAIN_OPTIONS = {
    "task": "task", "method": "method", "model": "model", "tokenizer": "tokenizer", "epochs": "epochs",
    "max_steps": "max_steps", "lr": "learning_rate", "batch_size": "batch_size", "eval_batch_size": "eval_batch_size",
    "max_length": "max_length", "max_eval_samples": "max_eval_samples", "lambda_warmup": "lambda_warmup",
    "grad_accum": "gradient_accumulation_steps", "threshold": "threshold", "evals_per_epoch": "evals_per_epoch",
    "seed": "seed", "data_dir": "data_dir", "point": "site_point", "ada_lr_scale": "ada_lr_scale",
    "activation": "activation", "activation_shift": "activation_shift", "train_density": "train_density",
    "train_density_start": "train_density_start", "train_density_ramp": "train_density_ramp",
    "tau_every": "tau_every", "save_steps": "save_steps", "train_density_form": "train_density_form",
    "neuron_fill": "neuron_fill", "holdout_samples": "holdout_samples",
    "neuron_rank": "neuron_rank", "neuron_rank_steps": "neuron_rank_steps", "distill_from": "distill_from",
    "distill_weight": "distill_weight", "distill_temperature": "distill_temperature",
}
DENSITY_OPTIONS = {"lam": "weight", "approx": "approx", "eps": "eps", "beta": "beta",
                   "encoder_weight": "encoder_weight", "decoder_weight": "decoder_weight",
                   "density_form": "form", "eps_final": "eps_final"}


def train_config(args):
    """The :class:`~deft.training.TrainConfig` of a ``train``/``compare`` command line."""
    from ..core.loss import DensityLossConfig
    from ..training import TrainConfig

    # Checked first, under the command line's names, before anything loads.
    for option, name in (("lam", "--lambda"), ("max_train_samples", "--max-train-samples"),
                         ("max_eval_samples", "--max-eval-samples")):
        if getattr(args, option, None) is not None and getattr(args, option) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(args, option)}")
    given = {field: getattr(args, option) for option, field in TRAIN_OPTIONS.items()
             if getattr(args, option, None) is not None}
    density = {field: getattr(args, option) for option, field in DENSITY_OPTIONS.items()
               if getattr(args, option, None) is not None}
    if density:
        given["density"] = DensityLossConfig(**density)
    if args.method_options is not None:
        try:
            given["method_options"] = json.loads(args.method_options)
        except json.JSONDecodeError as err:
            raise ValueError(f"--method-options is not valid JSON ({err}): e.g. '{{\"r\": 16}}'") from None
        if not isinstance(given["method_options"], dict):
            raise ValueError("--method-options must be a JSON object, e.g. '{\"r\": 16}'")
    for option in ("max_train_samples", "max_eval_samples"):
        if getattr(args, option) is not None:
            given[option] = getattr(args, option) or None  # 0 = the full set, as everywhere
    if getattr(args, "peft", False):
        given["mode"] = "peft"
    for flag in ("gradient_checkpointing", "ada"):
        if getattr(args, flag, False):
            given[flag] = True
    if getattr(args, "no_ste", False):
        given["ste"] = False
    return TrainConfig(**given)


def _print_run(results: dict) -> None:
    metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in results["metrics"].items() if isinstance(v, float)
                        and k not in ("loss",))
    d = results["density"]
    print(f"{results['mode'].upper()} {results['method']} on {results['task']} (seed {results['seed']}): {metrics}")
    print(f"density {pct(d['overall'])}, |a|>{d['threshold']['tau']:g} {pct(d['threshold']['overall'])}, "
          f"union/seq {pct(d['union']['overall'])}; trainable {results['trainable_params']:,} "
          f"({100 * results['trainable_share']:.2f}%)")


def cmd_train(args) -> int:
    from ..training import train

    results = train(train_config(args), args.output, resume=args.resume, overwrite=args.overwrite)
    _print_run(results)
    print(f"run saved in {args.output}")
    return 0


def cmd_compare(args) -> int:
    from ..training import compare

    payload = compare(train_config(args), args.seeds, args.output)
    print()
    print(comparison_table(payload))
    print(f"\nwrote {Path(args.output) / 'comparison.json'} and {Path(args.output) / 'density_per_layer.png'}")
    return 0


def _read_glue_split(task, split: str | None, data_dir: str | None) -> None:
    from ..tasks import load_glue

    from ..tasks.glue import HELDOUT_SPLIT

    load_glue(task.name, "train" if split == HELDOUT_SPLIT else split or task.dev_split, data_dir=data_dir)


def _read_squad_split(task, split: str | None, data_dir: str | None) -> None:
    from ..tasks import load_squad
    from ..tasks.squad import default_splits

    load_squad(split or default_splits(data_dir)[1], data_dir)


# Task kind → a read of the split `deft eval` will measure, done before the model loads so a bad split or
# missing data fails first (a GLUE tsv: milliseconds; SQuAD's json: seconds next to minutes of evaluation).
SPLIT_READERS = {"glue": _read_glue_split, "squad": _read_squad_split}


def cmd_eval(args) -> int:
    """One evaluation for every task kind: the task's runner measures metric and density."""
    from ..adaptive import skip_blocks
    from ..core.sites import find_sites
    from ..training import TrainConfig, load_run, task_runner

    run = finished_run(args.run)
    runner = task_runner(TrainConfig.from_dict(run.read_config()), args.task)
    if args.split:  # the runner's own names first: a GLUE run's "heldout" (--holdout-samples)
        getattr(runner, "resolve_split", runner.task.resolve_split)(args.split)
    if runner.task.kind in SPLIT_READERS:
        SPLIT_READERS[runner.task.kind](runner.task, args.split, args.data_dir or runner.config.data_dir)
    config, model, tokenizer = load_run(args.run)
    if config.site_point != runner.config.site_point:  # product thresholds: measured where the zeros are
        runner = task_runner(config, args.task)
    skipped = []
    if args.skip_threshold is not None:
        sites = find_sites(model, config.site_point)
        skipped = [s.module for s in skip_blocks(model, sites, args.skip_threshold)]
        print(f"skipped {len(skipped)} of {len(sites)} MLP blocks (|α| < {args.skip_threshold:g})")
    out = runner.evaluate_model(model, tokenizer, split=args.split, data_dir=args.data_dir,
                                max_samples=args.max_samples, batch_size=args.batch_size, threshold=args.threshold)
    task = runner.task
    print(f"{args.run}: {config.mode.upper()} {config.method} on {task.name}/{out.split} ({out.samples} examples)")
    for key, value in out.extra.items():
        print(f"{key}: {value}")
    print(", ".join(f"{k} {100 * v:.2f}" for k, v in out.metrics.items()) + "\n")
    print(density_summary(out.density))
    write_json(args.json, {"run": str(args.run), "task": task.name, "split": out.split, "metrics": out.metrics,
                           "density": out.density, **out.extra,
                           "skip_threshold": args.skip_threshold, "skipped": skipped})
    return 0
