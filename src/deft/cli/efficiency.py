"""``deft energy``, ``deft prune`` and ``deft prune-sweep``: the paper's efficiency analyses
(METHOD.md §5–6) on saved runs, over :mod:`deft.analysis`.

* ``energy`` — energy ratio of a simulated zero-skipping ASIC (zero-skipping energy / dense
  energy) of a run or a base model on a GLUE split, per layer, and the energy change
  (ER_base − ER) / ER_base × 100 against a baseline run (the paper's Table 2: DEFT vs PEFT).
* ``prune`` — WANDA on a run (adapters merged first), evaluated on dev, saved as a run that
  ``deft eval`` / ``deft energy`` load like any other.
* ``prune-sweep`` — metric and activation density over sparsity levels for a PEFT run and a
  DEFT run, ``sweep.json`` and the two-panel plot of the paper's Fig. 4.
"""

from __future__ import annotations

from pathlib import Path

from .format import energy_tables, format_table, pct, sweep_table, write_json
from .runs import finished_run

# The library is imported inside the commands: `deft --help` stays fast (no torch import).


def _mode_label(config) -> str:
    return f"{config.mode.upper()} {config.method}"


def cmd_energy(args) -> int:
    from ..analysis.energy import EnergyConfig, energy_change
    from ..analysis.energy_runs import block_breakdown, load_subject, measure_energy

    if args.run is None and args.model is None:
        raise ValueError("give --run DIR (a saved run) or --model M --task T (a base model)")
    if args.run is not None and args.model is not None:
        raise ValueError("give either --run or --model, not both")
    for run in (args.run, args.baseline):
        if run is not None:
            finished_run(run)
    max_samples = args.max_samples or None  # 0 = all
    subject = load_subject(run=args.run, model=args.model, tokenizer=args.tokenizer, task=args.task,
                           data_dir=args.data_dir, max_length=args.max_length)
    energy_config = EnergyConfig() if args.zero_threshold is None else EnergyConfig(zero_threshold=args.zero_threshold)
    report, samples, split = measure_energy(subject, split=args.split, max_samples=max_samples,
                                            batch_size=args.batch_size, seed=args.seed, config=energy_config)
    rd = report.to_dict()
    payload = {"energy_ratio": report.energy_ratio, "mean_batch_ratio": report.mean_batch_ratio,
               "subject": subject.info, "task": subject.task.name, "split": split, "samples": samples,
               "batch_size": args.batch_size, "tokens": report.tokens, "blocks": block_breakdown(rd), "report": rd}
    base_rd = None
    if args.baseline is not None:
        # The baseline sees the same task, split and samples; only the model differs.
        base = load_subject(run=args.baseline, task=subject.task.name, data_dir=args.data_dir or subject.config.data_dir,
                            max_length=args.max_length)
        base_report, _, _ = measure_energy(base, split=split, max_samples=max_samples,
                                           batch_size=args.batch_size, seed=args.seed, config=energy_config)
        base_rd = base_report.to_dict()
        payload["baseline"] = {"subject": base.info, "energy_ratio": base_report.energy_ratio,
                               "mean_batch_ratio": base_report.mean_batch_ratio, "report": base_rd}
        payload["energy_change"] = energy_change(base_report, report)

    print(f"{subject.name} on {subject.task.name}/{split}: {samples} inputs, {report.tokens:,} real tokens, "
          f"batch size {args.batch_size}\n")
    print(energy_tables(rd, base_rd))
    print(f"\nenergy ratio (zero-skipping / dense): {report.energy_ratio:.4f}"
          + (f"  (mean per call {report.mean_batch_ratio:.4f})" if report.mean_batch_ratio is not None else ""))
    if report.skipped:
        print(f"not counted: {', '.join(report.skipped)}")
    if base_rd is not None:
        print(f"baseline {args.baseline}: energy ratio {payload['baseline']['energy_ratio']:.4f}")
        print(f"energy change (ER_base − ER) / ER_base: {payload['energy_change']:.2f}%")
    if args.json:
        write_json(args.json, payload)
    return 0


def cmd_prune(args) -> int:
    from ..analysis.prune_runs import prune_and_evaluate, prune_config_from, save_pruned_run

    run = finished_run(args.run).path
    cfg = prune_config_from(args.sparsity, args.structure, args.targets, args.calibration_samples, args.seed)
    if Path(args.output).resolve() == run.resolve():
        raise ValueError(f"--output {args.output} is the source run itself: choose a new directory")
    model, _, config, info = prune_and_evaluate(run, cfg, data_dir=args.data_dir, max_samples=args.max_samples,
                                                batch_size=args.batch_size, threshold=args.threshold)
    save_pruned_run(model, run, args.output, info)
    kind = cfg.structure or f"{cfg.sparsity:.0%} unstructured"
    print(f"{run}: {_mode_label(config)} on {config.task}, WANDA {kind} on {cfg.targets} "
          f"({cfg.calibration_samples} calibration samples{', adapters merged' if info['merged'] else ''})\n")
    print(format_table(["layer", "sparsity"], [(name, pct(s)) for name, s in info["per_layer_sparsity"].items()]))
    tau = info["density_report"]["threshold"]["tau"]
    print(f"\n{info['split']} ({info['samples']} examples): {info['main_metric']} {100 * info['metric']:.2f}, "
          f"density {pct(info['density'])}, |a|>{tau:g} {pct(info['density_threshold'])}, "
          f"weight sparsity of the pruned layers {pct(info['achieved_sparsity'])}")
    print(f"pruned run saved in {args.output} (load it with `deft eval --run {args.output}`)")
    print(f"wrote {Path(args.output) / 'prune.json'}")
    return 0


def cmd_prune_sweep(args) -> int:
    from ..analysis.prune_runs import plot_sweep, prune_sweep, sweep_points

    for run in args.run:
        finished_run(run)
    points = sweep_points(args.sparsities, args.structure)
    payload = prune_sweep(args.run, points, targets=args.targets, calibration_samples=args.calibration_samples,
                          seed=args.seed, data_dir=args.data_dir, max_samples=args.max_samples,
                          batch_size=args.batch_size, threshold=args.threshold)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", payload)
    first = payload["runs"][0]
    plot_sweep(payload, out / "sweep.png", title=f"WANDA · {first['model']} · {first['method']} · {first['task']}")
    print(f"wrote {out / 'sweep.png'}\n")
    print(sweep_table(payload))
    return 0


def _prune_default(name: str):
    from ..analysis.prune import PruneConfig

    return PruneConfig.__dataclass_fields__[name].default


def _common_eval(p):
    from ..training import field_default

    p.add_argument("--max-samples", type=int, default=None,
                   help="evaluate on a random dev subset of this size (default: the run's evaluation subset; 0 = all)")
    p.add_argument("--batch-size", type=int, default=field_default("eval_batch_size"),
                   help="evaluation batch size (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None, help="τ of the threshold density (default: the run's)")
    p.add_argument("--data-dir", default=None, help="GLUE data directory (default: the run's, else $DEFT_DATA_DIR)")
    p.add_argument("--seed", type=int, default=_prune_default("seed"),
                   help="seed of the calibration sample (default: %(default)s)")


def _prune_options(p):
    from ..analysis.prune import TARGETS

    p.add_argument("--targets", choices=TARGETS, default=_prune_default("targets"),
                   help="mlp_first: the first dense layer of every MLP (the paper's setting); "
                        "all_linear: every linear layer of the backbone, task head excluded (default: %(default)s)")
    p.add_argument("--calibration-samples", type=int, default=_prune_default("calibration_samples"),
                   help="random training samples whose activation norms score the weights "
                        "(default %(default)s, as the paper)")


def add_commands(sub) -> None:
    import inspect

    from ..analysis.energy_runs import measure_energy

    energy_default = lambda name: inspect.signature(measure_energy).parameters[name].default  # noqa: E731
    p = sub.add_parser(
        "energy", help="energy ratio of a zero-skipping ASIC (sponge-examples cost model) for a run or model",
        description="Energy of a simulated zero-skipping accelerator / energy of a dense one, on real tokens "
                    "of a GLUE split, per layer; with --baseline, the energy change (ER_base − ER)/ER_base × 100.")
    p.add_argument("--run", default=None, help="a saved run directory (deft train / compare / prune)")
    p.add_argument("--model", default=None, help="or a base model (alias, directory, hub name) with --task")
    p.add_argument("--tokenizer", default=None, help="tokenizer for a --model directory that has none")
    p.add_argument("--task", default=None, help="task (default: the run's)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="a run to compare with (e.g. the PEFT run when --run is the DEFT run)")
    p.add_argument("--split", default=None, help="split (default: the task's dev split)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="a random subset of the split of this size (default: all; 0 = all)")
    p.add_argument("--batch-size", type=int, default=energy_default("batch_size"),
                   help="inputs per model call (default %(default)s, the sponge/Lazzaro setting: the ASIC reads every "
                        "weight once per call, so larger batches share the weight reads and move the ratio "
                        "towards the activations' sparsity alone)")
    p.add_argument("--max-length", type=int, default=None, help="truncation (default: the run's, else 128)")
    p.add_argument("--zero-threshold", type=float, default=None, metavar="TAU",
                   help="values with |x| <= TAU count as zero, weights and activations alike (default 2^-126, "
                        "the sponge estimator's fp32 test; GELU is almost never exactly 0, so e.g. 0.01 models "
                        "a thresholded deployment)")
    p.add_argument("--data-dir", default=None, help="GLUE data directory (default: the run's, else $DEFT_DATA_DIR)")
    p.add_argument("--seed", type=int, default=energy_default("seed"),
                   help="seed of the --max-samples subset (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write energy_ratio, energy_change and the breakdown (default: print only)")
    p.set_defaults(func=cmd_energy)

    p = sub.add_parser("prune", help="WANDA-prune a run, evaluate it, save it as a loadable run",
                       description="Scores |W_ij|·‖X_j‖₂ on random training samples (real tokens only) and "
                                   "prunes per output row; LoRA-like adapters are merged first.")
    p.add_argument("--run", required=True, help="the run to prune")
    p.add_argument("--sparsity", type=float, default=None, help="share of each row's weights to zero, in [0, 1)")
    p.add_argument("--structure", default=None, metavar="N:M", help="semi-structured N:M instead, e.g. 2:4 or 4:8")
    _prune_options(p)
    _common_eval(p)
    p.add_argument("--output", required=True, help="directory of the pruned run")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("prune-sweep", help="metric and density over sparsity levels, PEFT vs DEFT (paper Fig. 4)")
    p.add_argument("--run", action="append", required=True, help="a run to sweep (repeat: --run PEFT --run DEFT)")
    p.add_argument("--sparsities", type=float, nargs="+", default=None,
                   help="unstructured levels (default 0 0.1 ... 0.9)")
    p.add_argument("--structure", nargs="+", default=None, metavar="N:M",
                   help="N:M patterns to add as points at sparsity 1 − N/M (alone: with the unpruned point only)")
    _prune_options(p)
    _common_eval(p)
    p.add_argument("--output", required=True, help="directory for sweep.json and sweep.png")
    p.set_defaults(func=cmd_prune_sweep)


