"""Plain-text tables and number formatting for the command line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def write_json(path: str | Path | None, payload: dict) -> None:
    """Write ``payload`` to ``path`` (parents created) and say so; nothing when ``path`` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


def pct(value: float | None, digits: int = 2) -> str:
    """A 0–1 share as a percentage; '–' where there is no value (an absent stack)."""
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned text table with a rule under the header."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def density_summary(density: dict) -> str:
    """The per-layer density table and the per-stack summary of a ``DensityReport.to_dict()``."""
    tau = density["threshold"]["tau"]
    rows = [(r["stack"], r["layer"], r["site"], r["width"], pct(r["density"]), pct(r["density_threshold"]),
             pct(r["union_density"])) for r in density["per_layer"]]
    table = format_table(["stack", "layer", "site", "width", "density", f"|a|>{tau:g}", "union/seq"], rows)
    summary = format_table(
        ["", "density", f"|a|>{tau:g}", "union/seq"],
        [(name, pct(density[key] if key != "overall" else density["overall"]),
          pct(density["threshold"][key]), pct(density["union"][key]))
         for name, key in (("overall", "overall"), ("encoder", "encoder"), ("decoder", "decoder"))
         if key == "overall" or density[key] is not None])
    return f"{table}\n\n{summary}"


def mean_std(ms: dict) -> str:
    """``mean ± std`` over seeds; a single seed has no spread to show, so just its value."""
    return f"{ms['mean']:.2f}" if ms.get("std") is None else f"{ms['mean']:.2f} ± {ms['std']:.2f}"


def comparison_table(payload: dict) -> str:
    s = payload["summary"]
    tau = payload["runs"]["peft"][0]["density"]["threshold"]["tau"]
    rows = []
    for mode in ("peft", "deft"):
        rows.append((mode.upper(), *(mean_std(s[mode][key]) for key in
                                     ("metric", "density", "density_threshold", "union_density"))))
    ch = s["density_change"]
    rows.append(("change %", f"{s['metric_delta']:+.2f} pts", f"{ch['density']:.2f}", f"{ch['density_threshold']:.2f}",
                 f"{ch['union_density']:.2f}"))
    seeds = len(payload["runs"]["peft"])
    head = [f"{payload['task']} / {payload['method']} (n={seeds})", f"{s['peft']['metric_name']} (%)",
            "density (%)", f"|a|>{tau:g} (%)", "union/seq (%)"]
    return format_table(head, rows)


def _uj(pj: float) -> str:
    return f"{pj / 1e6:,.2f}"


def energy_tables(report: dict, baseline: dict | None = None) -> str:
    """The per-block table and the per-kind summary, with the baseline's ratio alongside."""
    from ..analysis.energy_runs import block_breakdown

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


def sweep_table(payload: dict) -> str:
    rows = []
    for entry in payload["runs"]:
        for p in entry["points"]:
            rows.append((entry["label"], p["structure"] or f"{p['sparsity']:.0%}", pct(p["achieved_sparsity"]),
                         f"{100 * p['metric']:.2f}", pct(p["density"]), pct(p["density_threshold"])))
    tau = payload["runs"][0]["tau"] if payload["runs"] else 0.01
    return format_table(["run", "target", "achieved", "metric", "density", f"|a|>{tau:g}"], rows)
