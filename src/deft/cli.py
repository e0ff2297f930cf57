"""The ``deft`` command: a thin shell over the library."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .models import DEFAULT_MODEL, ModelNotAvailableError
from .report import density_summary, format_table, pct


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


# -- inspect ---------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from transformers import AutoModel

    from .models import load_pretrained
    from .sites import find_sites

    model = load_pretrained(AutoModel, args.model)
    sites = find_sites(model, args.point)
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for n, p in model.named_parameters()
              if any(n.startswith(f"{s.first}.") or (s.down and n.startswith(f"{s.down}.")) or
                     (s.mult and n.startswith(f"{s.mult}.")) for s in sites))
    payload = {
        "model": args.model, "model_type": sites.model_type, "class": type(model).__name__,
        "family_rule": sites.family, "point": sites.point, "gated": sites.gated,
        "parameters": {"total": total, "mlp": mlp},
        "sites": [s.to_dict() for s in sites],
    }
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(f"model {args.model}: {type(model).__name__} (model_type {sites.model_type!r}), "
          f"family rule: {sites.family}{' (gated MLP)' if sites.gated else ''}, site point: {sites.point}")
    print(f"parameters: {total:,} total, {mlp:,} in MLP blocks ({100 * mlp / total:.1f}%)\n")
    print(format_table(["stack", "layer", "site", "width", "activation"],
                       [(s.stack, s.layer, s.module, s.width, s.activation) for s in sites]))
    return 0


# -- density ---------------------------------------------------------------------------------
def cmd_density(args) -> int:
    from .evaluation import evaluate, make_loader, tokenize_glue
    from .models import load_for_sequence_classification, load_tokenizer
    from .sites import find_sites
    from .tasks import get_task, load_glue

    task = get_task(args.task)
    if getattr(task, "kind", "glue") != "glue":
        raise ValueError(f"deft density measures GLUE tasks; for {task.name} use deft eval on a trained run")
    split = task.resolve_split(args.split)
    dataset = load_glue(task.name, split, data_dir=args.data_dir, max_samples=args.max_samples, seed=args.seed)
    if (Path(args.model) / "run_config.json").exists():  # a saved fine-tuned run
        from .train import load_run

        _, model, tokenizer = load_run(args.model)
    else:
        tokenizer = load_tokenizer(args.model, args.tokenizer)
        model = load_for_sequence_classification(args.model, task.num_labels, tokenizer=tokenizer)
    loader = make_loader(tokenize_glue(dataset, tokenizer, args.max_length), tokenizer, args.batch_size)
    out = evaluate(model, loader, sites=find_sites(model, args.point), threshold=args.threshold,
                   desc=f"density {task.name}/{split}")
    density = out.density.to_dict()
    print(f"{args.model} on {task.name}/{split} ({len(dataset)} examples, real tokens only)\n")
    print(density_summary(density))
    _write_json(args.json, {"model": args.model, "task": task.name, "split": split, "samples": len(dataset),
                            "point": args.point, "density": density})
    return 0


# -- train / compare / eval --------------------------------------------------------------------
DEFAULT_EPS = 0.1  # the GLUE table's setting: the best metric/density trade-off of our short-run probes
# LoRA also on the MLP's first dense layer by default: q/v-only LoRA barely learns in a laptop-sized run.
DEFAULT_METHOD_OPTIONS = {"lora": {"include_mlp": True}, "qlora": {"include_mlp": True}}
DEFAULT_LR = 1e-3
# Per-method training defaults for a laptop-sized run (63 steps on MiniLM SST-2), from probes there
# (README, Training): LoRA learns far faster at 5e-3 than 1e-3 (PEFT 80.73% vs 75.92%; MRPC
# leaves the majority class). The zero-initialised bottleneck adapter does not move at 1e-3
# (50.92%, majority class) but reaches 81.31% at 1e-2; at that rate DEFT with λ = 1 from step 0
# collapses to one class, while ramping λ over the first half keeps 79.24%.
METHOD_TRAINING_DEFAULTS = {"lora": {"learning_rate": 5e-3}, "qlora": {"learning_rate": 5e-3},
                            "adapter": {"learning_rate": 1e-2, "lambda_warmup": 0.5}}


def method_training_default(method: str, name: str, given=None):
    """``given`` if set, else the method's short-run default for ``name`` (learning_rate, lambda_warmup)."""
    if given is not None:
        return given
    fallback = {"learning_rate": DEFAULT_LR, "lambda_warmup": 0.0}[name]
    return METHOD_TRAINING_DEFAULTS.get(method.lower(), {}).get(name, fallback)


def _task_max_length(task_name: str) -> int:
    """The task's standard maximum input length (SQuAD specs carry 384; GLUE's is 128)."""
    from .tasks import get_task

    return getattr(get_task(task_name), "max_length", 128)


def _train_config(args):
    from .loss import DensityLossConfig
    from .train import TrainConfig

    eps = args.eps if args.eps is not None or args.approx != "l0" else DEFAULT_EPS
    density = DensityLossConfig(weight=args.lam, approx=args.approx, eps=eps, beta=args.beta,
                                encoder_weight=args.encoder_weight, decoder_weight=args.decoder_weight)
    options = json.loads(args.method_options) if args.method_options else \
        dict(DEFAULT_METHOD_OPTIONS.get(args.method.lower(), {}))
    return TrainConfig(
        task=args.task, method=args.method, mode="peft" if getattr(args, "peft", False) else "deft",
        model=args.model, tokenizer=args.tokenizer, method_options=options, density=density, epochs=args.epochs,
        max_steps=args.max_steps, learning_rate=method_training_default(args.method, "learning_rate", args.lr),
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, max_length=args.max_length or _task_max_length(args.task),
        max_train_samples=args.max_train_samples or None,
        max_eval_samples=args.max_eval_samples,
        lambda_warmup=method_training_default(args.method, "lambda_warmup", args.lambda_warmup),
        gradient_accumulation_steps=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing,
        threshold=args.threshold, evals_per_epoch=args.evals_per_epoch, seed=getattr(args, "seed", 0), data_dir=args.data_dir,
        site_point=args.point, ada=getattr(args, "ada", False), ada_lr_scale=getattr(args, "ada_lr_scale", 1.0))


def _print_run(results: dict) -> None:
    metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in results["metrics"].items() if isinstance(v, float)
                        and k not in ("loss",))
    d = results["density"]
    print(f"{results['mode'].upper()} {results['method']} on {results['task']} (seed {results['seed']}): {metrics}")
    print(f"density {pct(d['overall'])}, |a|>{d['threshold']['tau']:g} {pct(d['threshold']['overall'])}, "
          f"union/seq {pct(d['union']['overall'])}; trainable {results['trainable_params']:,} "
          f"({100 * results['trainable_share']:.2f}%)")


def cmd_train(args) -> int:
    from .train import train

    results = train(_train_config(args), args.output, resume=args.resume)
    _print_run(results)
    print(f"run saved in {args.output}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, comparison_table

    config = _train_config(args)
    payload = compare(config, args.seeds, args.output)
    print()
    print(comparison_table(payload))
    print(f"\nwrote {Path(args.output) / 'comparison.json'} and {Path(args.output) / 'density_per_layer.png'}")
    return 0


def _eval_through_runner(args, config, model, tokenizer, task) -> int:
    """``deft eval`` for task kinds whose runner measures metric and density itself."""
    from dataclasses import replace

    from .sites import find_sites
    from .train import task_runner

    runner = task_runner(replace(config, task=task.name))
    skipped = []
    if getattr(args, "skip_threshold", None) is not None:
        from .adaptive import skip_blocks

        sites = find_sites(model, config.site_point)
        skipped = [s.module for s in skip_blocks(model, sites, args.skip_threshold)]
        print(f"skipped {len(skipped)} of {len(sites)} MLP blocks (|α| < {args.skip_threshold:g})")
    out = runner.evaluate_model(model, tokenizer, split=args.split, data_dir=args.data_dir,
                                max_samples=args.max_samples, batch_size=args.batch_size, threshold=args.threshold)
    print(f"{args.run}: {config.mode.upper()} {config.method} on {task.name}/{out.split} ({out.samples} examples)")
    for key, value in out.extra.items():
        print(f"{key}: {value}")
    print(", ".join(f"{k} {100 * v:.2f}" for k, v in out.metrics.items()) + "\n")
    print(density_summary(out.density))
    _write_json(args.json, {"run": str(args.run), "task": task.name, "split": out.split, "metrics": out.metrics,
                            "density": out.density, **out.extra,
                            "skip_threshold": getattr(args, "skip_threshold", None), "skipped": skipped})
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate, make_loader, tokenize_glue
    from .sites import find_sites
    from .tasks import compute_glue_metrics, get_task, load_glue, predictions_from_logits
    from .train import load_run

    config, model, tokenizer = load_run(args.run)
    task = get_task(args.task or config.task)
    if getattr(task, "kind", "glue") != "glue":  # tasks whose runner evaluates (SQuAD)
        return _eval_through_runner(args, config, model, tokenizer, task)
    split = task.resolve_split(args.split) if args.split else task.dev_split
    max_samples = args.max_samples
    if max_samples is None and task.name == config.task and split == task.dev_split:
        max_samples = config.max_eval_samples  # the run's own evaluation subset (same seed), so eval reproduces it
    max_samples = max_samples or None  # 0 = all
    data = load_glue(task.name, split, data_dir=args.data_dir or config.data_dir, max_samples=max_samples,
                     seed=config.seed)
    loader = make_loader(tokenize_glue(data, tokenizer, config.max_length), tokenizer, args.batch_size)
    sites = find_sites(model, config.site_point)  # found before skipping: skipped sites then measure 0
    skipped = []
    if args.skip_threshold is not None:
        from .adaptive import skip_blocks

        skipped = [s.module for s in skip_blocks(model, sites, args.skip_threshold)]
        print(f"skipped {len(skipped)} of {len(sites)} MLP blocks (|α| < {args.skip_threshold:g})")
    out = evaluate(model, loader, sites=sites, threshold=args.threshold)
    metrics = compute_glue_metrics(task.name, predictions_from_logits(task.name, out.logits), out.labels)
    density = out.density.to_dict()
    print(f"{args.run}: {config.mode.upper()} {config.method} on {task.name}/{split} ({len(data)} examples)")
    print(", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()) + "\n")
    print(density_summary(density))
    _write_json(args.json, {"run": str(args.run), "task": task.name, "split": split, "metrics": metrics,
                            "density": density, "skip_threshold": args.skip_threshold, "skipped": skipped})
    return 0


def model_args(p):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in alias, local directory or hub name (default: {DEFAULT_MODEL})")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or directory, if the model has none")
    p.add_argument("--point", choices=("act", "product"), default="act",
                   help="gated MLPs: measure σ's output (act, default) or the gated product")


def train_args(p):
    from .methods import METHODS
    from .tasks import TASKS

    model_args(p)
    p.add_argument("--task", default="sst2", help=f"one of {', '.join(sorted(TASKS))} (default sst2)")
    p.add_argument("--method", default="lora", help=f"one of {', '.join(sorted(METHODS))} (default lora)")
    p.add_argument("--method-options", default=None, metavar="JSON",
                   help='method config as JSON, e.g. {"r": 16} (lora/qlora default: {"include_mlp": true})')
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="λ, weight of the density loss")
    p.add_argument("--approx", default="l0", help="density approximation: l0, tanh, sigmoid, l1")
    p.add_argument("--eps", type=float, default=None,
                   help=f"ε of the l0 approximation (default {DEFAULT_EPS:g}; the paper's 1e-7 barely moves "
                        "GELU models in a short run)")
    p.add_argument("--beta", type=float, default=None, help="β of the tanh/sigmoid approximation")
    p.add_argument("--encoder-weight", type=float, default=1.0)
    p.add_argument("--decoder-weight", type=float, default=1.0)
    p.add_argument("--lambda-warmup", type=float, default=None,
                   help="ramp λ from 0 over this share of steps (default 0; adapter 0.5)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default: lora/qlora 5e-3, adapter 1e-2, others {DEFAULT_LR:g})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--max-length", type=int, default=None,
                   help="maximum input tokens (default: the task's, 128 for GLUE, 384 for SQuAD)")
    p.add_argument("--max-train-samples", type=int, default=2000,
                   help="training subset size (default 2000 — a laptop-sized run; 0 = the full set)")
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--threshold", type=float, default=1e-2, help="τ of the threshold density")
    p.add_argument("--evals-per-epoch", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="data directory (default: $DEFT_DATA_DIR, else the hub)")
    p.add_argument("--ada", action="store_true",
                   help="ADA-PEFT / ADA-DEFT: a trainable weight α per MLP block (blocks can then be skipped)")
    p.add_argument("--ada-lr-scale", type=float, default=1.0, help="α learns this many times faster (Adam)")


# Command groups that live in their own modules; each module has add_commands(subparsers).
COMMAND_MODULES: tuple[str, ...] = ("deft.cli_efficiency", "deft.cli_adaptive")


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deft", description="Density-efficient fine-tuning of transformers.")
    parser.add_argument("--version", action="version", version=f"deft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a model's MLP activation sites")
    model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("density", help="measure activation density of a model on a dataset")
    model_args(p)
    p.add_argument("--task", required=True, help="task name, e.g. sst2")
    p.add_argument("--split", default="dev")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threshold", type=float, default=1e-2, help="τ of the threshold density |a| > τ")
    p.add_argument("--data-dir", default=None, help="GLUE data directory (default: $DEFT_DATA_DIR, else the hub)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-samples subset")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=cmd_density)

    p = sub.add_parser("train", help="train one PEFT or DEFT run")
    train_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--deft", action="store_true", help="with the density loss (default)")
    mode.add_argument("--peft", action="store_true", help="without the density loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="PEFT vs DEFT with identical settings (the main job)")
    train_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--output", default="runs/compare", help="directory for the runs and comparison.json")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="reload a saved run and re-measure metric and density")
    p.add_argument("--run", required=True)
    p.add_argument("--task", default=None)
    p.add_argument("--split", default=None)
    p.add_argument("--max-samples", type=int, default=None,
                   help="evaluation examples (default: the run's own evaluation subset; 0 = all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threshold", type=float, default=1e-2)
    p.add_argument("--skip-threshold", type=float, default=None,
                   help="ADA runs: remove the MLP blocks with |α| below this (see deft.adaptive)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, metavar="FILE")
    p.set_defaults(func=cmd_eval)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that end a command with a one-line message instead of a traceback.

    Evaluated only when an exception propagates, so `deft --help` does not import torch.
    """
    from .tasks.hub import DataNotAvailableError
    from .train import NonFiniteLossError

    return (ModelNotAvailableError, DataNotAvailableError, NonFiniteLossError, ValueError, FileNotFoundError, KeyError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # bitsandbytes (imported by peft) warns at import on every CPU machine that its optional hub-fetched
    # `kernels` package is absent; it then uses its built-in CPU path, which is what QLoRA runs on here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"deft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
