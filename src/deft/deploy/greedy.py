"""Block-wise greedy allocation of per-layer densities (TEAL's idea): ``deft sparsify --mode greedy``.

``uniform`` puts every layer at the target density; but layers differ in how much their output
suffers when small activations are dropped. Greedy allocation starts with every layer dense and
repeatedly lowers the density of the layer whose block output error grows least per unit of
density removed, until the mean layer density reaches the target.

The error of layer l at density d is measured on calibration tokens as ‖down(P) − down(P ⊙
1[|A| > τ_l(d)])‖², with A the site's activation (σ's output, or the gate for gated MLPs), P the
down projection's input (A itself for plain MLPs, the gated product for gated ones) and τ_l(d)
the (1 − d) quantile of |A| — so the error is the one the thresholded block really makes. TEAL
measures the same error for the same reason (its allocation is written for its own models and
kernels; nothing here is taken from a maintained library, which none offers for transformers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.layers import unwrap_model
from ..core.thresholds import quantile_of_magnitudes

#: Densities each layer can step through (finer near 0, where errors grow fastest).
DENSITY_GRID = tuple([round(1 - 0.05 * k, 2) for k in range(19)] + [0.05, 0.03, 0.02, 0.01])
#: Calibration rows (real tokens) per site on which block errors are measured.
ROWS_PER_SITE = 2048


class RowSampler:
    """Keeps the first ``max_rows`` real-token rows of each site's activation (a capture meter)."""

    def __init__(self, n_sites: int, max_rows: int = ROWS_PER_SITE):
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(n_sites)]
        self.kept = [0] * n_sites
        self.max_rows = max_rows

    @torch.no_grad()
    def update(self, index: int, act: torch.Tensor, mask: torch.Tensor) -> None:
        room = self.max_rows - self.kept[index]
        if room > 0:
            rows = act[mask].reshape(-1, act.shape[-1])[:room].float().cpu()
            self.rows[index].append(rows)
            self.kept[index] += rows.shape[0]

    def end_sequences(self) -> None:  # the capture's meter protocol; nothing per sequence here
        pass

    def result(self) -> list[torch.Tensor]:
        return [torch.cat(chunks) if chunks else torch.zeros(0, 0) for chunks in self.rows]


@torch.no_grad()
def block_errors(down: nn.Module, acts: torch.Tensor, inputs: torch.Tensor, taus: Sequence[float],
                 chunk: int = 512) -> list[float]:
    """Mean squared output error of ``down`` per token when entries of ``inputs`` whose activation
    magnitude is ≤ τ are zeroed, for each τ of ``taus``."""
    param = next(down.parameters())
    errors = []
    for tau in taus:
        total = 0.0
        for lo in range(0, acts.shape[0], chunk):
            a, p = acts[lo:lo + chunk], inputs[lo:lo + chunk]
            dropped = p.masked_fill(a.abs() > tau, 0)  # what the threshold removes
            # down is affine: down(p) − down(p − dropped) = down(dropped) − down(0).
            delta = down(dropped.to(param.dtype).to(param.device)) - down(torch.zeros_like(dropped[:1]).to(
                param.dtype).to(param.device))
            total += float(delta.float().pow(2).sum())
        errors.append(total / max(acts.shape[0], 1))
    return errors


def allocate(errors: Sequence[Sequence[float]], target: float, grid: Sequence[float] = DENSITY_GRID) -> list[float]:
    """Per-layer densities with mean ``target``: greedy on error added per density removed.

    ``errors[l][k]``: layer l's error at density ``grid[k]`` (grid descending from 1). The last
    step is taken only in part, so the mean hits ``target`` exactly."""
    n = len(errors)
    step = [0] * n
    densities = [float(grid[0])] * n
    while sum(densities) / n > target + 1e-12:
        best, best_cost = None, float("inf")
        for layer in range(n):
            k = step[layer]
            if k + 1 >= len(grid):
                continue
            gain = grid[k] - grid[k + 1]
            cost = max(errors[layer][k + 1] - errors[layer][k], 0.0) / gain
            if cost < best_cost:
                best, best_cost = layer, cost
        if best is None:  # every layer at the grid's floor
            break
        excess = sum(densities) * 1.0 - target * n
        k = step[best]
        drop = grid[k] - grid[k + 1]
        if drop >= excess:
            densities[best] -= excess
            break
        step[best] += 1
        densities[best] = float(grid[step[best]])
    return densities


def greedy_taus(model: nn.Module, sites: Sequence, magnitudes: Sequence[torch.Tensor], acts: Sequence[torch.Tensor],
                inputs: Sequence[torch.Tensor], target: float, grid: Sequence[float] = DENSITY_GRID
                ) -> tuple[list[float], list[float]]:
    """(τ per site, the density allocated to it) for mean density ``target``.

    ``sites``: the act-point sites (their ``down`` module is the block's down projection);
    ``magnitudes``: |A| per site (for the quantiles); ``acts`` / ``inputs``: the same calibration
    rows of A and of the down projection's input per site."""
    base = unwrap_model(model)
    errors = []
    for site, values, a, p in zip(sites, magnitudes, acts, inputs):
        if site.down is None:
            raise ValueError(f"greedy allocation needs each block's down projection; {site.module} has none")
        taus = [quantile_of_magnitudes(values, 1 - d) if d < 1 else -1.0 for d in grid]
        errors.append(block_errors(base.get_submodule(site.down), a, p, taus))
    densities = allocate(errors, target, grid)
    taus = [quantile_of_magnitudes(v, 1 - d) if d < 1 else 0.0 for v, d in zip(magnitudes, densities)]
    return taus, densities
