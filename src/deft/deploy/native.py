"""Native CPU kernels compiled at first use: one build per source, cached, rebuilt when broken.

Each kernel of :mod:`deft.deploy` (the sparse MLP, the int8 LM head) is one C++ file in ``csrc/``,
compiled with ``torch.utils.cpp_extension.load`` (-O3, OpenMP, -march=native) into
``$DEFT_CACHE/torch_extensions/<name>`` (default ``~/.cache/deft``). ``<name>`` carries a hash of
the source, the flags, torch/Python versions and the CPU, so a changed source (or another machine
sharing the cache) builds anew, and a later process imports the finished build directly (no
compiler needed). A cached build that does not load is removed and built once more; without a
compiler, or when the build fails, :class:`KernelUnavailable` says why in one line, and the
kernel's caller takes its PyTorch path after a one-line notice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..io.gguf import cache_dir

CFLAGS = ("-O3", "-fopenmp", "-march=native")
LDFLAGS = ("-fopenmp",)
BUILT_MARKER = "deft_built"  # written after a build loaded; without it a build dir is unfinished
_STALE_LOCK_S = 600  # torch's build lock left by a killed process would otherwise block forever


class KernelUnavailable(RuntimeError):
    """A compiled kernel cannot be had here (no compiler, or the build failed)."""


def cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def extension_name(prefix: str, source: Path) -> str:
    """The extension's name: ``prefix`` and a hash of everything the built library depends on."""
    digest = hashlib.sha256()
    for part in (Path(source).read_bytes(), repr((CFLAGS, LDFLAGS)).encode(), torch.__version__.encode(),
                 sys.version.encode(), platform.machine().encode(), cpu_fingerprint().encode()):
        digest.update(part)
        digest.update(b"\0")
    return f"{prefix}_{digest.hexdigest()[:16]}"


def extensions_root() -> Path:
    return cache_dir() / "torch_extensions"


def _import_built(name: str, directory: Path) -> ModuleType:
    path = directory / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, source: Path, directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    # A retry in the same process must build again, not reuse torch's record of the first try.
    versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
    if versioner is not None:
        versioner.entries.pop(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = cpp_extension.load(name=name, sources=[str(source)], extra_cflags=list(CFLAGS),
                                    extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=False)
    (directory / BUILT_MARKER).write_text(f"{source}\n")
    return module


def first_error_line(error: BaseException) -> str:
    """The line that says why a build failed: the compiler's first ``error:``, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    compiler = next((line for line in lines if "error:" in line), None)
    if compiler is not None:  # "/long/path/file.cpp:12:3: error: ..." -> "file.cpp:12:3: error: ..."
        where, _, what = compiler.partition("error:")
        text = f"{Path(where.strip()).name} error:{what}" if where.strip() else f"error:{what}"
    else:
        text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def build_extension(name: str, source: Path, what: str, root: Path | None = None) -> ModuleType:
    """The compiled module ``name`` of ``source``: a finished cached build if there is one, else
    built now (a build that fails is removed and tried once more). ``what`` names the kernel in the
    notice. Raises :class:`KernelUnavailable`."""
    directory = Path(root or extensions_root()) / name
    if (directory / BUILT_MARKER).is_file():
        try:
            return _import_built(name, directory)
        except Exception:  # a corrupt or foreign build: start over
            shutil.rmtree(directory, ignore_errors=True)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler ({compiler!r} not found; set $CXX)")
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        raise KernelUnavailable("ninja is not installed (pip install ninja)")
    print(f"deft: compiling the {what} (once per machine, about a minute)", file=sys.stderr, flush=True)
    error: BaseException | None = None
    for _ in range(2):
        try:
            return _build(name, Path(source), directory)
        except Exception as exc:  # the compiler's message goes into the notice, not a traceback
            error = exc
            shutil.rmtree(directory, ignore_errors=True)
    raise KernelUnavailable(f"build failed: {first_error_line(error)}")


def compiled_or_none(state: dict, build, what: str) -> ModuleType | None:
    """The process's compiled module kept in ``state``, built by ``build()`` at first call; None
    (after a one-line notice on stderr, once) where it cannot be built."""
    if "module" not in state:
        try:
            state["module"] = build()
        except KernelUnavailable as exc:
            state.update(module=None, reason=str(exc))
            print(f"deft: {what} not compiled ({exc}); using the PyTorch fallback", file=sys.stderr)
    return state["module"]
