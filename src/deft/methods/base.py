"""The interface every PEFT method implements, the registry, and what the methods share.

A method is two things (the layout follows huggingface/peft, one small module per method):

* a typed ``@dataclass`` config (a :class:`MethodConfig` subclass) whose defaults are the
  paper's (METHOD.md §7), serialisable to JSON through :func:`config_to_dict` /
  :func:`method_config_from_dict`;
* a :class:`PeftMethod` that loads the base model (``load_base``), freezes it and adds the
  trainable modules (``apply``), and saves / re-applies only what was trained (``save`` /
  ``load``).

Whatever ``apply`` returns remembers how it was built (:func:`applied_method`), so ``save``
needs only the model, and every saved directory carries ``deft_method.json`` (method name,
config, task type) next to the weights: :func:`read_method_metadata` tells the training code
which method and base loader to use before calling :meth:`PeftMethod.load`.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.layers import unwrap_model

TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "QUESTION_ANS")
METADATA_FILE = "deft_method.json"

# Task heads are created fresh for the downstream task and must train with the PEFT modules.
# DistilBERT puts a ``pre_classifier`` dense layer before its ``classifier``; RoBERTa's
# ``classifier`` is a small module (dense + out_proj). Only direct children of the
# transformers model count, so no layer deep inside the network is mistaken for a head.
TASK_HEADS: dict[str | None, tuple[str, ...]] = {
    "SEQ_CLS": ("pre_classifier", "classifier", "score", "classification_head"),
    "QUESTION_ANS": ("qa_outputs",),
    "SEQ_2_SEQ_LM": (),
    "CAUSAL_LM": (),
    None: ("pre_classifier", "classifier", "score", "classification_head", "qa_outputs"),
}
ALL_TASK_HEADS = ("pre_classifier", "classifier", "score", "classification_head", "qa_outputs")


class UnsupportedCombinationError(ValueError):
    """A method that cannot be applied to this model / task type."""


@dataclass
class MethodConfig:
    """Base class of every method's config; ``name`` is the registry key of its method."""

    name: ClassVar[str] = ""


@dataclass(frozen=True)
class AppliedMethod:
    """What ``apply`` attached to the model it returned (read with :func:`applied_method`)."""

    name: str
    config: MethodConfig
    task_type: str | None


_APPLIED_ATTR = "deft_applied_method"


def applied_method(model: nn.Module) -> AppliedMethod | None:
    """The method record left by :meth:`PeftMethod.apply` (None for a model it did not build)."""
    record = model.__dict__.get(_APPLIED_ATTR)
    if record is None:
        record = unwrap_model(model).__dict__.get(_APPLIED_ATTR)
    return record


def _mark_applied(model: nn.Module, record: AppliedMethod) -> None:
    # Plain attribute in __dict__: not a module, parameter or buffer, so it stays out of state dicts.
    object.__setattr__(model, _APPLIED_ATTR, record)


def validate_task_type(task_type: str | None, allow_none: bool = True) -> str | None:
    if task_type is None and allow_none:
        return None
    if task_type not in TASK_TYPES:
        extra = " (or None for a model without a text task wrapper, e.g. a vision classifier)" if allow_none else ""
        raise ValueError(f"unknown task_type {task_type!r}; choose one of {', '.join(TASK_TYPES)}{extra}")
    return task_type


def task_head_names(model: nn.Module, task_type: str | None) -> list[str]:
    """Names of the task-head modules (direct children of the transformers model) that must train."""
    base = unwrap_model(model)
    children = dict(base.named_children())
    return [name for name in TASK_HEADS[task_type] if name in children]


class PeftMethod(ABC):
    """One PEFT method. Subclasses set ``name`` and ``config_cls`` and implement apply/save/load."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    #: task_type None (no task-specific wrapper, e.g. vision models) is allowed.
    allows_no_task_type: ClassVar[bool] = True

    def default_config(self) -> MethodConfig:
        return self.config_cls()

    def resolve_config(self, config: MethodConfig | dict | None) -> MethodConfig:
        """``None`` → defaults; a dict → :func:`method_config_from_dict`; else checked for type."""
        if config is None:
            return self.default_config()
        if isinstance(config, dict):
            return method_config_from_dict(self.name, config)
        if not isinstance(config, self.config_cls):
            raise TypeError(f"method {self.name!r} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        return config

    def load_base(self, model_name_or_path: str, auto_cls: Any, config: MethodConfig | dict | None = None,
                  **from_pretrained_kwargs) -> nn.Module:
        """Load the pretrained base model (full precision unless the method says otherwise)."""
        self.resolve_config(config)
        return auto_cls.from_pretrained(model_name_or_path, **from_pretrained_kwargs)

    @abstractmethod
    def apply(self, model: nn.Module, config: MethodConfig | dict | None = None,
              task_type: str | None = "SEQ_CLS") -> nn.Module:
        """Freeze ``model``, add the method's trainable modules (and unfreeze the task head)."""

    @abstractmethod
    def save(self, model: nn.Module, directory: str | Path) -> None:
        """Save only the trained modules, plus what is needed to re-apply them."""

    @abstractmethod
    def load(self, base_model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
        """Re-apply the modules saved in ``directory`` to a freshly loaded base model."""

    # -- shared helpers -------------------------------------------------------------------
    def _record(self, model: nn.Module, config: MethodConfig, task_type: str | None) -> nn.Module:
        _mark_applied(model, AppliedMethod(self.name, config, task_type))
        return model

    def _applied(self, model: nn.Module) -> AppliedMethod:
        record = applied_method(model)
        if record is None or record.name != self.name:
            got = f"method {record.name!r}" if record else "no deft method"
            raise ValueError(f"this model was not prepared by {type(self).__name__}.apply() ({got} recorded)")
        return record

    def _check_task_type(self, task_type: str | None) -> str | None:
        return validate_task_type(task_type, allow_none=self.allows_no_task_type)

    def _write_metadata(self, record: AppliedMethod, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"method": record.name, "task_type": record.task_type, "config": config_to_dict(record.config)}
        (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    def _read_metadata(self, directory: Path) -> tuple[MethodConfig, str | None]:
        name, config, task_type = read_method_metadata(directory)
        if name != self.name:
            raise ValueError(f"{directory} holds a {name!r} checkpoint, not {self.name!r}; "
                             f"use get_method({name!r}).load(...)")
        return config, task_type


class PeftLibraryMethod(PeftMethod):
    """A method implemented by huggingface/peft: subclasses build the ``peft`` config."""

    @abstractmethod
    def peft_config(self, model: nn.Module, config: MethodConfig, task_type: str | None):
        """The ``peft.PeftConfig`` for ``model``."""

    def check_supported(self, model: nn.Module, config: MethodConfig, task_type: str | None) -> None:
        """Raise :class:`UnsupportedCombinationError` for combinations peft cannot run."""

    def apply(self, model, config=None, task_type="SEQ_CLS"):
        from peft import get_peft_model

        config = self.resolve_config(config)
        task_type = self._check_task_type(task_type)
        if unwrap_model(model) is not model:
            raise ValueError("apply() takes a plain transformers model, got a model already wrapped by peft")
        self.check_supported(model, config, task_type)
        peft_model = get_peft_model(model, self.peft_config(model, config, task_type))
        return self._record(peft_model, config, task_type)

    def save(self, model, directory):
        record = self._applied(model)
        directory = Path(directory)
        model.save_pretrained(str(directory))
        self._write_metadata(record, directory)

    def load(self, base_model, directory, is_trainable=False):
        from peft import PeftModel

        directory = Path(directory)
        config, task_type = self._read_metadata(directory)
        base_model = self.prepare_base_for_load(base_model, config, is_trainable)
        model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=is_trainable)
        if not is_trainable:  # peft leaves prompt-learning embeddings trainable even in inference mode
            model.requires_grad_(False)
            model.eval()
        return self._record(model, config, task_type)

    def prepare_base_for_load(self, base_model: nn.Module, config: MethodConfig, is_trainable: bool) -> nn.Module:
        return base_model


def extra_modules_to_save(model: nn.Module, task_type: str | None) -> list[str] | None:
    """Task heads peft does not make trainable on its own for this task type.

    peft's task wrappers add ``classifier``/``score`` (SEQ_CLS) and ``qa_outputs``
    (QUESTION_ANS) to ``modules_to_save`` themselves; DistilBERT's ``pre_classifier`` and,
    without a task type, every head must be named explicitly.
    """
    automatic = {"SEQ_CLS": {"classifier", "score"}, "QUESTION_ANS": {"qa_outputs"}}.get(task_type, set())
    extra = [h for h in task_head_names(model, task_type) if h not in automatic]
    return extra or None


# -- registry ---------------------------------------------------------------------------------

METHODS: dict[str, PeftMethod] = {}


def register_method(cls: type[PeftMethod]) -> type[PeftMethod]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.config_cls.name != cls.name:
        raise TypeError(f"{cls.__name__}.config_cls.name {cls.config_cls.name!r} != {cls.name!r}")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> PeftMethod:
    """The registered method called ``name`` (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def config_to_dict(config: MethodConfig) -> dict:
    """JSON-ready dict of a method config (``method`` key + every field)."""
    return {"method": config.name, **asdict(config)}


def method_config_from_dict(name: str, d: dict | None = None) -> MethodConfig:
    """Rebuild a method's config from :func:`config_to_dict` output (or any dict of its fields)."""
    method = get_method(name)
    d = dict(d or {})
    stated = d.pop("method", None)
    if stated is not None and str(stated).lower() != method.name:
        raise ValueError(f"config dict is for method {stated!r}, not {method.name!r}")
    fields = {f.name for f in dataclasses.fields(method.config_cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {method.config_cls.__name__}; "
                         f"valid fields: {', '.join(sorted(fields))}")
    return method.config_cls(**d)


def read_method_metadata(directory: str | Path) -> tuple[str, MethodConfig, str | None]:
    """(method name, config, task type) of a directory written by :meth:`PeftMethod.save`."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} was not saved by deft.methods")
    meta = json.loads(path.read_text())
    return meta["method"], method_config_from_dict(meta["method"], meta["config"]), meta.get("task_type")


def load_method(base_model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
    """Re-apply whatever method saved ``directory`` (see :func:`read_method_metadata`).

    The base must have been loaded the way that method loads it (``get_method(name).load_base``:
    4-bit for QLoRA).
    """
    name, _, _ = read_method_metadata(directory)
    return get_method(name).load(base_model, directory, is_trainable=is_trainable)


def merge_peft(model: nn.Module) -> nn.Module:
    """Merge a peft model's adapters into the base weights (``merge_and_unload()``) and return
    the plain transformers model; any other model is returned as it is.

    The merge happens in place in the base model, so a peft wrapper the caller still holds
    runs the merged weights too.
    """
    merge = getattr(model, "merge_and_unload", None)
    if callable(merge):
        try:
            return merge()
        except (AttributeError, NotImplementedError, ValueError, TypeError):
            return model  # nothing mergeable (prompt learning): the wrapper must run as it is
    return model


# -- parameter counts -------------------------------------------------------------------------

def _numel(param: torch.Tensor) -> int:
    """Elements of a parameter; a bitsandbytes 4-bit weight packs two per byte of storage."""
    n = param.numel()
    if param.__class__.__name__ == "Params4bit":
        quant_storage = getattr(param, "quant_storage", None)
        n *= 2 * (quant_storage.itemsize if quant_storage is not None else param.element_size())
    return n


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each parameter counted once (share = trainable/total).

    Counts as peft's ``get_nb_trainable_parameters`` does (4-bit weights count their unpacked
    elements); peft models answer through that method itself.
    """
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if callable(counter):
        return tuple(int(x) for x in counter())
    trainable = total = 0
    for _, param in model.named_parameters():  # named_parameters deduplicates shared tensors
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


# -- prompt learning (prefix / prompt tuning) -----------------------------------------------

def prompt_learning_dims(model: nn.Module) -> dict[str, int]:
    """``token_dim``/``num_layers``/``num_attention_heads`` where peft cannot find them itself.

    peft reads ``hidden_size``/``n_embd``/``d_model`` etc. from ``config.to_dict()``; configs
    that name them otherwise (DistilBERT: ``dim``, ``n_layers``, ``n_heads``) expose them
    through transformers' attribute map, which is read here.
    """
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return {}
    as_dict = config.to_dict()
    as_dict = as_dict.get("text_config", as_dict)
    wanted = {
        "token_dim": (("hidden_size", "n_embd", "d_model"), "hidden_size"),
        "num_layers": (("num_hidden_layers", "num_layers", "n_layer"), "num_hidden_layers"),
        "num_attention_heads": (("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
                                "num_attention_heads"),
    }
    dims = {}
    for field_name, (peft_keys, attr) in wanted.items():
        if field_name == "num_layers" and hasattr(config, "num_hidden_layers"):
            continue  # peft reads config.num_hidden_layers as an attribute
        if not any(k in as_dict for k in peft_keys) and isinstance(getattr(config, attr, None), int):
            dims[field_name] = getattr(config, attr)
    return dims


def _accepts_past_key_values(base: nn.Module) -> bool:
    """Whether peft can inject a prefix: the model's forward or, as peft falls back to, its backbone's."""
    import inspect

    backbone = getattr(base, getattr(base, "base_model_prefix", "") or "", None)
    for module in (base, backbone):
        if isinstance(module, nn.Module) and "past_key_values" in inspect.signature(module.forward).parameters:
            return True
    return False


class PromptLearningMethod(PeftLibraryMethod):
    """Prefix / prompt tuning: virtual tokens, so a text task type is required."""

    allows_no_task_type = False

    def check_supported(self, model, config, task_type):
        import inspect

        base = unwrap_model(model)
        model_config = getattr(base, "config", None)
        if getattr(model_config, "is_encoder_decoder", False) and task_type != "SEQ_2_SEQ_LM":
            raise UnsupportedCombinationError(
                f"{self.name} tuning of the encoder-decoder model {type(base).__name__} supports only "
                f"task_type='SEQ_2_SEQ_LM' (peft fails for {task_type!r}); use lora/qlora/adapter instead")
        try:
            params = inspect.signature(base.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            return
        if "input_ids" not in params:
            raise UnsupportedCombinationError(
                f"{self.name} tuning needs a text model taking input_ids; {type(base).__name__} does not")
        if self.needs_past_key_values and not _accepts_past_key_values(base):
            raise UnsupportedCombinationError(
                f"prefix tuning injects past_key_values, which {type(base).__name__}.forward does not accept; "
                "use prompt tuning, lora or adapter for this model")

    needs_past_key_values: ClassVar[bool] = False
