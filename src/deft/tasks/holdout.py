"""Held-out training examples: a seeded share of a task's training split set aside, never trained
on, to choose an operating point on without touching the dev split that reports it."""

from __future__ import annotations

import numpy as np

__all__ = ["HELDOUT_SPLIT", "holdout_indices"]

#: The pseudo-split of training examples set aside by ``holdout`` (see :func:`deft.tasks.glue.load_glue`).
HELDOUT_SPLIT = "heldout"


def holdout_indices(n: int, holdout: int, seed: int) -> np.ndarray:
    """Sorted row numbers of the ``holdout`` training examples set aside (of ``n``): the first
    ``holdout`` of a permutation seeded apart from the one ``max_samples`` subsets are drawn from, so a subset drawn from the
    rest is not biased toward or away from the held-out rows."""
    if not 0 < holdout < n:
        raise ValueError(f"holdout must lie in [1, {n - 1}] for a training split of {n} examples, got {holdout}")
    return np.sort(np.random.default_rng((seed, 1)).permutation(n)[:holdout])
