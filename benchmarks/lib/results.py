"""Writing a benchmark's result file."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def write_result(path: str | Path, payload: dict) -> Path:
    """``payload`` as indented JSON at ``path`` (parents created); says where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return out


def cpu_model() -> str:
    """The CPU's model name (timing ratios depend on it), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
