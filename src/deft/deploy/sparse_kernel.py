"""The fused sparse MLP kernel for one decoding token on CPU, and its pure-PyTorch fallback.

For one token x (d,) and the activation vector a = σ(first(x)) (h,), computed densely by PyTorch,
the kernel computes, over the active set S = {i : not |a_i| ≤ τ} (the rule of
:class:`~deft.core.thresholds.ThresholdedActivation`):

* gated MLP: y = b_down + Σ_{i∈S} a_i (W_up[i]·x + b_up[i]) · W_downᵀ[i]
* plain MLP: y = b_down + Σ_{i∈S} a_i · W_downᵀ[i]

reading only the |S| active rows of W_up (h, d) and W_downᵀ (h, d_out, stored transposed so each
active row is contiguous). Written by hand because no maintained library offers it: PyTorch's
sparse tensors and ``torch.sparse.mm`` want a fixed sparse *weight* (not a per-token activation
mask) and build index structures per call; oneDNN/MKL have no masked GEMV; the activation-sparsity
kernels that exist (DejaVu, TEAL, PowerInfer) are CUDA or llama.cpp code, not a PyTorch CPU op.

The C++ source (``csrc/sparse_mlp.cpp``) is compiled at first use with
``torch.utils.cpp_extension.load`` (-O3, OpenMP, -march=native) into
``$DEFT_CACHE/torch_extensions/<name>`` (default ``~/.cache/deft``), where ``<name>`` carries a
hash of the source, the flags, torch/Python versions and the CPU, so a changed source (or another
machine sharing the cache) builds anew. A later process imports the finished build directly (no
compiler needed). A cached build that does not load is removed and built once more; without a
compiler, or when the build fails, :func:`sparse_mlp_forward` uses :func:`sparse_mlp_fallback`
(the same math with ``index_select`` + matmul) after a one-line notice on stderr.

``$DEFT_SPARSE_KERNEL`` (``auto`` / ``compiled`` / ``fallback``) overrides ``backend="auto"``.
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

SOURCE = Path(__file__).with_name("csrc") / "sparse_mlp.cpp"
BACKEND_ENV = "DEFT_SPARSE_KERNEL"
BACKENDS = ("auto", "compiled", "fallback")
CFLAGS = ("-O3", "-fopenmp", "-march=native")
LDFLAGS = ("-fopenmp",)
_BUILT_MARKER = "deft_built"  # written after a build loaded; without it a build dir is unfinished
_STALE_LOCK_S = 600  # torch's build lock left by a killed process would otherwise block forever
_STATE: dict = {}  # the process's compiled module (or None) and why not


class KernelUnavailable(RuntimeError):
    """The compiled kernel cannot be had here (no compiler, or the build failed)."""


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def extension_name() -> str:
    """The extension's name: versioned by everything the built library depends on."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr((CFLAGS, LDFLAGS)).encode(), torch.__version__.encode(),
                 sys.version.encode(), platform.machine().encode(), _cpu_fingerprint().encode()):
        digest.update(part)
        digest.update(b"\0")
    return f"deft_sparse_mlp_{digest.hexdigest()[:16]}"


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


def _build(name: str, directory: Path) -> ModuleType:
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
        module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                                    extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=False)
    (directory / _BUILT_MARKER).write_text(f"{SOURCE}\n")
    return module


def _first_line(error: BaseException) -> str:
    """The line that says why a build failed: the compiler's first ``error:``, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    compiler = next((line for line in lines if "error:" in line), None)
    if compiler is not None:  # "/long/path/file.cpp:12:3: error: ..." -> "file.cpp:12:3: error: ..."
        where, _, what = compiler.partition("error:")
        text = f"{Path(where.strip()).name} error:{what}" if where.strip() else f"error:{what}"
    else:
        text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def build_kernel(root: Path | None = None) -> ModuleType:
    """The compiled kernel module: a finished cached build if there is one, else built now (a
    build that fails is removed and tried once more). Raises :class:`KernelUnavailable`."""
    name = extension_name()
    directory = Path(root or extensions_root()) / name
    if (directory / _BUILT_MARKER).is_file():
        try:
            return _import_built(name, directory)
        except Exception:  # a corrupt or foreign build: start over
            shutil.rmtree(directory, ignore_errors=True)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler ({compiler!r} not found; set $CXX)")
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        raise KernelUnavailable("ninja is not installed (pip install ninja)")
    print("deft: compiling the sparse MLP kernel (once per machine, about a minute)", file=sys.stderr, flush=True)
    error: BaseException | None = None
    for _ in range(2):
        try:
            return _build(name, directory)
        except Exception as exc:  # the compiler's message goes into the notice, not a traceback
            error = exc
            shutil.rmtree(directory, ignore_errors=True)
    raise KernelUnavailable(f"build failed: {_first_line(error)}")


def compiled_kernel() -> ModuleType | None:
    """The process's compiled kernel, built at first call; None (after a one-line notice on
    stderr) where it cannot be built."""
    if "module" not in _STATE:
        try:
            _STATE["module"] = build_kernel()
        except KernelUnavailable as exc:
            _STATE.update(module=None, reason=str(exc))
            print(f"deft: sparse MLP kernel not compiled ({exc}); using the PyTorch fallback", file=sys.stderr)
    return _STATE["module"]


def kernel_unavailable_reason() -> str | None:
    """Why :func:`compiled_kernel` gave None (None when it was built or not yet tried)."""
    return _STATE.get("reason")


def resolve_backend(backend: str = "auto") -> str:
    """``compiled`` or ``fallback``: what a call with ``backend`` runs here."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "fallback":
        return "fallback"
    if backend == "compiled":
        if compiled_kernel() is None:
            raise KernelUnavailable(kernel_unavailable_reason() or "the compiled kernel is not available")
        return "compiled"
    return "compiled" if compiled_kernel() is not None else "fallback"


def sparse_mlp_fallback(x: torch.Tensor, a: torch.Tensor, tau: float, down_weight_t: torch.Tensor,
                        down_bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                        up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's math in PyTorch: gather the active rows (``index_select``), then matmul."""
    active = (~(a.abs() <= tau)).nonzero().squeeze(1)
    v = a.index_select(0, active)
    if up_weight is not None:
        u = up_weight.index_select(0, active) @ x
        if up_bias is not None:
            u = u + up_bias.index_select(0, active)
        v = v * u
    y = v @ down_weight_t.index_select(0, active)
    return y + down_bias if down_bias is not None else y


def sparse_mlp_forward(x: torch.Tensor, a: torch.Tensor, tau: float, down_weight_t: torch.Tensor,
                       down_bias: torch.Tensor | None = None, up_weight: torch.Tensor | None = None,
                       up_bias: torch.Tensor | None = None, *, backend: str = "auto",
                       threads: int | None = None) -> torch.Tensor:
    """One token through an MLP block: ``y`` (d_out,) from ``x`` (d,) and ``a`` (h,) — see the
    module docstring. ``down_weight_t`` is W_downᵀ (h, d_out); ``up_weight`` (h, d) only for gated
    MLPs. The compiled kernel needs contiguous float32 CPU tensors; ``threads``: OpenMP threads
    (default: ``torch.get_num_threads()``, one thread for tiny problems)."""
    if resolve_backend(backend) == "fallback":
        return sparse_mlp_fallback(x, a, tau, down_weight_t, down_bias, up_weight, up_bias)
    return _STATE["module"].forward(x, a, float(tau), down_weight_t, down_bias, up_weight, up_bias,
                                    int(threads) if threads else 0)
