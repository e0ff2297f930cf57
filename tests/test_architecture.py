"""The package's shape: layers import only downwards, no import cycle (function-level imports
included), training imports neither analysis nor deploy, modules stay small, benchmarks use the
public API. Read from the source with ``ast``, so an import hidden in a function counts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Layer → the layers it may import (itself included). core ← methods ← adaptive ← training ←
# analysis / deploy ← cli; tasks and io depend on core only; analysis and deploy are siblings.
ALLOWED = {
    "core": {"core"},
    "io": {"io", "core"},
    "tasks": {"tasks", "core"},
    "methods": {"methods", "core"},
    "adaptive": {"adaptive", "methods", "core"},
    "training": {"training", "adaptive", "methods", "core", "tasks", "io"},
    "analysis": {"analysis", "training", "adaptive", "methods", "core", "tasks", "io"},
    "deploy": {"deploy", "training", "adaptive", "methods", "core", "tasks", "io"},
    "cli": {"cli", "analysis", "deploy", "training", "adaptive", "methods", "core", "tasks", "io"},
}
MAX_LINES = 500


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module → the deft modules it imports anywhere in its body (``from pkg import name`` counts
    as importing ``pkg.name`` when that is a module, else ``pkg``)."""
    files = {module_name(p, src): p for p in (src / "deft").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import deft.core.sites.x` → deft.core.sites
                    target = target.rpartition(".")[0]
                if target.startswith("deft") and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_walker_sees_function_level_imports_and_cycles(tmp_path):
    """The checks below can fail: a cycle hidden in a function is found."""
    pkg = tmp_path / "deft" / "training"
    pkg.mkdir(parents=True)
    (tmp_path / "deft" / "__init__.py").write_text("")
    (tmp_path / "deft" / "adaptive.py").write_text("def f():\n    from .training import run\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "run.py").write_text("from ..adaptive import f\n")
    graph = import_graph(tmp_path)
    assert graph["deft.adaptive"] == {"deft.training.run"}
    assert find_cycle(graph) is not None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(SRC))
    assert cycle is None, " → ".join(cycle)


def test_layers_import_only_downwards():
    wrong = []
    for module, deps in import_graph(SRC).items():
        own = layer(module)
        if own is None:
            continue
        assert own in ALLOWED, f"{module}: layer {own!r} is not in the architecture table"
        wrong += [f"{module} → {dep}" for dep in deps if layer(dep) is not None and layer(dep) not in ALLOWED[own]]
    assert not wrong, "\n".join(wrong)


def test_training_imports_neither_analysis_nor_deploy():
    code = ("import sys, deft.training; "
            "print(sorted(m for m in sys.modules if m.startswith(('deft.analysis', 'deft.deploy', 'deft.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_over_the_size_limit():
    big = {module_name(p, SRC): n for p in (SRC / "deft").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, big


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_use_the_public_api(script):
    """Benchmarks import neither the CLI nor private names of the library."""
    bad = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deft"):
            if node.module.startswith("deft.cli"):
                bad.append(node.module)
            bad += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.startswith("deft.cli")]
    assert not bad, bad


def test_docs_layout_lists_every_module_once():
    section = (ROOT / "docs" / "architecture.md").read_text()
    listed = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    modules = sorted(str(p.relative_to(SRC / "deft")) for p in (SRC / "deft").rglob("*.py") if p.name != "__init__.py")
    assert sorted(listed) == modules
