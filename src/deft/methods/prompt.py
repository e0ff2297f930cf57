"""Prompt tuning (Lester et al. 2021) through huggingface/peft's ``PromptTuningConfig``.

``num_virtual_tokens`` trainable input embeddings (paper: 60) are prepended to every input,
randomly initialised by default; the task head trains through peft's ``modules_to_save``.
Encoder-decoder models support only ``SEQ_2_SEQ_LM`` (transformers' T5 classifier refuses
input embeddings), refused otherwise with :class:`~deft.methods.base.UnsupportedCombinationError`.
Decoder-only models need ``max_position_embeddings`` ≥ input length + virtual tokens.

Decoder-only sequence classification (GPT-2, LLaMA, OPT ``...ForSequenceClassification``):
peft passes ``inputs_embeds``, so transformers cannot find the last real token from the pad id
and classifies from the *last position* — pad those batches on the left.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.layers import unwrap_model
from .base import MethodConfig, PromptLearningMethod, extra_modules_to_save, prompt_learning_dims, register_method

PROMPT_INITS = ("RANDOM", "TEXT")


@dataclass
class PromptMethodConfig(MethodConfig):
    """Prompt-tuning hyper-parameters.

    Attributes:
        num_virtual_tokens: soft-prompt length (paper: 60).
        init: ``"RANDOM"`` (paper) or ``"TEXT"`` (embeddings of ``init_text``'s tokens).
        init_text: text for ``init="TEXT"``.
        tokenizer_name_or_path: tokenizer for ``init="TEXT"``.
    """

    name = "prompt"

    num_virtual_tokens: int = 60
    init: str = "RANDOM"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        self.init = self.init.upper()
        if self.init not in PROMPT_INITS:
            raise ValueError(f"init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "TEXT" and not (self.init_text and self.tokenizer_name_or_path):
            raise ValueError("init='TEXT' needs init_text and tokenizer_name_or_path")


@register_method
class PromptMethod(PromptLearningMethod):
    """Prompt tuning with ``num_virtual_tokens`` soft-prompt embeddings."""

    name = "prompt"
    config_cls = PromptMethodConfig

    def peft_config(self, model, config, task_type):
        from peft import PromptTuningConfig

        text = {"prompt_tuning_init_text": config.init_text,
                "tokenizer_name_or_path": config.tokenizer_name_or_path} if config.init == "TEXT" else {}
        dims = prompt_learning_dims(model)
        # Virtual tokens join the word embeddings, so they take their width: ALBERT's (128) is not
        # its hidden size (768), which peft would use.
        embeddings = unwrap_model(model).get_input_embeddings()
        if isinstance(getattr(embeddings, "embedding_dim", None), int):
            dims["token_dim"] = embeddings.embedding_dim
        return PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=config.num_virtual_tokens, prompt_tuning_init=config.init,
            modules_to_save=extra_modules_to_save(model, task_type), inference_mode=False, **dims, **text)
