"""Deployment commands: ``deft sparsify``, ``deft shrink``, ``deft density-sweep``, ``deft export``,
``deft load``, ``deft bench-inference`` (see :mod:`deft.deploy`)."""

from __future__ import annotations

import json
from pathlib import Path

from .format import format_table, pct, write_json
from .runs import finished_run

#: Where `deft bench-inference` writes without --output: under runs/, like every other command's output
#: (it wrote into the benchmarks/results/ of whatever directory the user stood in).
BENCH_OUTPUT = "runs/bench-inference/ada_<run name>.json"


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

    finished_run(args.run)
    info = export_run(args.run, args.output, _threshold(args.skip_threshold))
    print(f"exported {args.run} -> {args.output}: method {info['method']}, "
          f"{len(info['skipped'])} MLP block(s) removed, LoRA merged: {info['lora_merged']}, "
          f"α folded: {info['alphas_folded']}, {info['parameters']:,} parameters")
    print(f"load with: {info['load_with']}")
    return 0


def cmd_load(args) -> int:
    from ..deploy import load_exported, model_bytes, read_export_info

    info = read_export_info(args.export)
    model = load_exported(args.export, int8_head=args.int8_head)
    from ..deploy import Int8LMHead, SparseMLP

    payload = {"dir": str(args.export), "class": type(model).__name__, "method": info["method"],
               "skipped": [s["module"] for s in info["skipped"]],
               "sparse_mlp_blocks": sum(isinstance(m, SparseMLP) for m in model.modules()),
               "int8_lm_head": any(isinstance(m, Int8LMHead) for m in model.modules()),
               "parameters": sum(p.numel() for p in model.parameters()), "param_bytes": model_bytes(model)}
    print(json.dumps(payload, indent=2))
    return 0


def cmd_bench_inference(args) -> int:
    from ..deploy import bench_inference

    for run in (args.run, args.baseline):
        if run is not None:
            finished_run(run)
    out = Path(args.output or BENCH_OUTPUT.replace("<run name>", Path(args.run).resolve().name))
    payload = bench_inference(args.run, args.baseline, threshold=args.skip_threshold, repeats=args.repeats,
                              batch_size=args.batch_size, max_samples=args.max_samples or None,  # 0 = all
                              data_dir=args.data_dir,
                              curve=args.curve or None, peak_memory=args.peak_memory)
    peak = lambda v: f"{v['peak_memory']['peak_bytes'] / 2**20:.1f}" if "peak_memory" in v else "-"  # noqa: E731
    rows = [(name, f"{v['median_seconds']:.3f}", f"{v['param_bytes'] / 2**20:.1f}", peak(v), v["blocks_skipped"],
             f"{v['metric']:.2f}") for name, v in payload["variants"].items()]
    print(format_table(["variant", "median s", "param MiB", "peak MiB", "blocks skipped", payload["metric_name"]],
                       rows))
    for key in ("time_saving", "memory_saving", "peak_memory_saving", "metric_delta"):
        value = payload.get(key)
        print(f"{key}: {'n/a (no --baseline)' if value is None else f'{value:.2f}'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


def cmd_sparsify(args) -> int:
    from ..deploy import sparsify_run

    finished_run(args.run)
    payload = sparsify_run(args.run, args.output, density=args.density, tau=args.tau, mode=args.mode,
                           calibration_samples=args.calibration_samples, force=args.force,
                           max_samples=args.max_samples, batch_size=args.batch_size, data_dir=args.data_dir,
                           point=args.point)
    th, before, after = payload["thresholds"], payload["before"], payload["after"]
    target = f"target density {th['target_density']:g}" if th["target_density"] is not None else "one τ"
    print(f"{args.run}: {th['mode']} thresholds, {target}, calibrated on {th['calibration']['samples']} training "
          f"samples ({th['calibration']['tokens']:,} tokens): calibration density {pct(th['calibration']['density'])}")
    print(format_table(["", payload["main_metric"], "exact density", "union/seq"],
                       [(name, f"{100 * r['metric']:.2f}", pct(r["density"]), pct(r["union_density"]))
                        for name, r in (("before", before), ("after", after))]))
    print(f"{after['split']} ({after['samples']} examples); thresholded run saved in {args.output} "
          f"(deft eval / density / energy / prune / export load it with its thresholds)")
    return 0


def cmd_shrink(args) -> int:
    from ..deploy.shrink import shrink_run

    finished_run(args.run)
    s = shrink_run(args.run, args.output, calibration_samples=args.calibration_samples,
                   max_dead_share=args.max_dead_share, max_samples=args.max_samples, batch_size=args.batch_size,
                   data_dir=args.data_dir)
    before, after = s["before"], s["after"]
    print(f"{args.run}: calibrated on {s['calibration']['samples']} training samples "
          f"({s['calibration']['tokens']:,} tokens); removed neurons active on <= "
          f"{100 * s['calibration']['max_dead_share']:g}% of them")
    print(format_table(["block", "width before", "width after", "removed", "bias folded"],
                       [(r["site"], r["width_before"], r["width_after"], pct(r["removed_share"]),
                         "yes" if r["bias_folded"] else "no") for r in s["layers"]]))
    print(f"neurons {s['neurons_before']:,} -> {s['neurons_after']:,} ({pct(s['neurons_removed_share'])} removed, "
          f"{s['blocks_removed']} whole block(s)); MLP parameters {pct(s['mlp_params_removed_share'])} removed, "
          f"model parameters {s['params_before']:,} -> {s['params_after']:,}")
    print(format_table(["", s["main_metric"], "exact density"],
                       [(name, f"{100 * r['metric']:.2f}", pct(r["density"]))
                        for name, r in (("before", before), ("after", after))]))
    print(f"{after['split']} ({after['samples']} examples; density after: over the neurons left); shrunk run saved "
          f"in {args.output} (deft eval loads it)")
    return 0


def cmd_density_sweep(args) -> int:
    from pathlib import Path as _Path

    from ..deploy import density_sweep, plot_density_sweep

    for run in args.run:
        finished_run(run)

    payload = density_sweep(args.run, args.densities, mode=args.mode, calibration_samples=args.calibration_samples,
                            max_samples=args.max_samples, batch_size=args.batch_size, data_dir=args.data_dir,
                            point=args.point, split=args.split)
    out = _Path(args.output)
    write_json(out / "sweep.json", payload)
    plot_density_sweep(payload, out / "sweep.png")
    print(f"wrote {out / 'sweep.png'}\n")
    rows = [(e["label"], f"{p['target_density']:.2f}", pct(p["deployed_density"]), pct(p["union_density"]),
             f"{100 * p['metric']:.2f}") for e in payload["runs"] for p in e["points"]]
    print(format_table(["run", "target", "deployed density", "union/seq", payload["runs"][0]["main_metric"]], rows))
    return 0


def _threshold_options(p) -> None:
    from ..deploy import DEFAULT_CALIBRATION_SAMPLES

    p.add_argument("--mode", default="uniform", choices=("uniform", "global", "greedy"),
                   help="uniform: every layer at the target density; global: one τ whose mean layer density is the "
                        "target; greedy: per-layer densities with the target as mean, lowered first where the "
                        "block's output error grows least (default uniform)")
    p.add_argument("--point", default="act", choices=("act", "product"),
                   help="act: threshold σ's output (for gated MLPs the gate, CATS' choice); product: the gated "
                        "product, the down projection's input (the sparse kernel covers act only) (default act)")
    p.add_argument("--calibration-samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES,
                   help=f"training examples the thresholds are calibrated on (default {DEFAULT_CALIBRATION_SAMPLES})")
    p.add_argument("--max-samples", type=int, default=None,
                   help="evaluation examples (default: the run's evaluation subset; 0 = all)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's, else $DEFT_DATA_DIR)")


def add_commands(sub) -> None:
    import inspect

    from ..adaptive import DEFAULT_SKIP_THRESHOLD
    from ..deploy import DEFAULT_CURVE
    from ..deploy.bench import bench_inference  # the function itself, for its defaults
    from ..deploy.shrink import shrink_run

    default_of = lambda fn, name: inspect.signature(fn).parameters[name].default  # noqa: E731

    from ..deploy import DEFAULT_CALIBRATION_SAMPLES, DEFAULT_DENSITIES

    p = sub.add_parser("sparsify", help="calibrate activation thresholds: exact zeros at a target density",
                       description="Zeroes |a| <= τ_l at every MLP activation, τ_l calibrated on the run's training "
                                   "data, and writes a run that loads with its thresholds.")
    p.add_argument("--run", required=True, help="run directory (deft train)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--density", type=float, help="target exact density in (0, 1], e.g. 0.3")
    target.add_argument("--tau", type=float, help="one threshold τ >= 0 for every layer instead")
    _threshold_options(p)
    p.add_argument("--force", action="store_true", help="calibrate afresh a run that already has thresholds")
    p.add_argument("--output", required=True, help="directory of the thresholded run")
    p.set_defaults(func=cmd_sparsify)

    p = sub.add_parser("shrink", help="remove the MLP neurons a thresholded run never activates: a smaller dense model",
                       description="Removes every MLP neuron that is exactly 0 on every real token of a calibration "
                                   "set (after the run's thresholds: deft sparsify first) and writes a run that loads "
                                   "shrunk; works at any batch size, on any hardware.")
    p.add_argument("--run", required=True, help="thresholded run directory (deft sparsify, or --train-density)")
    p.add_argument("--max-dead-share", type=float, default=default_of(shrink_run, "max_dead_share"),
                   help="also remove neurons active on at most this share of calibration tokens, their mean "
                        "contribution folded into the down bias (default %(default)g: only neurons never active)")
    p.add_argument("--calibration-samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES,
                   help=f"training examples whose tokens decide which neurons are dead (default "
                        f"{DEFAULT_CALIBRATION_SAMPLES})")
    p.add_argument("--max-samples", type=int, default=None,
                   help="evaluation examples (default: the run's evaluation subset; 0 = all)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's, else $DEFT_DATA_DIR)")
    p.add_argument("--output", required=True, help="directory of the shrunk run")
    p.set_defaults(func=cmd_shrink)

    p = sub.add_parser("density-sweep", help="metric against deployed exact density, thresholds at each target")
    p.add_argument("--run", action="append", required=True, help="a run to sweep (repeat: --run PEFT --run DEFT)")
    p.add_argument("--densities", type=float, nargs="+", default=list(DEFAULT_DENSITIES),
                   help=f"target densities (1 = untouched; default {' '.join(f'{d:g}' for d in DEFAULT_DENSITIES)})")
    _threshold_options(p)
    p.add_argument("--split", default=None,
                   help="split to score on (default: the task's dev split; 'heldout': the runs' held-out "
                        "training examples, deft train --holdout-samples)")
    p.add_argument("--output", required=True, help="directory for sweep.json and sweep.png")
    p.set_defaults(func=cmd_density_sweep)

    p = sub.add_parser("export", help="standalone model directory: skipped MLP blocks gone, LoRA merged")
    p.add_argument("--run", required=True, help="run directory (deft train)")
    p.add_argument("--output", "--out", required=True, help="directory to write")
    p.add_argument("--skip-threshold", default=str(DEFAULT_SKIP_THRESHOLD),
                   help=f"remove MLP blocks with |α| below this ('none': keep all; default {DEFAULT_SKIP_THRESHOLD})")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("load", help="load a `deft export` directory and print what it holds")
    p.add_argument("--export", "--dir", required=True, metavar="DIR", help="directory written by `deft export`")
    p.add_argument("--int8-head", action="store_true",
                   help="LM head as int8 rows for batch-1 decoding, float32 argmax kept exact (default: off)")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("bench-inference",
                       help="ADA-DEFT skipped vs unskipped vs ADA-PEFT: time, memory, metric, side by side")
    p.add_argument("--run", required=True, help="ADA-DEFT run directory")
    p.add_argument("--baseline", default=None,
                   help="ADA-PEFT run directory, same model and task (default: none, no savings against it)")
    p.add_argument("--skip-threshold", type=float, default=DEFAULT_SKIP_THRESHOLD,
                   help="remove the MLP blocks with |α| below this (default: %(default)g)")
    p.add_argument("--repeats", type=int, default=default_of(bench_inference, "repeats"),
                   help="timed passes per variant, the median reported (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=default_of(bench_inference, "batch_size"),
                   help="inputs per timed forward pass (default: %(default)s)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="a random subset of the dev split of this size (default: all; 0 = all)")
    p.add_argument("--data-dir", default=None, help="data directory (default: the run's, else $DEFT_DATA_DIR)")
    p.add_argument("--curve", type=float, nargs="*", default=list(DEFAULT_CURVE),
                   help="thresholds of the metric-vs-threshold curve; none given: no curve (default: "
                        f"{' '.join(f'{t:g}' for t in DEFAULT_CURVE)})")
    p.add_argument("--no-peak-memory", dest="peak_memory", action="store_false",
                   help="skip the peak-memory measurement (each variant exported and loaded in a fresh process)")
    p.add_argument("--output", "--out", default=None, metavar="FILE",
                   help=f"JSON file to write (default: {BENCH_OUTPUT})")
    p.set_defaults(func=cmd_bench_inference)
