"""Activation density, streamed over a whole evaluation set (METHOD.md §2).

:class:`DensityMeter` keeps a handful of integer counters per site — never the activations —
so memory stays flat however large the evaluation set is. Per site it counts, over real
tokens only:

* exact density: share of entries ``a != 0``;
* threshold density: share of entries ``|a| > τ`` (what a zero-skipping kernel or a
  thresholded deployment can exploit; GELU is exactly 0 only far below zero);
* union density per sequence: share of neurons active (``|a| > τ_u``, τ_u = 0 → exact) for at
  least one token of the sequence — what decides whether a dense kernel could skip a neuron
  for a whole sequence.

Model density is the mean over layers (as the paper averages across layers); per-stack
numbers are means over that stack's layers. A routed-experts site (mixture of experts) counts
the (real token, expert) pairs the router chose, and reports each expert's density over the
tokens routed to it (``experts`` in its per-layer row). A module that serves several layers
(ALBERT shares one MLP across all of them) is one row per layer: :meth:`DensityMeter.layer_row`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .sites import STACKS, ActivationSite


@dataclass
class SiteCounts:
    """Running counts for one activation site."""

    elements: int = 0  # real tokens × width
    nonzero: int = 0
    above: int = 0  # |a| > threshold
    tokens: int = 0
    union_active: int = 0  # Σ over sequences of #neurons active for ≥ 1 token
    union_total: int = 0  # Σ over sequences of width


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


@dataclass
class DensityMeter:
    """Streams density statistics for a list of sites; fed by :class:`deft.core.capture.ActivationCapture`."""

    sites: tuple[ActivationSite, ...]
    threshold: float = 1e-2
    counts: list[SiteCounts] = field(default_factory=list)

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(f"density threshold must be >= 0, got {self.threshold}")
        self.sites = tuple(self.sites)
        self.counts = [SiteCounts() for _ in self.sites]
        self.expert_counts = self._no_expert_counts()  # routed sites: per expert
        self._union: dict[int, torch.Tensor] = {}  # per site: (B, width) bool, current sequences
        self._rows: dict[tuple[int, int], int] = {}  # (site, its n-th call in a model call) -> row
        self._positions: dict[int, int] = {}  # row -> place of its call among its stack's calls

    @torch.no_grad()
    def update(self, index: int, act: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one activation tensor ``act`` (B, T, h) with real-token ``mask`` (B, T) bool."""
        c = self.counts[index]
        width = act.shape[-1]
        m = mask.unsqueeze(-1)
        nz = (act != 0) & m
        c.nonzero += int(nz.sum())
        c.above += int(((act.abs() > self.threshold) & m).sum())
        n_tokens = int(mask.sum())
        c.tokens += n_tokens
        c.elements += n_tokens * width
        self._union_add(index, nz.any(dim=1), mask.any(dim=1))  # (B, h); sequences with a real token

    @torch.no_grad()
    def update_routed(self, index: int, act: torch.Tensor, real: torch.Tensor, routed) -> None:
        """Add the rows ``act`` (S, w) of a routed-experts activation, ``real`` (S,) bool marking rows of
        real tokens; ``routed`` (:class:`deft.core.experts.Routed`) gives each row's expert and sequence.
        Elements are (real token, expert) pairs × w; union density is per (sequence, expert): an
        expert's neurons active for at least one of the sequence's tokens routed to it."""
        c = self.counts[index]
        width = act.shape[-1]
        nz = (act != 0) & real.unsqueeze(-1)
        per_row = nz.sum(dim=-1)
        c.nonzero += int(per_row.sum())
        c.above += int(((act.abs() > self.threshold) & real.unsqueeze(-1)).sum())
        c.tokens += routed.tokens
        c.elements += int(real.sum()) * width
        per_expert = self.expert_counts[index]
        rows = real.nonzero().reshape(-1)
        experts = routed.experts[rows]
        pairs = torch.bincount(experts, minlength=routed.n_experts).tolist()
        nonzero = torch.bincount(experts, weights=per_row[rows].double(), minlength=routed.n_experts).tolist()
        for e, counts in enumerate(per_expert):
            counts.tokens += pairs[e]
            counts.elements += pairs[e] * width
            counts.nonzero += int(nonzero[e])
        groups = routed.sequences[rows] * routed.n_experts + experts
        n_groups = routed.n_sequences * routed.n_experts
        active = torch.zeros(n_groups, width, dtype=torch.int32, device=act.device)
        active.index_add_(0, groups.to(act.device), nz[rows].to(torch.int32))
        self._union_add(index, active > 0, torch.bincount(groups, minlength=n_groups) > 0)

    def _union_add(self, index: int, seq_active: torch.Tensor, live: torch.Tensor) -> None:
        prev = self._union.get(index)
        if prev is not None and prev[0].shape == seq_active.shape:
            self._union[index] = (prev[0] | seq_active, prev[1] | live)
        else:
            if prev is not None:
                self._flush_site(index)
            self._union[index] = (seq_active, live)

    def end_sequences(self) -> None:
        """Close the current sequences: their union density is final (called between batches)."""
        for index in list(self._union):
            self._flush_site(index)

    def _flush_site(self, index: int) -> None:
        active, live = self._union.pop(index)
        c = self.counts[index]
        c.union_active += int(active[live].sum())
        c.union_total += int(live.sum()) * active.shape[-1]

    def sync_processes(self) -> None:
        """Sum the counts over the processes of a ``torch.distributed`` run, where each rank
        measured its own shard of the evaluation data; a no-op in a single process.

        Every rank must call it (it is a collective). Written here because the counts are ours:
        accelerate's ``gather`` concatenates tensors, while these need an integer sum.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        self.end_sequences()
        names = [f.name for f in fields(SiteCounts)]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        experts = [c for i in sorted(self.expert_counts) for c in self.expert_counts[i]]
        totals = torch.tensor([[getattr(c, n) for n in names] for c in [*self.counts, *experts]],
                              dtype=torch.int64, device=device)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        rows = [SiteCounts(**dict(zip(names, map(int, row)))) for row in totals.tolist()]
        self.counts, rest = rows[:len(self.counts)], iter(rows[len(self.counts):])
        self.expert_counts = {i: [next(rest) for _ in self.expert_counts[i]] for i in sorted(self.expert_counts)}

    def _no_expert_counts(self) -> dict[int, list[SiteCounts]]:
        return {i: [SiteCounts() for _ in range(s.experts)] for i, s in enumerate(self.sites) if s.experts}

    def layer_row(self, index: int, call: int, position: int) -> int:
        """The row counting the ``call``-th call (from 0) of site ``index`` within one model call,
        ``position``-th among the calls of the site's stack: a module called again in the same
        forward serves another layer (ALBERT), which gets a row of its own, added here."""
        key = (index, call)
        row = self._rows.get(key)
        if row is None:
            row = index if call == 0 else len(self.sites)
            if call:
                self.sites += (self.sites[index],)
                self.counts.append(SiteCounts())
            self._rows[key] = row
            self._positions[row] = position
        return row

    def _layers(self) -> list[tuple[int, int]]:
        """(row, layer) in report order. In a stack with a shared module the layers are the
        calls' places in the stack's forward order; elsewhere the sites' own, in the given order."""
        shared = {self.sites[i].stack for (_, call), i in self._rows.items() if call}
        order = {s: i for i, s in enumerate(STACKS)}
        rows = [(i, self._positions.get(i, site.layer) if site.stack in shared else site.layer)
                for i, site in enumerate(self.sites)]
        return sorted(rows, key=lambda r: (order[self.sites[r[0]].stack], r[1])) if shared else rows

    def reset(self) -> None:
        self.counts = [SiteCounts() for _ in self.sites]
        self.expert_counts = self._no_expert_counts()
        self._union.clear()

    def result(self) -> "DensityReport":
        self.end_sequences()
        per_layer = []
        for i, layer in self._layers():
            site, c = self.sites[i], self.counts[i]
            per_layer.append({
                "site": site.module, "stack": site.stack, "layer": layer, "width": site.width,
                "density": _ratio(c.nonzero, c.elements),
                "density_threshold": _ratio(c.above, c.elements),
                "union_density": _ratio(c.union_active, c.union_total),
                "tokens": c.tokens,
            })
            if site.experts:  # each routed expert over the (real) tokens routed to it
                per_layer[-1]["experts"] = [{"density": _ratio(e.nonzero, e.elements), "tokens": e.tokens}
                                            for e in self.expert_counts[i]]
        return DensityReport(per_layer=per_layer, threshold=self.threshold)


@dataclass
class DensityReport:
    """Density of a model over a dataset; ``to_dict`` gives the JSON shape used everywhere."""

    per_layer: list[dict]
    threshold: float
    #: The activation thresholds the model ran with (``deft.core.thresholds``), None: none —
    #: so every density block says whether its zeros are the deployed model's.
    thresholds: dict | None = None

    def _stack_mean(self, key: str, stack: str | None) -> float | None:
        return _mean([row[key] for row in self.per_layer if stack is None or row["stack"] == stack])

    @property
    def overall(self) -> float | None:
        return self._stack_mean("density", None)

    def stack(self, name: str, key: str = "density") -> float | None:
        return self._stack_mean(key, name)

    def to_dict(self) -> dict:
        def block(key):
            return {"overall": self._stack_mean(key, None),
                    **{s: self._stack_mean(key, s) for s in STACKS}}

        exact, above, union = block("density"), block("density_threshold"), block("union_density")
        return {
            "overall": exact["overall"], "encoder": exact["encoder"], "decoder": exact["decoder"],
            "per_layer": self.per_layer,
            "threshold": {"tau": self.threshold, **above},
            "union": union,
            "thresholds": self.thresholds,
            # real tokens seen by each stack (every layer of a stack sees the same tokens)
            "tokens": {s: next((r["tokens"] for r in self.per_layer if r["stack"] == s), None) for s in STACKS},
        }


def density_change(d_peft: float, d_deft: float) -> float:
    """Density change in % (eq. 10): (D_PEFT − D_DEFT) / D_PEFT × 100."""
    if d_peft <= 0:
        raise ValueError(f"density change needs a positive baseline density, got {d_peft}")
    return (d_peft - d_deft) / d_peft * 100.0
