"""Activation sites: where each model family computes its MLP activation.

An *activation site* is the tensor A_l = σ(X W1) of one MLP block (METHOD.md §1). Support for
a family is data — one :class:`FamilyRule` row in :data:`FAMILY_RULES` — plus a generic
fallback that finds the activation module of any other MLP block. Sites are found on the
underlying ``transformers`` model, so a peft wrapper (LoRA, prefix, prompt, ...) changes
nothing.

For gated MLPs (``σ(X Wg) ⊙ (X Wu)``) two points can be measured:

* ``"act"`` (default, as the paper): the output of the activation module, σ(X Wg);
* ``"product"``: the gated product, i.e. the input of the down projection.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from torch import nn

from .layers import ActivationWrapper, in_features, out_features, unwrap_model

__all__ = ["SITE_POINTS", "STACKS", "FAMILY_RULES", "FamilyRule", "ActivationSite", "SiteMap", "UnsupportedModelError",
           "find_sites", "supported_families", "unwrap_model"]

SITE_POINTS = ("act", "product")
STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class FamilyRule:
    """Where one model family keeps its MLP, relative to a transformer layer.

    ``layer`` is a regex for the layer's module path with a named group ``layer`` (its
    index); ``act``/``first``/``mult``/``down`` are module paths relative to that layer.
    ``first`` is the dense layer whose output feeds σ (the gate projection in a gated MLP),
    ``mult`` the up projection multiplied with σ's output (gated MLPs only), ``down`` the
    projection back to the model width.
    """

    family: str
    model_types: tuple[str, ...]
    layer: str
    act: str
    first: str
    down: str
    stack: str
    mult: str | None = None


_BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert")
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")

# Verified against transformers 5.23 module names (tests/test_sites.py builds each family).
FAMILY_RULES: tuple[FamilyRule, ...] = (
    FamilyRule("bert", _BERT_LIKE, r"encoder\.layer\.(?P<layer>\d+)",
               "intermediate.intermediate_act_fn", "intermediate.dense", "output.dense", "encoder"),
    FamilyRule("distilbert", ("distilbert",), r"transformer\.layer\.(?P<layer>\d+)",
               "ffn.activation", "ffn.lin1", "ffn.lin2", "encoder"),
    FamilyRule("t5", ("t5", "mt5", "umt5"), r"encoder\.block\.(?P<layer>\d+)\.layer\.1",
               "DenseReluDense.act", "DenseReluDense.wi", "DenseReluDense.wo", "encoder"),
    FamilyRule("t5", ("t5", "mt5", "umt5"), r"decoder\.block\.(?P<layer>\d+)\.layer\.2",
               "DenseReluDense.act", "DenseReluDense.wi", "DenseReluDense.wo", "decoder"),
    FamilyRule("t5-gated", ("t5", "mt5", "umt5"), r"encoder\.block\.(?P<layer>\d+)\.layer\.1",
               "DenseReluDense.act", "DenseReluDense.wi_0", "DenseReluDense.wo", "encoder",
               mult="DenseReluDense.wi_1"),
    FamilyRule("t5-gated", ("t5", "mt5", "umt5"), r"decoder\.block\.(?P<layer>\d+)\.layer\.2",
               "DenseReluDense.act", "DenseReluDense.wi_0", "DenseReluDense.wo", "decoder",
               mult="DenseReluDense.wi_1"),
    FamilyRule("gpt2", ("gpt2",), r"h\.(?P<layer>\d+)", "mlp.act", "mlp.c_fc", "mlp.c_proj", "decoder"),
    # OPT flattens hidden states to (B·T, h) before its MLP; capture reshapes them back.
    FamilyRule("opt", ("opt",), r"decoder\.layers\.(?P<layer>\d+)", "activation_fn", "fc1", "fc2", "decoder"),
    FamilyRule("llama-gated", _LLAMA_LIKE, r"layers\.(?P<layer>\d+)", "mlp.act_fn", "mlp.gate_proj",
               "mlp.down_proj", "decoder", mult="mlp.up_proj"),
    FamilyRule("vit", ("vit",), r"layers\.(?P<layer>\d+)", "mlp.activation_fn", "mlp.fc1", "mlp.fc2", "encoder"),
    # transformers < 5 named ViT like BERT.
    FamilyRule("vit", ("vit",), r"encoder\.layer\.(?P<layer>\d+)",
               "intermediate.intermediate_act_fn", "intermediate.dense", "output.dense", "encoder"),
)


@dataclass(frozen=True)
class ActivationSite:
    """One MLP activation tensor of the model.

    ``module`` is the path (in the unwrapped transformers model) of the module to hook:
    the activation module for ``point="act"`` (hook its output), the down projection for
    ``point="product"`` (hook its input).
    """

    module: str
    point: str
    stack: str
    layer: int
    width: int
    activation: str
    family: str
    first: str | None = None
    mult: str | None = None
    down: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SiteMap:
    """All activation sites of a model, in forward order within each stack."""

    sites: tuple[ActivationSite, ...]
    family: str
    model_type: str
    point: str

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def stack(self, name: str) -> tuple[ActivationSite, ...]:
        return tuple(s for s in self.sites if s.stack == name)

    @property
    def stacks(self) -> tuple[str, ...]:
        return tuple(s for s in STACKS if self.stack(s))

    @property
    def gated(self) -> bool:
        return any(s.mult is not None for s in self.sites)


class UnsupportedModelError(ValueError):
    """No MLP activation site could be found."""


def supported_families() -> list[str]:
    return sorted({f"{r.family} ({', '.join(r.model_types)})" for r in FAMILY_RULES})


def find_sites(model: nn.Module, point: str = "act") -> SiteMap:
    """Find every MLP activation site of ``model`` (a transformers model or a peft wrapper)."""
    if point not in SITE_POINTS:
        raise ValueError(f"unknown site point {point!r}; choose one of {SITE_POINTS}")
    base = unwrap_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", "") or ""
    modules = dict(base.named_modules())
    for rule in FAMILY_RULES:
        if model_type not in rule.model_types:
            continue
        sites = _apply_rules([r for r in FAMILY_RULES if r.family == rule.family and model_type in r.model_types],
                             modules, point)
        if sites:
            return SiteMap(tuple(sites), rule.family, model_type, point)
    sites = _generic_sites(base, modules, point)
    if sites:
        return SiteMap(tuple(sites), "generic", model_type, point)
    raise UnsupportedModelError(
        f"no MLP activation site found in model type {model_type!r} ({type(base).__name__}). "
        f"Supported families: {'; '.join(supported_families())}. The generic fallback looks for an "
        "activation module (GELU/ReLU/SiLU/... from torch or transformers) next to a dense layer "
        "inside numbered transformer layers and found none."
    )


def _apply_rules(rules: list[FamilyRule], modules: dict[str, nn.Module], point: str) -> list[ActivationSite]:
    sites = []
    for rule in rules:
        pattern = re.compile(rf"(?:^|\.)(?P<path>{rule.layer})\.{re.escape(rule.act)}$")
        for name, mod in modules.items():
            m = pattern.search(name)
            if not m:
                continue
            layer_path = name[: len(name) - len(rule.act) - 1]
            first, down = f"{layer_path}.{rule.first}", f"{layer_path}.{rule.down}"
            mult = f"{layer_path}.{rule.mult}" if rule.mult else None
            # A rule applies only where all its modules exist (T5 plain vs gated share paths).
            if first not in modules or down not in modules or (mult and mult not in modules):
                continue
            sites.append(ActivationSite(
                module=name if point == "act" else down, point=point, stack=rule.stack,
                layer=int(m.group("layer")), width=out_features(modules[first]), activation=type(mod).__name__,
                family=rule.family, first=first, mult=mult, down=down))
    return _ordered(sites)


def _ordered(sites: list[ActivationSite]) -> list[ActivationSite]:
    order = {s: i for i, s in enumerate(STACKS)}
    return sorted(sites, key=lambda s: (order[s.stack], s.layer))


def _is_activation(mod: nn.Module) -> bool:
    torch_acts = (nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU)
    if isinstance(mod, torch_acts):
        return True
    if isinstance(mod, ActivationWrapper):  # e.g. ADA-DEFT's α·σ / skipped-block stand-ins
        return True
    # transformers' own activation classes (GELUActivation, NewGELUActivation, ...) live here.
    return type(mod).__module__ == "transformers.activations" and type(mod).__name__ not in ("LinearActivation",)


def _dense_under(path: str, modules: dict[str, nn.Module], depth: int) -> list[tuple[str, nn.Module]]:
    """Dense layers (full paths) at most ``depth`` levels below module ``path``."""
    prefix = f"{path}." if path else ""
    found = []
    for name, mod in modules.items():
        if not name.startswith(prefix) or name == path:
            continue
        rel = name[len(prefix):]
        if rel.count(".") < depth and "base_layer" not in rel and out_features(mod) and \
                hasattr(getattr(mod, "base_layer", mod), "weight") and not isinstance(mod, (nn.Embedding, nn.LayerNorm)):
            found.append((name, mod))
    return found


def _generic_sites(base: nn.Module, modules: dict[str, nn.Module], point: str) -> list[ActivationSite]:
    """Activation modules inside numbered layers that sit next to a dense layer.

    The first dense layer is the widest dense sibling of the activation; the down projection
    is the dense layer (a sibling, or BERT-style in a sibling of the parent) whose input width
    equals it. Stack comes from the path ("encoder"/"decoder"), else from whether the model
    generates text.
    """
    config = getattr(base, "config", None)
    decoder_only = bool(getattr(config, "is_decoder", False)) or (
        callable(getattr(base, "can_generate", None)) and base.can_generate()
        and not getattr(config, "is_encoder_decoder", False))
    sites = []
    for name, mod in modules.items():
        if not _is_activation(mod) or not re.search(r"\.\d+\.", f".{name}."):
            continue
        if re.search(r"attn|attention", name, re.IGNORECASE):
            continue
        parent = name.rpartition(".")[0]
        siblings = _dense_under(parent, modules, depth=1)
        if not siblings:
            continue
        first_name, first = max(siblings, key=lambda nc: out_features(nc[1]))
        width = out_features(first)
        grandparent = parent.rpartition(".")[0]
        down = next((n for n, c in siblings + _dense_under(grandparent, modules, depth=2)
                     if n != first_name and in_features(c) == width), None)
        if point == "product" and down is None:
            continue
        path = f".{name}."
        stack = "decoder" if ".decoder." in path else "encoder" if ".encoder." in path else (
            "decoder" if decoder_only else "encoder")
        sites.append(ActivationSite(
            module=name if point == "act" else down, point=point, stack=stack,
            layer=int(re.findall(r"\.(\d+)(?=\.)", path)[-1]), width=width,
            activation=type(mod).__name__, family="generic", first=first_name, down=down))
    return _ordered(sites)
