"""The ``deft`` command: a thin shell over the library."""

from __future__ import annotations

import argparse
import json
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
    split = task.resolve_split(args.split)
    dataset = load_glue(task.name, split, data_dir=args.data_dir, max_samples=args.max_samples, seed=args.seed)
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


# -- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deft", description="Density-efficient fine-tuning of transformers.")
    parser.add_argument("--version", action="version", version=f"deft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"built-in alias, local directory or hub name (default: {DEFAULT_MODEL})")
        p.add_argument("--tokenizer", default=None, help="tokenizer name or directory, if the model has none")
        p.add_argument("--point", choices=("act", "product"), default="act",
                       help="gated MLPs: measure σ's output (act, default) or the gated product")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelNotAvailableError, ValueError, FileNotFoundError, KeyError) as err:
        print(f"deft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
