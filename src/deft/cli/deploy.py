"""Deployment commands: ``deft export``, ``deft load``, ``deft bench-inference`` (see :mod:`deft.deploy`)."""

from __future__ import annotations

import json
from pathlib import Path

from .format import format_table


def _threshold(value: str) -> float | None:
    """``none`` → no skipping; otherwise a float >= 0."""
    if value.lower() == "none":
        return None
    number = float(value)
    if number < 0:
        raise ValueError(f"skip threshold must be >= 0, got {value}")
    return number


def cmd_export(args) -> int:
    from ..deploy import export_run

    info = export_run(args.run, args.out, _threshold(args.skip_threshold))
    print(f"exported {args.run} -> {args.out}: method {info['method']}, "
          f"{len(info['skipped'])} MLP block(s) removed, LoRA merged: {info['lora_merged']}, "
          f"α folded: {info['alphas_folded']}, {info['parameters']:,} parameters")
    print(f"load with: {info['load_with']}")
    return 0


def cmd_load(args) -> int:
    from ..deploy import load_exported, model_bytes, read_export_info

    info = read_export_info(args.dir)
    model = load_exported(args.dir)
    payload = {"dir": str(args.dir), "class": type(model).__name__, "method": info["method"],
               "skipped": [s["module"] for s in info["skipped"]],
               "parameters": sum(p.numel() for p in model.parameters()), "param_bytes": model_bytes(model)}
    print(json.dumps(payload, indent=2))
    return 0


def cmd_bench_inference(args) -> int:
    from ..deploy import bench_inference

    payload = bench_inference(args.run, args.baseline, threshold=args.skip_threshold, repeats=args.repeats,
                              batch_size=args.batch_size, max_samples=args.max_samples, data_dir=args.data_dir,
                              curve=args.curve or None, peak_memory=args.peak_memory)
    peak = lambda v: f"{v['peak_memory']['peak_bytes'] / 2**20:.1f}" if "peak_memory" in v else "-"  # noqa: E731
    rows = [(name, f"{v['median_seconds']:.3f}", f"{v['param_bytes'] / 2**20:.1f}", peak(v), v["blocks_skipped"],
             f"{v['metric']:.2f}") for name, v in payload["variants"].items()]
    print(format_table(["variant", "median s", "param MiB", "peak MiB", "blocks skipped", payload["metric_name"]],
                       rows))
    for key in ("time_saving", "memory_saving", "peak_memory_saving", "metric_delta"):
        value = payload.get(key)
        print(f"{key}: {'n/a (no --baseline)' if value is None else f'{value:.2f}'}")
    out = Path(args.out or f"benchmarks/results/ada_{Path(args.run).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


def add_commands(sub) -> None:
    from ..adaptive import DEFAULT_SKIP_THRESHOLD
    from ..deploy import DEFAULT_CURVE

    p = sub.add_parser("export", help="standalone model directory: skipped MLP blocks gone, LoRA merged")
    p.add_argument("--run", required=True, help="run directory (deft train)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--skip-threshold", default=str(DEFAULT_SKIP_THRESHOLD),
                   help=f"remove MLP blocks with |α| below this ('none': keep all; default {DEFAULT_SKIP_THRESHOLD})")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("load", help="load a `deft export` directory and print what it holds")
    p.add_argument("--dir", required=True)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("bench-inference",
                       help="ADA-DEFT skipped vs unskipped vs ADA-PEFT: time, memory, metric, side by side")
    p.add_argument("--run", required=True, help="ADA-DEFT run directory")
    p.add_argument("--baseline", default=None, help="ADA-PEFT run directory (same model and task)")
    p.add_argument("--skip-threshold", type=float, default=DEFAULT_SKIP_THRESHOLD)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per variant (median reported)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--curve", type=float, nargs="*", default=list(DEFAULT_CURVE),
                   help="thresholds of the metric-vs-threshold curve (none: skip the curve)")
    p.add_argument("--no-peak-memory", dest="peak_memory", action="store_false",
                   help="skip the peak-memory measurement (each variant exported and loaded in a fresh process)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/ada_<run name>.json)")
    p.set_defaults(func=cmd_bench_inference)
