"""QLoRA: LoRA on a base model quantised to 4-bit NF4 with double quantisation (Dettmers et al. 2023).

``load_base`` quantises through transformers' ``BitsAndBytesConfig``; task heads (and the LM
head) stay unquantised (``llm_int8_skip_modules``) so they can train and be saved as
ordinary weights. ``apply`` runs ``peft.prepare_model_for_kbit_training`` (freezes the base,
upcasts fp16/bf16 non-quantised weights to fp32, and optionally turns on gradient
checkpointing) and then adds LoRA exactly as :mod:`deft.methods.lora`.

Gradient checkpointing (``gradient_checkpointing=None``, the default) is on for CUDA models
and off on CPU: it only trades compute for activation memory, which is what matters for
Flan-T5-XXL on a GPU, while on CPU it roughly doubles the forward cost for nothing. It is
non-reentrant (``use_reentrant=False``), which needs no input-gradient hack; the activation
capture of :mod:`deft.core.capture` ignores the recomputed forward. bitsandbytes >= 0.48 runs the
4-bit layers on CPU (compute dtype float32 there; bfloat16 on CUDA); its CPU inference-only
weight repacking is switched off, see :func:`disable_cpu_inference_repack`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.layers import unwrap_model
from .base import ALL_TASK_HEADS, PeftLibraryMethod, register_method
from .lora import LoraMethodConfig, build_lora_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QLoraMethodConfig(LoraMethodConfig):
    """QLoRA = the LoRA fields plus the 4-bit quantisation of the base.

    Attributes:
        quant_type: bitsandbytes 4-bit data type (``"nf4"`` as the paper, or ``"fp4"``).
        double_quant: quantise the quantisation constants too.
        compute_dtype: dtype of the 4-bit matmuls (``"float32"``, ``"bfloat16"``, ``"float16"``);
            ``None`` → bfloat16 on CUDA, float32 on CPU.
        skip_modules: modules left unquantised; ``None`` → the task heads and ``lm_head``.
        gradient_checkpointing: ``None`` → on for CUDA models, off on CPU (see module doc).
    """

    name = "qlora"

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    skip_modules: list[str] | None = None
    gradient_checkpointing: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype is not None and self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)} or None, got {self.compute_dtype!r}")
        if self.skip_modules is not None:
            self.skip_modules = list(self.skip_modules)


def _on_cuda(device_map) -> bool:
    if not torch.cuda.is_available():
        return False
    if device_map is None:
        return True
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(str(v) not in ("cpu", "disk") for v in values)


def bnb_config(config: QLoraMethodConfig, cuda: bool):
    """The transformers ``BitsAndBytesConfig`` for ``config``."""
    from transformers import BitsAndBytesConfig

    compute = _DTYPES[config.compute_dtype] if config.compute_dtype else (torch.bfloat16 if cuda else torch.float32)
    skip = config.skip_modules if config.skip_modules is not None else [*ALL_TASK_HEADS, "lm_head"]
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=config.quant_type, bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=list(skip),
    )


def disable_cpu_inference_repack(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' 4-bit CPU layers on their trainable code path.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight in place into an
    inference-only layout the first time the layer runs in eval mode without gradients. From
    then on the layer always takes that path, which has no autograd support: training after an
    evaluation fails ("a view of a leaf Variable that requires grad is being used in an
    in-place operation"), and the repack itself needs ``in_features % 64 == 0`` and
    ``out_features % 32 == 0``. Turning the repack off (and undoing one already done) makes CPU
    evaluation use the same dequantise-and-matmul path as training. No effect on CUDA.
    """
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return model


def is_4bit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False)) or any(
        p.__class__.__name__ == "Params4bit" for p in model.parameters())


@register_method
class QLoraMethod(PeftLibraryMethod):
    """LoRA on a 4-bit NF4, double-quantised base."""

    name = "qlora"
    config_cls = QLoraMethodConfig

    def load_base(self, model_name_or_path, auto_cls, config=None, **from_pretrained_kwargs):
        """``auto_cls.from_pretrained`` with 4-bit quantisation (hub name or local directory).

        Without a ``device_map`` the model goes to the current CUDA device when there is
        one, else stays on CPU.
        """
        config = self.resolve_config(config)
        if "quantization_config" in from_pretrained_kwargs:
            raise ValueError("qlora builds its own quantization_config; configure it through QLoraMethodConfig")
        device_map = from_pretrained_kwargs.pop("device_map", None)
        cuda = _on_cuda(device_map)
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if cuda else {"": "cpu"}
        model = auto_cls.from_pretrained(model_name_or_path, quantization_config=bnb_config(config, cuda),
                                         device_map=device_map, **from_pretrained_kwargs)
        return disable_cpu_inference_repack(model)

    def _require_4bit(self, model: nn.Module) -> None:
        if not is_4bit(model):
            raise ValueError("qlora needs a 4-bit base model: load it with get_method('qlora').load_base(...)")
        disable_cpu_inference_repack(model)

    def _prepare(self, model: nn.Module, config: QLoraMethodConfig) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        checkpointing = config.gradient_checkpointing
        if checkpointing is None:
            checkpointing = any(p.device.type == "cuda" for p in model.parameters())
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})

    def apply(self, model, config=None, task_type="SEQ_CLS"):
        config = self.resolve_config(config)
        if unwrap_model(model) is not model:
            raise ValueError("apply() takes a plain transformers model, got a model already wrapped by peft")
        self._require_4bit(model)
        self._check_task_type(task_type)
        return super().apply(self._prepare(model, config), config, task_type)

    def peft_config(self, model, config, task_type):
        return build_lora_config(model, config, task_type)

    def prepare_base_for_load(self, base_model, config, is_trainable):
        self._require_4bit(base_model)
        return self._prepare(base_model, config) if is_trainable else base_model
