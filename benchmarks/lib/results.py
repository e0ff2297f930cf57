"""Writing a benchmark's result file."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path, payload: dict) -> Path:
    """``payload`` as indented JSON at ``path`` (parents created); says where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return out
