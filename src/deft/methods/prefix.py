"""Prefix tuning (Li & Liang 2021) through huggingface/peft's ``PrefixTuningConfig``.

Trainable key/value prefixes of ``num_virtual_tokens`` positions (paper: 60) in every attention
layer, injected as ``past_key_values``; the task head trains through peft's
``modules_to_save``. Models whose forward takes no ``past_key_values`` (DistilBERT) and
encoder-decoder models with a task type other than ``SEQ_2_SEQ_LM`` are refused with
:class:`~deft.methods.base.UnsupportedCombinationError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, PromptLearningMethod, extra_modules_to_save, prompt_learning_dims, register_method


@dataclass
class PrefixMethodConfig(MethodConfig):
    """Prefix-tuning hyper-parameters.

    Attributes:
        num_virtual_tokens: prefix length (paper: 60).
        prefix_projection: reparametrise the prefix through a two-layer MLP (Li & Liang).
        encoder_hidden_size: hidden size of that MLP (``None`` → the model width).
    """

    name = "prefix"

    num_virtual_tokens: int = 60
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")


@register_method
class PrefixMethod(PromptLearningMethod):
    """Prefix tuning with ``num_virtual_tokens`` virtual key/value positions per layer."""

    name = "prefix"
    config_cls = PrefixMethodConfig
    needs_past_key_values = True

    def peft_config(self, model, config, task_type):
        from peft import PrefixTuningConfig

        dims = prompt_learning_dims(model)
        extra = {"encoder_hidden_size": config.encoder_hidden_size or dims.get("token_dim")} \
            if config.prefix_projection else {}
        if extra.get("encoder_hidden_size") is None:
            extra.pop("encoder_hidden_size", None)
        return PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=config.num_virtual_tokens,
            prefix_projection=config.prefix_projection, modules_to_save=extra_modules_to_save(model, task_type),
            inference_mode=False, **dims, **extra)
