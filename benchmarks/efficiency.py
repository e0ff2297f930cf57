"""Energy change and WANDA pruning curves, DEFT vs PEFT, on SST-2 (the paper's Table 2 and Fig. 4).

Input: the two runs of ``deft compare`` (MiniLM + LoRA on SST-2 by default), i.e. a compare
directory holding ``peft-seed0/`` and ``deft-seed0/`` (or ``--peft``/``--deft`` directories).

Output, in ``--results-dir`` (default ``benchmarks/results``):

* ``energy_sst2.json`` — energy ratio of a zero-skipping ASIC for each run on SST-2 dev (batch
  size 1, the sponge/Lazzaro setting) and the energy change (ER_PEFT − ER_DEFT) / ER_PEFT × 100,
  at the sponge estimator's zero test and at |x| ≤ τ (see ``--zero-threshold``);
* ``prune_sweep_sst2.json`` and ``prune_sweep_sst2.png`` — metric and activation density of
  both runs WANDA-pruned at each sparsity (first MLP dense layer, 128 calibration samples).

Full run (after ``DEFT_DATA_DIR=../shared/data deft compare``, which writes runs/compare)::

    DEFT_DATA_DIR=../shared/data python benchmarks/efficiency.py --compare-dir runs/compare

``--max-samples`` / ``--energy-samples`` / ``--sparsities`` / ``--calibration-samples`` shrink it
for a smoke test; every setting is recorded in the JSON next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runnable from a checkout without installing

from deft.analysis.energy import EnergyConfig, energy_change  # noqa: E402
from deft.analysis.energy_runs import load_subject, measure_energy  # noqa: E402
from deft.analysis.prune_runs import DEFAULT_SWEEP, plot_sweep, prune_sweep, sweep_points  # noqa: E402
from deft.training import RunDir  # noqa: E402


def energy_pair(peft: str, deft: str, *, zero_threshold: float | None, samples: int | None, seed: int) -> dict:
    """Energy ratios of both runs on the same SST-2 dev inputs, and the energy change."""
    config = EnergyConfig() if zero_threshold is None else EnergyConfig(zero_threshold=zero_threshold)
    out = {"zero_threshold": config.zero_threshold}
    reports = {}
    for mode, run in (("peft", peft), ("deft", deft)):
        subject = load_subject(run=run)
        started = time.perf_counter()
        report, n, split = measure_energy(subject, max_samples=samples, batch_size=1, seed=seed, config=config)
        reports[mode] = report
        out[mode] = {"run": run, "energy_ratio": report.energy_ratio, "mean_batch_ratio": report.mean_batch_ratio,
                     "by_kind": report.by_kind(), "tokens": report.tokens, "samples": n, "split": split,
                     "seconds": time.perf_counter() - started}
    out["energy_change"] = energy_change(reports["peft"], reports["deft"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare-dir", default="runs/compare", help="output of `deft compare` (peft-seed0/, deft-seed0/)")
    p.add_argument("--seed", type=int, default=0, help="which seed's runs of the compare directory")
    p.add_argument("--peft", default=None, help="PEFT run directory (overrides --compare-dir)")
    p.add_argument("--deft", default=None, help="DEFT run directory (overrides --compare-dir)")
    p.add_argument("--energy-samples", type=int, default=None, help="SST-2 dev inputs for the energy (default: all)")
    p.add_argument("--zero-threshold", type=float, default=0.01,
                   help="second energy estimate with |x| <= τ counted as zero (default 0.01, the threshold "
                        "density's τ; GELU outputs are almost never exactly 0)")
    p.add_argument("--max-samples", type=int, default=None, help="dev examples per sweep evaluation (default: all)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SWEEP))
    p.add_argument("--structure", nargs="*", default=["2:4", "4:8"], metavar="N:M", help="N:M points of the sweep")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--skip-energy", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    peft = args.peft or str(Path(args.compare_dir) / f"peft-seed{args.seed}")
    deft = args.deft or str(Path(args.compare_dir) / f"deft-seed{args.seed}")
    RunDir(peft).check()
    RunDir(deft).check()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    runs = {"peft": peft, "deft": deft, "peft_config": json.loads((Path(peft) / "run_config.json").read_text()),
            "deft_config": json.loads((Path(deft) / "run_config.json").read_text())}

    if not args.skip_energy:
        started = time.perf_counter()
        energy = {"exact": energy_pair(peft, deft, zero_threshold=None, samples=args.energy_samples, seed=args.seed)}
        if args.zero_threshold is not None:
            energy["threshold"] = energy_pair(peft, deft, zero_threshold=args.zero_threshold,
                                              samples=args.energy_samples, seed=args.seed)
        payload = {"benchmark": "energy change DEFT vs PEFT on SST-2 dev (batch size 1)",
                   "energy_change": energy["exact"]["energy_change"], **energy, "runs": runs,
                   "settings": {"energy_samples": args.energy_samples, "zero_threshold": args.zero_threshold},
                   "environment": env, "seconds": time.perf_counter() - started}
        (results / "energy_sst2.json").write_text(json.dumps(payload, indent=2))
        for key, e in energy.items():
            print(f"energy ({key}, zero test |x| <= {e['zero_threshold']:.3g}): ER_PEFT {e['peft']['energy_ratio']:.4f}, "
                  f"ER_DEFT {e['deft']['energy_ratio']:.4f}, energy change {e['energy_change']:.2f}%")
        print(f"wrote {results / 'energy_sst2.json'}")

    if not args.skip_sweep:
        started = time.perf_counter()
        points = sweep_points(args.sparsities, args.structure)
        sweep = prune_sweep([peft, deft], points, calibration_samples=args.calibration_samples, seed=args.seed,
                            max_samples=args.max_samples, progress=False)
        sweep.update({"benchmark": "WANDA pruning sweep, PEFT vs DEFT, SST-2 dev", "environment": env,
                      "seconds": time.perf_counter() - started})
        (results / "prune_sweep_sst2.json").write_text(json.dumps(sweep, indent=2))
        first = sweep["runs"][0]
        plot_sweep(sweep, results / "prune_sweep_sst2.png",
                   title=f"WANDA · {first['model']} · {first['method']} · SST-2 dev")
        for entry in sweep["runs"]:
            for p in entry["points"]:
                print(f"{entry['label']:6} {p['structure'] or format(p['sparsity'], '.0%'):>5}: metric "
                      f"{100 * p['metric']:.2f}, density {100 * p['density']:.2f}%, |a|>τ "
                      f"{100 * p['density_threshold']:.2f}%")
        print(f"wrote {results / 'prune_sweep_sst2.json'} and {results / 'prune_sweep_sst2.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
