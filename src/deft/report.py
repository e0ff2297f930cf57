"""Plain-text tables and number formatting for the command line."""

from __future__ import annotations

from collections.abc import Sequence


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
