"""PEFT methods behind one interface (:class:`~deft.methods.base.PeftMethod`).

Each method is a small module with a typed config holding the paper's defaults
(METHOD.md §7), registered in :data:`METHODS`:

==========  =====================================================  ==============================
name        what trains                                            backend
==========  =====================================================  ==============================
``lora``    rank-8 updates of attention q/v (opt. MLP first layer)  peft ``LoraConfig``
``qlora``   LoRA on a 4-bit NF4 double-quantised base               bitsandbytes + peft
``adapter`` Pfeiffer bottleneck adapters after each MLP (÷16, ReLU)  :mod:`deft.methods.adapter`
``prefix``  60 virtual key/value positions per layer                peft ``PrefixTuningConfig``
``prompt``  60 soft-prompt input embeddings                         peft ``PromptTuningConfig``
==========  =====================================================  ==============================

The task head (``classifier``/``score``/``qa_outputs``/``pre_classifier``) trains with every
method; the base weights stay frozen.

Typical use::

    method = get_method("adapter")
    model = method.load_base(path, AutoModelForSequenceClassification, num_labels=2)
    model = method.apply(model, AdapterMethodConfig(), task_type="SEQ_CLS")
    ...train...
    method.save(model, out_dir)
    model = load_method(method.load_base(path, AutoModelForSequenceClassification, num_labels=2), out_dir)
"""

from .base import (
    ALL_TASK_HEADS,
    METADATA_FILE,
    METHODS,
    TASK_TYPES,
    AppliedMethod,
    MethodConfig,
    PeftMethod,
    UnsupportedCombinationError,
    applied_method,
    config_to_dict,
    get_method,
    load_method,
    merge_peft,
    method_config_from_dict,
    read_method_metadata,
    register_method,
    task_head_names,
    trainable_parameters,
)
from .lora import LoraMethod, LoraMethodConfig, default_attention_targets, lora_target_modules
from .qlora import QLoraMethod, QLoraMethodConfig
from .adapter import AdapterMethod, AdapterMethodConfig, BottleneckAdapter, adapter_modules
from .prefix import PrefixMethod, PrefixMethodConfig
from .prompt import PromptMethod, PromptMethodConfig

__all__ = [
    "ALL_TASK_HEADS", "METADATA_FILE", "METHODS", "TASK_TYPES", "AppliedMethod", "MethodConfig", "PeftMethod",
    "UnsupportedCombinationError", "applied_method", "config_to_dict", "get_method", "load_method", "merge_peft",
    "method_config_from_dict", "read_method_metadata", "register_method", "task_head_names",
    "trainable_parameters",
    "LoraMethod", "LoraMethodConfig", "default_attention_targets", "lora_target_modules",
    "QLoraMethod", "QLoraMethodConfig",
    "AdapterMethod", "AdapterMethodConfig", "BottleneckAdapter", "adapter_modules",
    "PrefixMethod", "PrefixMethodConfig",
    "PromptMethod", "PromptMethodConfig",
]
