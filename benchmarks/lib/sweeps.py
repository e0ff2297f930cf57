"""Density sweeps a benchmark needs (``deft density-sweep`` on one run), cached next to the run and
reused while their settings match, so benchmarks that share a run share its sweep."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from deft.deploy import density_sweep


def sweep_or_reuse(run_dir: Path, targets: Sequence[float], *, calibration_samples: int, mode: str = "uniform",
                   data_dir: str | None = None, point: str = "act", split: str | None = None) -> dict:
    """The sweep of ``run_dir`` at ``targets`` (one run's entry of ``sweep.json``), thresholds at ``point``,
    scored on ``split`` (default the run's evaluation split)."""
    key = {"targets": list(targets), "calibration_samples": calibration_samples, "mode": mode}
    name = "deployed_density_sweep" if mode == "uniform" else f"density_sweep_{mode}"
    if point != "act":
        key["point"] = point
        name += f"_{point}"
    if split:
        key["split"] = split
        name += f"_{split}"
    cache = Path(run_dir) / f"{name}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["sweep"]
    sweep = density_sweep([str(run_dir)], targets, mode=mode, calibration_samples=calibration_samples,
                          data_dir=data_dir, progress=True, point=point, split=split)["runs"][0]
    cache.write_text(json.dumps({"key": key, "sweep": sweep}, indent=2))
    return sweep
