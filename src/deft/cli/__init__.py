"""The ``deft`` command: argparse and printing over the library (:mod:`deft`)."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import sys

from .. import __version__
from ..io.models import DEFAULT_MODEL, ModelNotAvailableError
from .runs import cmd_compare, cmd_density, cmd_eval, cmd_inspect, cmd_train, train_config

__all__ = ["build_parser", "main", "train_config"]

# Old spellings of options, still accepted but left out of --help (--output everywhere; `load --export`).
DEPRECATED_ALIASES = ("--out", "--dir")


class _HelpFormatter(argparse.HelpFormatter):
    """Help without the deprecated aliases (usage names an option by its first spelling anyway)."""

    def _format_action_invocation(self, action):
        if set(action.option_strings) & set(DEPRECATED_ALIASES):
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in DEPRECATED_ALIASES]
        return super()._format_action_invocation(action)


class _Parser(argparse.ArgumentParser):
    """Bad command lines end in one line on stderr, exit 2, like every other bad input."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)  # subcommand parsers are built by this class too
        super().__init__(*args, **kwargs)

    def error(self, message):
        for alias in DEPRECATED_ALIASES:  # "required: --output/--out" names the option as --help does
            message = message.replace(f"/{alias}", "")
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def model_args(p):
    from ..training import field_default

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="built-in alias, local directory or hub name (default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or directory, for a model directory that has none (default: the model's)")
    p.add_argument("--point", choices=("act", "product"), default=field_default("site_point"),
                   help="gated MLPs: measure σ's output (act) or the gated product (default: %(default)s)")


def train_args(p):
    """Options of ``train``/``compare``; unset options keep :class:`~deft.training.TrainConfig`'s defaults."""
    from ..core.approx import APPROXIMATIONS, DEFAULT_L0_EPS, PAPER_L0_EPS
    from ..core.loss import DensityLossConfig
    from ..methods import METHODS
    from ..tasks import TASKS
    from ..training import METHOD_PRESETS, field_default
    from ..training.config import PRESET_FALLBACK

    d = field_default
    loss = DensityLossConfig.__dataclass_fields__
    beta = APPROXIMATIONS["tanh"].__dataclass_fields__["beta"].default
    lrs = ", ".join(f"{m} {v['learning_rate']:g}" for m, v in METHOD_PRESETS.items())
    warmups = "".join(f"; {m} {v['lambda_warmup']:g}" for m, v in METHOD_PRESETS.items() if "lambda_warmup" in v)
    options = "; ".join(f"{m} {json.dumps(v['method_options'])}" for m, v in METHOD_PRESETS.items()
                        if "method_options" in v)
    lengths = ", ".join(f"{kind} {n}" for kind, n in {t.kind: t.max_length for t in TASKS.values()}.items())
    model_args(p)
    p.add_argument("--task", default=None, help=f"one of {', '.join(sorted(TASKS))} (default {d('task')})")
    p.add_argument("--method", default=None, help=f"one of {', '.join(sorted(METHODS))} (default {d('method')})")
    p.add_argument("--method-options", default=None, metavar="JSON",
                   help=f'method config as JSON, e.g. {{"r": 16}} (default: the method\'s preset, {options}; '
                        f'others {json.dumps(PRESET_FALLBACK["method_options"])})')
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help=f"λ, weight of the density loss (default {loss['weight'].default:g})")
    p.add_argument("--approx", default=None,
                   help=f"density approximation: {', '.join(APPROXIMATIONS)} (default {loss['approx'].default})")
    p.add_argument("--eps", type=float, default=None,
                   help=f"ε of the l0 approximation (default {DEFAULT_L0_EPS:g}; the paper's {PAPER_L0_EPS:g} barely "
                        "moves GELU models in a short run)")
    p.add_argument("--beta", type=float, default=None, help=f"β of the tanh/sigmoid approximation (default {beta:g})")
    p.add_argument("--encoder-weight", type=float, default=None,
                   help=f"weight of the encoder stack's term (default {loss['encoder_weight'].default:g})")
    p.add_argument("--decoder-weight", type=float, default=None,
                   help=f"weight of the decoder stack's term (default {loss['decoder_weight'].default:g})")
    p.add_argument("--lambda-warmup", type=float, default=None,
                   help=f"ramp λ from 0 over this share of steps "
                        f"(default {PRESET_FALLBACK['lambda_warmup']:g}{warmups})")
    p.add_argument("--epochs", type=float, default=None, help=f"training epochs (default {d('epochs'):g})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: the epochs')")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: {lrs}, others {PRESET_FALLBACK['learning_rate']:g})")
    p.add_argument("--batch-size", type=int, default=None, help=f"training batch size (default {d('batch_size')})")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help=f"evaluation batch size (default {d('eval_batch_size')})")
    p.add_argument("--grad-accum", type=int, default=None,
                   help=f"gradient accumulation steps (default {d('gradient_accumulation_steps')})")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"maximum input tokens (default: the task's: {lengths})")
    p.add_argument("--max-train-samples", type=int, default=None,
                   help=f"training subset size (default {d('max_train_samples')} — a laptop-sized run; 0 = the full set)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="evaluation subset size (default: all; 0 = all)")
    p.add_argument("--holdout-samples", type=int, default=None,
                   help="GLUE: set this many training examples aside, never trained on (split 'heldout' of "
                        "deft eval / density-sweep), to choose a density on without touching dev "
                        f"(default {d('holdout_samples')})")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"τ of the reported |a| > τ density (default {d('threshold'):g})")
    p.add_argument("--evals-per-epoch", type=int, default=None,
                   help=f"evaluations (and checkpoints) per epoch (default {d('evals_per_epoch')})")
    p.add_argument("--save-steps", type=int, default=None,
                   help="checkpoint every this many steps, for --resume (default: at every evaluation)")
    p.add_argument("--data-dir", default=None, help="data directory (default: $DEFT_DATA_DIR, else the hub)")
    p.add_argument("--ada", action="store_true",
                   help="ADA-PEFT / ADA-DEFT: a trainable weight α per MLP block (blocks can then be skipped)")
    p.add_argument("--ada-lr-scale", type=float, default=None,
                   help=f"α learns this many times faster (Adam; default {d('ada_lr_scale'):g})")
    g = p.add_argument_group("training for deployment (exact zeros a kernel can skip; README, Deployed sparsity)")
    g.add_argument("--density-form", default=None, choices=("token", "sequence"),
                   help="density term per entry (token) or per neuron's RMS over a sequence's real tokens "
                        f"(sequence: silences neurons for whole sequences; default {loss['form'].default})")
    g.add_argument("--eps-final", type=float, default=None,
                   help="anneal the l0 ε geometrically from --eps to this value over training "
                        "(default: none, ε constant)")
    g.add_argument("--train-density", type=float, default=None,
                   help="threshold in the loop: zero |a| <= τ_l in the forward at this target density (0, 1]; "
                        "τ_l re-calibrated during training and saved with the run "
                        "(default: none, no thresholds in the loop)")
    g.add_argument("--train-density-start", type=float, default=None,
                   help=f"... ramped from this density (default {d('train_density_start'):g})")
    g.add_argument("--train-density-ramp", type=float, default=None,
                   help=f"... over this share of the steps (default {d('train_density_ramp'):g})")
    g.add_argument("--tau-every", type=int, default=None,
                   help=f"steps between re-calibrations of τ (default {d('tau_every')})")
    g.add_argument("--train-density-form", default=None, choices=("token", "neuron"),
                   help="what the in-loop zeros are: entries |a| <= τ_l (token) or whole neurons, the same on "
                        "every token (neuron: each block keeps the neurons of largest RMS, fixed once the ramp "
                        f"ends; `deft shrink` then removes the others; default {d('train_density_form')})")
    g.add_argument("--neuron-fill", default=None, choices=("zero", "mean"),
                   help="with --train-density-form neuron: a removed neuron outputs 0 (zero) or its mean over the "
                        "real tokens (mean: plain MLPs; ranked by variance, folded into the down bias by "
                        f"`deft shrink`; default {d('neuron_fill')})")
    g.add_argument("--neuron-rank", default=None, choices=("rms", "output"),
                   help="with --train-density-form neuron: keep the neurons of largest RMS (rms) or of largest "
                        "RMS x down-projection column norm, what each writes to the block's output "
                        f"(output; default {d('neuron_rank')})")
    g.add_argument("--neuron-rank-steps", type=int, default=None,
                   help="with --train-density-form neuron: rank the neurons on the activations of this many steps "
                        f"up to each re-choice, not that step's batch alone (default {d('neuron_rank_steps')})")
    g.add_argument("--distill-from", default=None, metavar="RUN",
                   help="distillation: also match this finished run's outputs (the dense PEFT run of the same task "
                        "and model), KL at temperature T (squared error for a regression head) "
                        "(default: none)")
    g.add_argument("--distill-weight", type=float, default=None,
                   help=f"... w of the loss (1 - w)·task + w·distillation (default {d('distill_weight'):g})")
    g.add_argument("--distill-temperature", type=float, default=None,
                   help=f"... T (default {d('distill_temperature'):g})")
    g.add_argument("--no-ste", action="store_true",
                   help="block the gradient at zeroed entries (default: straight-through)")
    g.add_argument("--activation", default=None, choices=("relu", "shifted-relu"),
                   help="ReLU-fication: replace the MLP activation before training (default: none, the model's own)")
    g.add_argument("--activation-shift", type=float, default=None,
                   help=f"b of the shifted ReLU max(0, x − b) (default {d('activation_shift'):g})")


# Command groups that live in their own modules; each module has add_commands(subparsers).
COMMAND_MODULES: tuple[str, ...] = ("deft.cli.efficiency", "deft.cli.deploy")


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ..training import field_default

    parser = _Parser(prog="deft", description="Density-efficient fine-tuning of transformers.")
    parser.add_argument("--version", action="version", version=f"deft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a model's MLP activation sites")
    model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("density", help="measure activation density of a model on a dataset")
    model_args(p)
    p.add_argument("--task", required=True, help="GLUE task name, e.g. sst2")
    p.add_argument("--split", default="dev", help="split to measure on (default: %(default)s)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="a random subset of the split of this size (default: all; 0 = all)")
    p.add_argument("--batch-size", type=int, default=field_default("eval_batch_size"),
                   help="inputs per forward pass (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None, help="maximum input tokens (default: the task's)")
    p.add_argument("--threshold", type=float, default=field_default("threshold"),
                   help="τ of the threshold density |a| > τ (default: %(default)g)")
    p.add_argument("--data-dir", default=None, help="GLUE data directory (default: $DEFT_DATA_DIR, else the hub)")
    p.add_argument("--seed", type=int, default=field_default("seed"),
                   help="seed of the --max-samples subset (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON (default: print only)")
    p.set_defaults(func=cmd_density)

    p = sub.add_parser("train", help="train one PEFT or DEFT run")
    train_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--deft", action="store_true", help="with the density loss (default)")
    mode.add_argument("--peft", action="store_true", help="without the density loss")
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default {field_default('seed')})")
    p.add_argument("--output", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --output (its checkpoints are deleted first)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="PEFT vs DEFT with identical settings (the main job)")
    train_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[field_default("seed")],
                   help=f"one run pair per seed (default {field_default('seed')})")
    p.add_argument("--output", default="runs/compare",
                   help="directory for the runs and comparison.json (default: %(default)s)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="reload a saved run and re-measure metric and density")
    p.add_argument("--run", required=True, help="run directory (deft train / compare / prune / sparsify / shrink)")
    p.add_argument("--task", default=None, help="task to evaluate on (default: the run's)")
    p.add_argument("--split", default=None, help="split (default: the task's evaluation split)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="evaluation examples (default: the run's own evaluation subset; 0 = all)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    p.add_argument("--threshold", type=float, default=None, help="τ of the |a| > τ density (default: the run's)")
    p.add_argument("--skip-threshold", type=float, default=None,
                   help="ADA runs: remove the MLP blocks with |α| below this (see deft.adaptive; default: none)")
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's, else $DEFT_DATA_DIR)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON (default: print only)")
    p.set_defaults(func=cmd_eval)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that end a command with a one-line message instead of a traceback.

    Evaluated only when an exception propagates, so `deft --help` does not import torch.
    """
    from ..tasks.hub import DataNotAvailableError
    from ..training import NonFiniteLossError

    return (ModelNotAvailableError, DataNotAvailableError, NonFiniteLossError, ValueError, FileNotFoundError, KeyError,
            PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError)


# Least values of numeric options, by destination, whichever command has them: checked before any
# command runs, so a bad count fails in one line before data or a model loads.
AT_LEAST = {"max_samples": 0, "max_train_samples": 0, "max_eval_samples": 0, "lam": 0, "threshold": 0,
            "skip_threshold": 0, "zero_threshold": 0, "batch_size": 1, "eval_batch_size": 1,
            "max_length": 1, "grad_accum": 1, "evals_per_epoch": 1, "save_steps": 1, "tau_every": 1,
            "neuron_rank_steps": 1, "holdout_samples": 0, "calibration_samples": 1, "repeats": 1}


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Raise ValueError naming the option as written (e.g. --lambda) for a value under its least."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    flags = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
    for dest, least in AT_LEAST.items():
        value = getattr(args, dest, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < least:
            raise ValueError(f"{flags.get(dest, dest)} must be >= {least}, got {value:g}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # bitsandbytes (imported by peft) warns at import on every CPU machine that its optional hub-fetched
    # `kernels` package is absent; it then uses its built-in CPU path, which is what QLoRA runs on here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        check_ranges(parser, args)
        return args.func(args)
    except _user_errors() as err:
        print(f"deft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = f"; `deft {args.command} ... --resume` continues from the last checkpoint in " \
                 f"{args.output}" if args.command == "train" else ""
        print(f"deft {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
