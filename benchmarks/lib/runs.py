"""Training runs a benchmark needs, reused when a finished run with the same settings exists, so
an interrupted benchmark picks up where it stopped."""

from __future__ import annotations

import shutil
from pathlib import Path

from deft.training import RunDir, TrainConfig, train


def run_or_reuse(config: TrainConfig, run_dir: Path, *, note: str = "") -> dict:
    """``results.json`` of ``run_dir`` if it was trained with ``config``; else train it (resuming
    from its checkpoints when the settings match, from scratch when they do not)."""
    run = RunDir(run_dir)
    done = run.results()
    if done is not None and config.same_run(done["config"]):
        return done
    if run.is_run() and not config.same_run(run.read_config()):
        print(f"== {run_dir} holds a run with other settings: starting it again", flush=True)
        shutil.rmtree(run_dir)  # a scratch run of the benchmark (under its --runs-dir), not user data
    print(f"== training {config.mode.upper()} {note}-> {run_dir}", flush=True)
    return train(config, run_dir, resume=Path(run_dir).exists(), progress=False)
