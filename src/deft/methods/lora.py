"""LoRA through huggingface/peft's ``LoraConfig``.

Targets: ``target_modules=None`` means the attention query and value projections, found by
name for the families of :mod:`deft.core.sites` (peft's own default table lacks some of them,
e.g. DistilBERT and transformers-5 ViT). ``include_mlp=True`` adds the first dense layer of
every MLP block (``site.first`` of :func:`deft.core.sites.find_sites`), named by its *full* path:
its last path component alone is ambiguous (BERT's ``dense`` would also match the attention
output, the MLP down projection and the pooler); a fused gate/up layer (Phi-3, ModernBERT) is
adapted whole. ``include_mlp_down=True`` adds every block's down projection (``site.down``), so
a model whose MLP neurons are cut (the neuron form of the threshold in the loop, ``deft shrink``)
can re-weight the neurons it keeps. Routed experts (mixture of experts) hold 3-D weights, not
dense layers: they are not targeted (the density loss still trains the layers before them). The
task head is trained through peft's ``modules_to_save``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.layers import is_conv1d
from ..core.sites import UnsupportedModelError, find_sites, unwrap_model
from .base import MethodConfig, PeftLibraryMethod, extra_modules_to_save, register_method

# Query/value projections per site family (transformers 5 names, checked on tiny models).
ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "t5": ("q", "v"),
    "t5-gated": ("q", "v"),
    "gpt2": ("c_attn",),  # fused q/k/v projection (GPT-2's Conv1D)
    "opt": ("q_proj", "v_proj"),
    "llama-gated": ("q_proj", "v_proj"),
    "phi3-fused": ("qkv_proj",),  # fused q/k/v projection
    "modernbert-fused": ("Wqkv",),  # fused q/k/v projection
    "mixtral-moe": ("q_proj", "v_proj"),
    "qwen2-moe": ("q_proj", "v_proj"),
    "vit": ("q_proj", "v_proj"),  # transformers < 5: query/value, found by the fallback below
}
# Tried in order when the family's names are absent (other versions, generic families).
FALLBACK_TARGETS: tuple[tuple[str, ...], ...] = (
    ("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("q", "v"), ("c_attn",),
    ("query_key_value",), ("qkv_proj",), ("Wqkv",),  # fused q/k/v: BLOOM / GPT-NeoX / Falcon, Phi-3, ModernBERT
)


@dataclass
class LoraMethodConfig(MethodConfig):
    """LoRA hyper-parameters.

    Attributes:
        r: rank of the update ``B A``.
        lora_alpha: scaling numerator (update scaled by ``lora_alpha / r``).
        lora_dropout: dropout on the LoRA branch's input.
        target_modules: module names (peft matching: a name matches a module path equal to it
            or ending in ``.name``); ``None`` → the attention query/value projections.
        include_mlp: also adapt the MLP's first dense layer (the one feeding σ) in every block.
        include_mlp_down: also adapt every MLP block's down projection (back to the model width).
        bias: peft's ``bias`` option (``"none"``, ``"all"``, ``"lora_only"``).
        modules_to_save: extra modules to train fully, on top of the task head.
    """

    name = "lora"

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None
    include_mlp: bool = False
    include_mlp_down: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)


def _is_dense(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def default_attention_targets(model: nn.Module) -> list[str]:
    """The query/value projection names of ``model`` (see module doc)."""
    base = unwrap_model(model)
    leaf_names = {name.rpartition(".")[2] for name, mod in base.named_modules() if _is_dense(mod)}
    candidates: list[tuple[str, ...]] = []
    try:
        candidates.append(ATTENTION_TARGETS[find_sites(base).family])
    except (UnsupportedModelError, KeyError):
        pass
    try:  # peft's own table, by model type
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        if peft_table.get(model_type):
            candidates.append(tuple(peft_table[model_type]))
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    candidates.extend(FALLBACK_TARGETS)
    for names in candidates:
        if all(n in leaf_names for n in names):
            return list(names)
    raise ValueError(f"no default LoRA target modules known for {type(base).__name__}; "
                     "pass target_modules=[...] (names of its attention projections)")


def mlp_first_targets(model: nn.Module) -> list[str]:
    """Full paths of every MLP block's first dense layer (``site.first``)."""
    return [s.first for s in find_sites(model) if s.first]


def mlp_down_targets(model: nn.Module) -> list[str]:
    """Full paths of every MLP block's down projection (``site.down``)."""
    return [s.down for s in find_sites(model) if s.down]


def lora_target_modules(model: nn.Module, config: LoraMethodConfig) -> list[str]:
    targets = list(config.target_modules) if config.target_modules is not None else default_attention_targets(model)
    for wanted, found in ((config.include_mlp, mlp_first_targets), (config.include_mlp_down, mlp_down_targets)):
        if wanted:
            targets += [t for t in found(model) if t not in targets]
    return targets


def _all_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """Whether every module the targets match is GPT-2's Conv1D (weights stored (in, out))."""
    matched = [mod for name, mod in unwrap_model(model).named_modules()
               if any(name == t or name.endswith(f".{t}") for t in targets)]
    return bool(matched) and all(is_conv1d(mod) for mod in matched)


def build_lora_config(model: nn.Module, config: LoraMethodConfig, task_type: str | None):
    from peft import LoraConfig

    targets = lora_target_modules(model, config)
    modules_to_save = list(config.modules_to_save or []) + list(extra_modules_to_save(model, task_type) or [])
    return LoraConfig(
        task_type=task_type, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, bias=config.bias, modules_to_save=modules_to_save or None,
        # peft would switch this on per Conv1D layer itself, with a warning; 4-bit GPT-2 has Linear4bit
        fan_in_fan_out=_all_conv1d(model, targets), inference_mode=False,
    )


@register_method
class LoraMethod(PeftLibraryMethod):
    """LoRA (Hu et al. 2021) on the attention query/value projections (optionally the MLP)."""

    name = "lora"
    config_cls = LoraMethodConfig

    def peft_config(self, model, config, task_type):
        return build_lora_config(model, config, task_type)
