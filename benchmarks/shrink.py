"""Shrunk DEFT vs PEFT on MiniLM SST-2 dev: throughput at batch 1 and 32, and the metric both sides.

The DEFT run (by default the threshold in the loop with whole neurons as the zeros,
``--train-density 0.1 --train-density-form neuron``: the training that silences neurons for the
whole task, which removing them needs) is thresholded (``deft sparsify`` at ``--density``, or its own thresholds from
``--train-density`` when ``--density`` is not given), then shrunk (``deft shrink``: the MLP
neurons never active on ``--calibration-samples`` training examples removed). The PEFT run is the
plain dense model, LoRA merged, no thresholds: what would be deployed without DEFT. Both are
timed side by side on the same dev sentences (``lib.timing.interleaved_medians``: rotating
order, median of ``--repeats`` ≥ 30 passes), each pass running the sentences in batches of 1
and of 32; metrics on the full dev set. With ``--compile`` both models are also timed compiled by
``torch.compile`` (inductor, dynamic shapes; the same call for both, outputs checked against eager):
rows with ``compiled: true`` beside the eager ones — at batch 1 the eager forward's fixed per-op
cost, which removing neurons cannot shrink, is part of what compilation removes.

Rows: ``batch_size``, ``throughput_ratio`` (sentences/s shrunk / PEFT), ``metric_shrunk``,
``metric_peft`` (points), ``neurons_removed_share``, ``blocks_removed`` (MLP blocks left with no
neuron), plus the medians. A dev metric of one seed moves by points between seeds (SST-2's dense
PEFT model: 72.7–80.6 over seeds 0–2), so ``--seed-pair PEFT DEFT`` (repeatable) shrinks and
scores other seeds' runs too: ``seed_pairs`` and ``seed_mean`` in the JSON, and
``metric_*_seed_mean`` in every row (timing is read on the first pair). The source runs are only
read; the thresholded and shrunk runs go under ``--runs-dir`` and are reused. Without
``--peft-run`` / ``--deft-run`` the runs are trained there (``lib.runs.run_or_reuse``, the main
job's budget). Writes ``benchmarks/results/shrink.json``::

    DEFT_DATA_DIR=../shared/data python benchmarks/shrink.py \\
        --peft-run runs/deployed_density/sst2/e1-n2000/peft+thresholds \\
        --deft-run runs/deployed_density/sst2/e1-n2000/peft+train_density=0.1+form=neuron
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from lib.runs import run_or_reuse
from lib.results import cpu_model, write_result
from lib.timing import interleaved_medians

from deft.core.thresholds import remove_thresholds
from deft.deploy import sparsify_run
from deft.deploy.shrink import shrink_run
from deft.methods import merge_peft
from deft.tasks.runners.glue import without_labels
from deft.training import RunDir, TrainConfig, load_run, task_runner

HERE = Path(__file__).resolve().parent


def source_runs(args) -> tuple[Path, Path]:
    """The PEFT and DEFT runs: as given, or trained (reused) under --runs-dir."""
    runs = Path(args.runs_dir)
    peft, deft = args.peft_run, args.deft_run
    if peft is None:
        peft = runs / "peft"
        run_or_reuse(TrainConfig(task="sst2", mode="peft", data_dir=args.data_dir), peft, note="sst2 ")
    if deft is None:
        deft = runs / "peft+train_density=0.1+form=neuron"
        run_or_reuse(TrainConfig(task="sst2", mode="peft", train_density=0.1, train_density_form="neuron",
                                 data_dir=args.data_dir), deft, note="sst2 ")
    for run in (peft, deft):
        RunDir(run).check()
    return Path(peft), Path(deft)


def thresholded_run(deft: Path, args, under: str = "") -> Path:
    """The DEFT run with thresholds: its own (no --density), else sparsified at --density (reused)."""
    if args.density is None:
        if not (deft / RunDir.THRESHOLDS).is_file():
            raise SystemExit(f"{deft} has no thresholds: give --density to sparsify it")
        return deft
    out = Path(args.runs_dir) / under / f"{deft.name}-d{args.density:g}"
    done = RunDir(out).read_json("sparsify.json")
    if not (done and done["source_run"] == str(deft) and done["thresholds"]["target_density"] == args.density
            and done["thresholds"]["calibration"]["samples"] == args.calibration_samples):
        print(f"== sparsify {deft} at density {args.density:g} -> {out}", flush=True)
        sparsify_run(str(deft), str(out), density=args.density, calibration_samples=args.calibration_samples,
                     force=True, data_dir=args.data_dir, progress=False)
    return out


def shrunk_run(source: Path, args, under: str = "") -> tuple[Path, dict]:
    """``deft shrink`` of ``source`` under --runs-dir[/under] (reused when the settings match) and its summary."""
    out = Path(args.runs_dir) / under / f"{source.name}-shrunk"
    saved = RunDir(out).read_json(RunDir.SHRINK)
    want = {"samples": args.calibration_samples, "max_dead_share": args.max_dead_share}
    summary = saved.get("summary") if saved else None
    if not (summary and summary["source_run"] == str(source)
            and {k: summary["calibration"][k] for k in want} == want):
        print(f"== shrink {source} -> {out}", flush=True)
        summary = shrink_run(str(source), str(out), calibration_samples=args.calibration_samples,
                             max_dead_share=args.max_dead_share, data_dir=args.data_dir, progress=False)
    return out, summary


def pair_metrics(peft_dir: Path, shrunk_dir: Path, args):
    """The task runner, tokenizer, both deployed models and their dev metrics (points)."""
    config, peft, tokenizer = load_run(peft_dir)
    peft = merge_peft(remove_thresholds(peft))  # the dense PEFT model as deployed: no thresholds, LoRA merged
    _, shrunk, _ = load_run(shrunk_dir)
    runner = task_runner(config)
    metric = runner.task.main_metric
    metrics = {name: 100 * runner.evaluate_model(model, tokenizer, max_samples=args.max_eval_samples,
                                                 data_dir=args.data_dir, progress=False).metrics[metric]
               for name, model in (("peft", peft), ("shrunk", shrunk))}
    return runner, tokenizer, peft, shrunk, metrics


def seed_record(peft_dir: Path, deft_dir: Path, shrunk_dir: Path, metrics: dict, summary: dict) -> dict:
    """One entry of ``seed_pairs``: the runs and both sides' metrics."""
    return {"peft_run": str(peft_dir), "deft_run": str(deft_dir), "shrunk_run": str(shrunk_dir),
            "metric_peft": metrics["peft"], "metric_shrunk": metrics["shrunk"],
            "neurons_removed_share": summary["neurons_removed_share"]}


def timing_batches(runner, tokenizer, args, batch_size: int) -> list[dict]:
    _, loader = runner.loader(tokenizer, runner.task.dev_split, max_samples=args.timing_samples or None,
                              batch_size=batch_size, data_dir=args.data_dir)
    return list(without_labels(loader))


def compiled_error(models: dict, batches: list[dict]) -> float:
    """Largest |logit| difference between each compiled model and its eager self on ``batches``."""
    worst = 0.0
    for name in ("peft", "shrunk"):
        for b in batches[:16]:
            worst = max(worst, float((models[name + "+compile"](**b).logits - models[name](**b).logits).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peft-run", default=None, help="PEFT run directory (default: trained under --runs-dir)")
    ap.add_argument("--deft-run", default=None, help="DEFT run directory (default: trained under --runs-dir)")
    ap.add_argument("--seed-pair", nargs=2, action="append", default=[], metavar=("PEFT_RUN", "DEFT_RUN"),
                    help="another seed's PEFT and DEFT runs, shrunk and scored too (metrics only; repeatable): "
                         "seed_pairs and seed_mean in the JSON")
    ap.add_argument("--density", type=float, default=None,
                    help="sparsify the DEFT run at this target density (default: use its own thresholds)")
    ap.add_argument("--calibration-samples", type=int, default=256,
                    help="training examples for the thresholds and the dead-neuron count (default 256)")
    ap.add_argument("--max-dead-share", type=float, default=0.0, help="deft shrink --max-dead-share (default 0)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads, one set of rows each")
    ap.add_argument("--timing-samples", type=int, default=256, help="dev sentences per timed pass (0 = all)")
    ap.add_argument("--repeats", type=int, default=30, help="timed passes per variant (median; >= 30)")
    ap.add_argument("--max-eval-samples", type=int, default=0, help="dev examples for the metrics (0 = all)")
    ap.add_argument("--compile", action="store_true",
                    help="also time both models compiled by torch.compile (rows with compiled: true)")
    ap.add_argument("--data-dir", default=None, help="data directory (default: the runs', else $DEFT_DATA_DIR)")
    ap.add_argument("--runs-dir", default="runs/shrink", help="where derived (and default) runs go")
    ap.add_argument("--out", default=str(HERE / "results" / "shrink.json"))
    args = ap.parse_args()
    if args.repeats < 30:
        ap.error("--repeats must be >= 30 (medians of fewer passes are noise on a shared machine)")

    pairs = [(Path(a), Path(b)) for a, b in args.seed_pair]
    for run in (r for pair in pairs for r in pair):
        try:
            RunDir(run).check()  # before any of the long work
        except (FileNotFoundError, ValueError) as err:
            ap.error(f"--seed-pair: {err}")
    peft_dir, deft_dir = source_runs(args)
    shrunk_dir, summary = shrunk_run(thresholded_run(deft_dir, args), args)
    runner, tokenizer, peft, shrunk, metrics = pair_metrics(peft_dir, shrunk_dir, args)
    print(f"{runner.task.main_metric}: PEFT {metrics['peft']:.2f}, shrunk DEFT {metrics['shrunk']:.2f}; "
          f"{100 * summary['neurons_removed_share']:.1f}% of MLP neurons removed", flush=True)
    seeds = [seed_record(peft_dir, deft_dir, shrunk_dir, metrics, summary)]
    for i, (other_peft, other_deft) in enumerate(pairs, 1):  # accuracy only: the timing needs one pair
        other_dir, other = shrunk_run(thresholded_run(other_deft, args, under=f"pair{i}"), args, under=f"pair{i}")
        seeds.append(seed_record(other_peft, other_deft, other_dir, pair_metrics(other_peft, other_dir, args)[-1], other))
        print(f"pair {i}: PEFT {seeds[-1]['metric_peft']:.2f}, shrunk DEFT {seeds[-1]['metric_shrunk']:.2f}; "
              f"{100 * other['neurons_removed_share']:.1f}% removed", flush=True)
    mean = {k: statistics.fmean(p[k] for p in seeds) for k in ("metric_peft", "metric_shrunk")}

    models = {"peft": peft, "shrunk": shrunk}
    if args.compile:  # the same compilation for both sides; the eager models stay for the eager rows
        models.update({"peft+compile": torch.compile(peft, dynamic=True), "shrunk+compile": torch.compile(shrunk, dynamic=True)})
    rows = []
    initial_threads = torch.get_num_threads()
    with torch.inference_mode():
        for threads, batch_size in ((t, b) for t in args.threads for b in args.batch_sizes):
            torch.set_num_threads(threads)
            batches = timing_batches(runner, tokenizer, args, batch_size)
            sentences = sum(b["input_ids"].shape[0] for b in batches)

            def over(model):
                return lambda: [model(**b) for b in batches]

            variants = {name: over(model) for name, model in models.items()}
            t = interleaved_medians(variants, repeats=args.repeats, warmup=2)
            for kind in ("", "+compile") if args.compile else ("",):
                med = {k: t[k + kind]["median"] for k in ("peft", "shrunk")}
                row = {"batch_size": batch_size, "threads": threads, "compiled": bool(kind),
                       "throughput_ratio": med["peft"] / med["shrunk"],
                       "metric_shrunk": metrics["shrunk"], "metric_peft": metrics["peft"],
                       "metric_shrunk_seed_mean": mean["metric_shrunk"], "metric_peft_seed_mean": mean["metric_peft"],
                       "neurons_removed_share": summary["neurons_removed_share"],
                       "blocks_removed": summary["blocks_removed"],
                       "mlp_params_removed_share": summary["mlp_params_removed_share"],
                       "sentences_per_pass": sentences, "median_seconds": med,
                       "throughput": {k: sentences / v for k, v in med.items()}, "repeats": args.repeats}
                if kind:
                    row["max_abs_logit_diff_vs_eager"] = compiled_error(models, batches)
                rows.append(row)
                print(f"batch {batch_size:>3}, {threads} thread(s){' compiled' if kind else ''}: PEFT "
                      f"{row['throughput']['peft']:8.1f}/s  shrunk {row['throughput']['shrunk']:8.1f}/s  "
                      f"(x{row['throughput_ratio']:.3f})", flush=True)

    torch.set_num_threads(initial_threads)
    result = {
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": initial_threads,
                    "load_average": os.getloadavg()},
        "peft_run": str(peft_dir), "deft_run": str(deft_dir), "shrunk_run": str(shrunk_dir),
        "density": args.density, "calibration_samples": args.calibration_samples,
        "max_dead_share": args.max_dead_share, "main_metric": runner.task.main_metric, "compile": args.compile,
        "shrink": {k: summary[k] for k in ("neurons_before", "neurons_after", "neurons_removed_share",
                                           "blocks_removed", "mlp_params_removed_share", "params_before",
                                           "params_after", "layers")},
        "seed_pairs": seeds, "seed_mean": {**mean, "delta": mean["metric_shrunk"] - mean["metric_peft"]},
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
