"""Timing variants side by side: interleaved in a rotating order (machine noise hits all alike),
warm-up first, the median of many repetitions reported with every sample."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Call every variant ``warmup`` times, then ``repeats`` rounds in a rotating order, timing each
    call with ``perf_counter``; ``{name: {"median": s, "all": [s, ...]}}``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {n: {"median": statistics.median(t), "all": t} for n, t in times.items()}
