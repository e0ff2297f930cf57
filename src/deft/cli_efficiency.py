"""``deft energy``, ``deft prune`` and ``deft prune-sweep``: the paper's efficiency analyses
(METHOD.md §5–6) on saved runs, over the libraries :mod:`deft.energy` and :mod:`deft.prune`.

* ``energy`` — energy ratio of a simulated zero-skipping ASIC (zero-skipping energy / dense
  energy) of a run or a base model on a GLUE split, per layer, and the energy change
  (ER_base − ER) / ER_base × 100 against a baseline run (the paper's Table 2: DEFT vs PEFT).
* ``prune`` — WANDA on a run (adapters merged first), evaluated on dev, saved as a run that
  ``deft eval`` / ``deft energy`` load like any other (:mod:`deft.pruned_run`).
* ``prune-sweep`` — metric and activation density over sparsity levels for a PEFT run and a
  DEFT run, ``sweep.json`` and the two-panel plot of the paper's Fig. 4.

The functions behind the commands (:func:`measure_energy`, :func:`prune_and_evaluate`,
:func:`prune_sweep`, :func:`plot_sweep`) are importable: ``benchmarks/efficiency.py`` uses them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .report import format_table, pct

DEFAULT_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Hub model wrappers add these in front of the transformers model's own paths.
_WRAPPER_PREFIX = re.compile(r"^(base_model\.model\.)+")
_BLOCK = re.compile(r"^(.*?\.\d+)(?=[.:]|$)")


# -- shared helpers -------------------------------------------------------------------------------
def _write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


def check_run_dir(path: str | Path) -> Path:
    """A clear error before any model is loaded: the directory must exist and be a deft run."""
    run = Path(path)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    if not (run / "run_config.json").is_file():
        raise FileNotFoundError(f"{run} is not a deft run directory (no run_config.json); "
                                "give a directory written by `deft train`, `deft compare` or `deft prune`")
    return run


def _no_labels(loader):
    # The energy and calibration passes need the forward only: no loss over the labels.
    for batch in loader:
        batch = dict(batch)
        batch.pop("labels", None)
        yield batch


def glue_loader(tokenizer, task, split: str, *, data_dir, max_samples, seed: int, batch_size: int,
                max_length: int):
    """(dataset, DataLoader) of one GLUE split, padded per batch (padding is masked out)."""
    from .evaluation import make_loader, tokenize_glue
    from .tasks import load_glue

    data = load_glue(task.name, split, data_dir=data_dir, max_samples=max_samples, seed=seed)
    return data, make_loader(tokenize_glue(data, tokenizer, max_length), tokenizer, batch_size)


def _mode_label(config) -> str:
    return f"{config.mode.upper()} {config.method}"


# -- energy ------------------------------------------------------------------------------------
@dataclass
class Subject:
    """What ``deft energy`` measures: a loaded run or base model and how to feed it."""

    name: str
    model: nn.Module
    tokenizer: object
    task: object
    max_length: int
    data_dir: str | None
    info: dict


def load_subject(*, run: str | None = None, model: str | None = None, tokenizer: str | None = None,
                 task: str | None = None, data_dir: str | None = None, max_length: int | None = None) -> Subject:
    """A saved run (``run``) or a base model with a fresh task head (``model`` + ``task``)."""
    from .models import load_for_sequence_classification, load_tokenizer
    from .tasks import get_task

    if run is not None:
        from .train import load_run

        config, net, tok = load_run(check_run_dir(run))
        spec = get_task(task or config.task)
        return Subject(str(run), net, tok, spec, max_length or config.max_length, data_dir or config.data_dir,
                       {"run": str(run), "mode": config.mode, "method": config.method, "model": config.model,
                        "task": config.task})
    if model is None or task is None:
        raise ValueError("give --run DIR, or --model M with --task T")
    spec = get_task(task)
    tok = load_tokenizer(model, tokenizer)
    net = load_for_sequence_classification(model, spec.num_labels, tokenizer=tok)
    net.eval()
    return Subject(model, net, tok, spec, max_length or 128, data_dir, {"model": model, "task": spec.name})


def measure_energy(subject: Subject, *, split: str | None = None, max_samples: int | None = None,
                   batch_size: int = 1, seed: int = 0, config=None, progress: bool = True):
    """(EnergyReport, number of inputs, split) of ``subject`` on a GLUE split (default: dev)."""
    from tqdm.auto import tqdm

    from .energy import estimate_energy

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    task = subject.task
    split = task.resolve_split(split) if split else task.dev_split
    data, loader = glue_loader(subject.tokenizer, task, split, data_dir=subject.data_dir, max_samples=max_samples,
                               seed=seed, batch_size=batch_size, max_length=subject.max_length)
    batches = tqdm(_no_labels(loader), total=len(loader), desc=f"energy {subject.name}", disable=not progress,
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


def _uj(pj: float) -> str:
    return f"{pj / 1e6:,.2f}"


def energy_tables(report: dict, baseline: dict | None = None) -> str:
    """The per-block table and the per-kind summary, with the baseline's ratio alongside."""
    base_blocks = {(b["block"], b["kind"]): b["ratio"] for b in block_breakdown(baseline)} if baseline else {}
    base_kinds = baseline["by_kind"] if baseline else {}
    head = ["block", "kind", "ops", "dense µJ", "zero-skip µJ", "ratio", "share"]
    kind_head = ["kind", "dense µJ", "zero-skip µJ", "ratio", "share"]
    if baseline:
        head.append("baseline ratio")
        kind_head.append("baseline ratio")
    rows = []
    for b in block_breakdown(report):
        row = [b["block"], b["kind"], b["modules"], _uj(b["dense"]), _uj(b["sparse"]), f"{b['ratio']:.4f}",
               pct(b["share"], 1)]
        if baseline:
            other = base_blocks.get((b["block"], b["kind"]))
            row.append("–" if other is None else f"{other:.4f}")
        rows.append(row)
    kinds = []
    total = report["dense_energy_pj"] or 1.0
    for kind, agg in report["by_kind"].items():
        row = [kind, _uj(agg["dense"]), _uj(agg["sparse"]), f"{agg['ratio']:.4f}", pct(agg["dense"] / total, 1)]
        if baseline:
            row.append(f"{base_kinds[kind]['ratio']:.4f}" if kind in base_kinds else "–")
        kinds.append(row)
    return f"{format_table(head, rows)}\n\n{format_table(kind_head, kinds)}"


def cmd_energy(args) -> int:
    from .energy import energy_change

    if args.run is None and args.model is None:
        raise ValueError("give --run DIR (a saved run) or --model M --task T (a base model)")
    if args.run is not None and args.model is not None:
        raise ValueError("give either --run or --model, not both")
    if args.baseline is not None:
        check_run_dir(args.baseline)
    subject = load_subject(run=args.run, model=args.model, tokenizer=args.tokenizer, task=args.task,
                           data_dir=args.data_dir, max_length=args.max_length)
    from .energy import EnergyConfig

    energy_config = EnergyConfig() if args.zero_threshold is None else EnergyConfig(zero_threshold=args.zero_threshold)
    report, samples, split = measure_energy(subject, split=args.split, max_samples=args.max_samples,
                                            batch_size=args.batch_size, seed=args.seed, config=energy_config)
    rd = report.to_dict()
    payload = {"energy_ratio": report.energy_ratio, "mean_batch_ratio": report.mean_batch_ratio,
               "subject": subject.info, "task": subject.task.name, "split": split, "samples": samples,
               "batch_size": args.batch_size, "tokens": report.tokens, "blocks": block_breakdown(rd), "report": rd}
    base_rd = None
    if args.baseline is not None:
        # The baseline sees the same task, split and samples; only the model differs.
        base = load_subject(run=args.baseline, task=subject.task.name, data_dir=args.data_dir or subject.data_dir,
                            max_length=args.max_length)
        base_report, _, _ = measure_energy(base, split=split, max_samples=args.max_samples,
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
        _write_json(args.json, payload)
    return 0


# -- pruning -------------------------------------------------------------------------------------
def prune_config_from(sparsity, structure, targets, calibration_samples, seed):
    """A validated :class:`deft.prune.PruneConfig`; with N:M the sparsity is 1 − N/M, and an
    explicit ``sparsity`` that disagrees is an error rather than silently ignored."""
    from .prune import PruneConfig, check_sparsity, parse_n_m

    if structure is not None:
        n, m = parse_n_m(structure)
        implied = 1 - n / m
        if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
            raise ValueError(f"--structure {structure} prunes {implied:.0%} of each row, but --sparsity is "
                             f"{sparsity}: drop --sparsity or make it match")
        sparsity = implied
    elif sparsity is None:
        raise ValueError("give --sparsity S (0 <= S < 1) or --structure N:M")
    return PruneConfig(sparsity=check_sparsity(sparsity), structure=structure, targets=targets,
                       calibration_samples=calibration_samples, seed=seed)


def calibration_batches(tokenizer, config, prune_config, *, data_dir=None, batch_size: int = 16) -> list:
    """``calibration_samples`` random training sequences of the run's task (the paper: 128),
    tokenized like training; padding is masked out of the activation norms."""
    from .tasks import get_task

    task = get_task(config.task)
    _, loader = glue_loader(tokenizer, task, "train", data_dir=data_dir or config.data_dir,
                            max_samples=prune_config.calibration_samples, seed=prune_config.seed,
                            batch_size=batch_size, max_length=config.max_length)
    return list(_no_labels(loader))


def evaluate_run_model(model, tokenizer, config, *, data_dir=None, max_samples=None, batch_size: int = 64,
                       threshold: float | None = None, progress: bool = True) -> dict:
    """Task metrics and activation density of ``model`` on the run's dev split."""
    from .evaluation import evaluate
    from .sites import find_sites
    from .tasks import compute_glue_metrics, get_task, predictions_from_logits

    task = get_task(config.task)
    data, loader = glue_loader(tokenizer, task, task.dev_split, data_dir=data_dir or config.data_dir,
                               max_samples=max_samples, seed=0, batch_size=batch_size, max_length=config.max_length)
    tau = config.threshold if threshold is None else threshold
    out = evaluate(model, loader, sites=find_sites(model, config.site_point), threshold=tau, progress=progress)
    metrics = compute_glue_metrics(task.name, predictions_from_logits(task.name, out.logits), out.labels)
    density = out.density.to_dict()
    return {"split": task.dev_split, "samples": len(data), "metrics": metrics, "main_metric": task.main_metric,
            "metric": metrics[task.main_metric], "density": density["overall"],
            "density_threshold": density["threshold"]["overall"], "union_density": density["union"]["overall"],
            "density_report": density}


def _weight_sparsity(model, targets: str) -> dict:
    from .prune import target_modules, weight_out_in

    zeros = total = 0
    for module in target_modules(model, targets).values():
        w = weight_out_in(module)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"zeros": zeros, "weights": total, "sparsity": zeros / total if total else 0.0}


def prune_and_evaluate(run: str | Path, prune_config, *, data_dir=None, max_samples=None, batch_size: int = 64,
                       threshold=None, calibration=None, progress: bool = True):
    """Load ``run`` fresh, merge its adapters, WANDA-prune it, evaluate it on dev.

    Returns (model, tokenizer, config, info) with ``info`` as written to ``prune.json``.
    ``calibration`` reuses batches from :func:`calibration_batches` (a sweep draws them once).
    """
    from .prune import merge_peft, wanda_prune
    from .train import load_run

    config, model, tokenizer = load_run(check_run_dir(run))
    merged = merge_peft(model)
    was_merged = merged is not model
    batches = calibration if calibration is not None else \
        calibration_batches(tokenizer, config, prune_config, data_dir=data_dir)
    achieved = wanda_prune(merged, batches, prune_config)
    result = evaluate_run_model(merged, tokenizer, config, data_dir=data_dir, max_samples=max_samples,
                                batch_size=batch_size, threshold=threshold, progress=progress)
    info = {
        "source_run": str(run), "mode": config.mode, "method": config.method, "task": config.task,
        "prune": prune_config.to_dict(), "merged": was_merged,
        "sparsity": prune_config.sparsity, "structure": prune_config.structure,
        "achieved_sparsity": _weight_sparsity(merged, prune_config.targets)["sparsity"],
        "per_layer_sparsity": achieved, **result,
    }
    return merged, tokenizer, config, info


def cmd_prune(args) -> int:
    from .pruned_run import save_pruned_run

    run = check_run_dir(args.run)
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


# -- sweep ---------------------------------------------------------------------------------------
def sweep_points(sparsities, structures) -> list[tuple[float, str | None]]:
    """(sparsity, structure) points: unstructured levels, then N:M patterns at 1 − N/M."""
    from .prune import check_sparsity, parse_n_m

    points = [(check_sparsity(s), None) for s in (sparsities if sparsities is not None else
                                                  (DEFAULT_SWEEP if not structures else (0.0,)))]
    for st in structures or ():
        n, m = parse_n_m(st)
        points.append((1 - n / m, st))
    if not points:
        raise ValueError("no sparsity levels to sweep")
    return points


def prune_sweep(runs, points, *, targets: str = "mlp_first", calibration_samples: int = 128, seed: int = 0,
                data_dir=None, max_samples=None, batch_size: int = 64, threshold=None, progress: bool = True) -> dict:
    """Every run pruned afresh at every point and evaluated on dev; the ``sweep.json`` payload."""
    from .models import load_tokenizer
    from .prune import PruneConfig
    from .train import TrainConfig

    for run in runs:
        check_run_dir(run)
    out_runs, labels = [], []
    for run in runs:
        config = TrainConfig.from_dict(json.loads((Path(run) / "run_config.json").read_text()))
        label = config.mode.upper()
        labels.append(label)
        tokenizer = load_tokenizer(config.model, config.tokenizer)
        # One calibration sample per run, shared by its points: each point prunes a fresh copy of
        # the same trained model, so only the sparsity differs between them.
        calib = calibration_batches(tokenizer, config, PruneConfig(calibration_samples=calibration_samples, seed=seed),
                                    data_dir=data_dir)
        rows, info = [], {}
        for sparsity, structure in points:
            cfg = PruneConfig(sparsity=sparsity, structure=structure, targets=targets,
                              calibration_samples=calibration_samples, seed=seed)
            print(f"== {label} {run}: {structure or f'{sparsity:.0%}'}")
            _, _, _, info = prune_and_evaluate(run, cfg, data_dir=data_dir, max_samples=max_samples,
                                               batch_size=batch_size, threshold=threshold, calibration=calib,
                                               progress=progress)
            rows.append({k: info[k] for k in ("sparsity", "structure", "achieved_sparsity", "metric", "metrics",
                                              "density", "density_threshold", "union_density", "samples")}
                        | {"per_layer_density": [r["density"] for r in info["density_report"]["per_layer"]]})
        out_runs.append({"run": str(run), "label": label, "mode": config.mode, "method": config.method,
                         "model": config.model, "task": config.task, "main_metric": info["main_metric"],
                         "tau": info["density_report"]["threshold"]["tau"], "points": rows})
    # Two runs of the same mode (two seeds, say) are told apart by their directory.
    for entry in out_runs:
        if labels.count(entry["label"]) > 1:
            entry["label"] = f"{entry['label']} ({Path(entry['run']).name})"
    return {"targets": targets, "calibration_samples": calibration_samples, "seed": seed,
            "eval_max_samples": max_samples, "runs": out_runs}


def plot_sweep(payload: dict, path: str | Path, title: str = "") -> None:
    """The paper's Fig. 4: metric vs sparsity and activation density vs sparsity, one colour per
    run; exact density solid, threshold density dashed; N:M points as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"PEFT": "tab:blue", "DEFT": "tab:orange"}
    palette = iter(["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray"])
    for entry in payload["runs"]:
        color = colors.get(entry["label"]) or next(palette, "black")
        lines = [p for p in entry["points"] if p["structure"] is None]
        stars = [p for p in entry["points"] if p["structure"] is not None]
        xs = [100 * p["sparsity"] for p in lines]
        ax_m.plot(xs, [100 * p["metric"] for p in lines], "o-", color=color, label=entry["label"])
        ax_d.plot(xs, [100 * p["density"] for p in lines], "o-", color=color, label=f"{entry['label']} exact")
        ax_d.plot(xs, [100 * p["density_threshold"] for p in lines], "s--", color=color,
                  label=f"{entry['label']} |a|>{entry['tau']:g}")
        for p in stars:
            x = 100 * p["sparsity"]
            ax_m.plot([x], [100 * p["metric"]], "*", color=color, markersize=12)
            ax_m.annotate(p["structure"], (x, 100 * p["metric"]), textcoords="offset points", xytext=(5, 5))
            ax_d.plot([x], [100 * p["density"]], "*", color=color, markersize=12)
            ax_d.annotate(p["structure"], (x, 100 * p["density"]), textcoords="offset points", xytext=(5, 5))
    metric = next((e["main_metric"] for e in payload["runs"] if e["main_metric"]), "metric")
    ax_m.set_ylabel(f"{metric} (%)")
    ax_d.set_ylabel("activation density (%)")
    for ax in (ax_m, ax_d):
        ax.set_xlabel(f"weight sparsity of the pruned layers ({payload['targets']}, %)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_table(payload: dict) -> str:
    rows = []
    for entry in payload["runs"]:
        for p in entry["points"]:
            rows.append((entry["label"], p["structure"] or f"{p['sparsity']:.0%}", pct(p["achieved_sparsity"]),
                         f"{100 * p['metric']:.2f}", pct(p["density"]), pct(p["density_threshold"])))
    tau = payload["runs"][0]["tau"] if payload["runs"] else 0.01
    return format_table(["run", "target", "achieved", "metric", "density", f"|a|>{tau:g}"], rows)


def cmd_prune_sweep(args) -> int:
    for run in args.run:
        check_run_dir(run)
    points = sweep_points(args.sparsities, args.structure)
    payload = prune_sweep(args.run, points, targets=args.targets, calibration_samples=args.calibration_samples,
                          seed=args.seed, data_dir=args.data_dir, max_samples=args.max_samples,
                          batch_size=args.batch_size, threshold=args.threshold)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "sweep.json", payload)
    first = payload["runs"][0]
    plot_sweep(payload, out / "sweep.png", title=f"WANDA · {first['model']} · {first['method']} · {first['task']}")
    print(f"wrote {out / 'sweep.png'}\n")
    print(sweep_table(payload))
    return 0


# -- parser ------------------------------------------------------------------------------------
def _common_eval(p, batch_default: int = 64):
    p.add_argument("--max-samples", type=int, default=None, help="evaluate on a random dev subset of this size")
    p.add_argument("--batch-size", type=int, default=batch_default, help="evaluation batch size")
    p.add_argument("--threshold", type=float, default=None, help="τ of the threshold density (default: the run's)")
    p.add_argument("--data-dir", default=None, help="GLUE data directory (default: the run's, else $DEFT_DATA_DIR)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")


def _prune_options(p):
    from .prune import TARGETS

    p.add_argument("--targets", choices=TARGETS, default="mlp_first",
                   help="mlp_first: the first dense layer of every MLP (the paper's setting); "
                        "all_linear: every linear layer of the backbone (task head excluded)")
    p.add_argument("--calibration-samples", type=int, default=128,
                   help="random training samples whose activation norms score the weights (default 128, as the paper)")


def add_commands(sub) -> None:
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
    p.add_argument("--max-samples", type=int, default=None, help="a random subset of the split")
    p.add_argument("--batch-size", type=int, default=1,
                   help="inputs per model call (default 1, the sponge/Lazzaro setting: the ASIC reads every "
                        "weight once per call, so larger batches share the weight reads and move the ratio "
                        "towards the activations' sparsity alone)")
    p.add_argument("--max-length", type=int, default=None, help="truncation (default: the run's, else 128)")
    p.add_argument("--zero-threshold", type=float, default=None, metavar="TAU",
                   help="values with |x| <= TAU count as zero, weights and activations alike (default 2^-126, "
                        "the sponge estimator's fp32 test; GELU is almost never exactly 0, so e.g. 0.01 models "
                        "a thresholded deployment)")
    p.add_argument("--data-dir", default=None, help="GLUE data directory (default: the run's, else $DEFT_DATA_DIR)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-samples subset")
    p.add_argument("--json", default=None, metavar="FILE", help="write energy_ratio, energy_change and the breakdown")
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


__all__ = ["add_commands", "check_run_dir", "load_subject", "measure_energy", "block_breakdown", "energy_tables",
           "prune_config_from", "calibration_batches", "evaluate_run_model", "prune_and_evaluate", "sweep_points",
           "prune_sweep", "plot_sweep", "sweep_table", "DEFAULT_SWEEP"]
