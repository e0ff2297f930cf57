"""Measuring a deployed model: bytes held, one timed pass, peak memory in a fresh process."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def timed_pass(model: nn.Module, batches: Sequence[dict]) -> tuple[float, torch.Tensor]:
    """(seconds, logits) of one pass over pre-collated ``batches`` (no hooks, no grad)."""
    model.eval()
    device = next(model.parameters()).device
    logits = []
    start = time.perf_counter()
    for batch in batches:
        out = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        logits.append(out.logits.float().cpu())
    return time.perf_counter() - start, torch.cat(logits)


# Run in a fresh interpreter by `peak_memory_of_export`. Linux's peak-RSS counter (VmHWM) is reset
# (writing 5 to /proc/self/clear_refs) after the imports and again after loading, so the loading's
# transient copies and the inference pass are measured apart, each over the process's own baseline.


def peak_memory_of_export(export_dir: str | Path, batches_file: str | Path, threads: int | None = None) -> dict:
    """Memory of an export (:func:`load_exported`) in a fresh Python process, as a deployment sees it.

    Over the process's resident set before loading: ``resident_bytes`` after loading (what the
    model holds), ``peak_bytes`` the peak during one inference pass over the saved batches
    (model + activations), ``load_peak_bytes`` the peak while loading (the loader's transient
    copies). Skipped blocks are never allocated there. Needs Linux's /proc.
    """
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("peak-memory measurement needs Linux /proc (VmHWM reset); pass --no-peak-memory")
    cmd = [sys.executable, "-m", "deft.deploy.peak_memory_child", str(export_dir), str(batches_file),
           str(threads or torch.get_num_threads())]
    # glibc keeps freed heap memory resident and moves its mmap threshold with the workload, which
    # made repeated measurements differ by ~15%. Serving every allocation over 64 KiB by mmap
    # returns it to the system on free, so the resident set follows live memory (repeats agree
    # within 0.2 MiB on MiniLM).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory process for {export_dir} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
