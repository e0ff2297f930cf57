"""Activation sites: where each model family computes its MLP activation.

An *activation site* is the tensor A_l = σ(X W1) of one MLP block (METHOD.md §1). Support for
a family is data — rows of the family table (:mod:`deft.core.families`) — plus a generic
fallback that finds the activation module of any other MLP block. Sites are found on the
underlying ``transformers`` model, so a peft wrapper (LoRA, prefix, prompt, ...) changes
nothing.

For gated MLPs (``σ(X Wg) ⊙ (X Wu)``) two points can be measured:

* ``"act"`` (default, as the paper): the output of the activation module, σ(X Wg);
* ``"product"``: the gated product, i.e. the input of the down projection.

Three MLP shapes beyond "one dense layer per role":

* **fused gate/up** (Phi-3, ModernBERT): ``first`` and ``mult`` are the two halves of one dense
  layer (``fused`` names the layout); the site's width is half that layer's outputs;
* **routed experts** (Mixtral, Qwen2-MoE): one site per layer at the experts' activation module,
  measured over the (token, expert) pairs the router chose (:mod:`deft.core.experts`); the
  experts' 3-D weights are no dense layers, so ``first``/``mult``/``down`` are None and the
  operations that rewrite dense layers refuse such sites (:func:`require_dense`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from torch import nn

from .experts import expert_width, is_routed_experts
from .families import FAMILY_RULES, FUSED_LAYOUTS, FamilyRule, supported_families
from .layers import ActivationWrapper, in_features, out_features, unwrap_model

__all__ = ["SITE_POINTS", "STACKS", "FAMILY_RULES", "FUSED_LAYOUTS", "FamilyRule", "ActivationSite", "SiteMap",
           "UnsupportedModelError", "find_sites", "require_dense", "supported_families", "unwrap_model"]

SITE_POINTS = ("act", "product")
STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class ActivationSite:
    """One MLP activation tensor of the model.

    ``module`` is the path (in the unwrapped transformers model) of the module to hook:
    the activation module for ``point="act"`` (hook its output), the down projection for
    ``point="product"`` (hook its input). ``layer`` is the site's index in its stack, in
    forward order. ``fused``: ``first`` is also ``mult``, its output halves laid out as
    :data:`FUSED_LAYOUTS` says. ``experts``/``routed``: a routed-experts site — the number of
    experts and the path of the module holding them.
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
    fused: str | None = None
    experts: int = 0
    routed: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def gated(self) -> bool:
        return self.mult is not None or self.fused is not None

    @property
    def first_width(self) -> int:
        """Outputs of the ``first`` dense layer: twice the width when it holds both halves."""
        return 2 * self.width if self.fused else self.width

    @property
    def parts(self) -> tuple[str, ...]:
        """Paths of the modules holding the block's weights (the experts module for routed experts)."""
        paths = (self.routed,) if self.routed else (self.first, self.mult, self.down)
        return tuple(dict.fromkeys(p for p in paths if p))


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
        return any(s.gated for s in self.sites)

    @property
    def experts(self) -> int:
        """Routed experts per mixture-of-experts layer (0: no such layer)."""
        return max((s.experts for s in self.sites), default=0)


class UnsupportedModelError(ValueError):
    """No MLP activation site could be found, or an operation cannot handle the sites found."""


def require_dense(site: ActivationSite, operation: str) -> None:
    """UnsupportedModelError unless the site's block is dense layers ``operation`` can rewrite."""
    if site.routed:
        raise UnsupportedModelError(f"{operation} is not supported for mixture-of-experts layers ({site.module}: "
                                    f"{site.experts} routed experts held as 3-D weights, not dense layers)")
    if site.first is None or site.down is None:
        raise UnsupportedModelError(f"{operation} needs the MLP's dense layers; for {site.module} the generic "
                                    f"discovery found no {'first' if site.first is None else 'down'} projection")


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
            return SiteMap(tuple(_check_point(sites, point)), rule.family, model_type, point)
    # Experts as 3-D weights, or as a list of per-expert MLPs (each sees only its routed tokens).
    routed = [n for n, m in modules.items() if is_routed_experts(m) or re.search(r"(^|\.)experts\.\d+$", n)]
    if routed:
        raise UnsupportedModelError(
            f"model type {model_type!r} has mixture-of-experts layers ({routed[0]}, ...) that deft does not know yet: "
            "measuring its other MLPs alone would misreport the model's density. Known mixture-of-experts "
            f"families: {'; '.join(f for f in supported_families() if 'moe' in f)}")
    sites = _generic_sites(base, modules, point)
    if sites:
        return SiteMap(tuple(_check_point(sites, point)), "generic", model_type, point)
    raise UnsupportedModelError(
        f"no MLP activation site found in model type {model_type!r} ({type(base).__name__}). "
        f"Supported families: {'; '.join(supported_families())}. The generic fallback looks for an "
        "activation module (GELU/ReLU/SiLU/... by class, or a parameter-free module named like one) next to a "
        "dense layer inside numbered transformer layers and found none."
    )


def _check_point(sites: list[ActivationSite], point: str) -> list[ActivationSite]:
    routed = [s for s in sites if s.routed]
    if point == "product" and routed:
        raise UnsupportedModelError(f"site point 'product' is not available for routed experts ({routed[0].module}): "
                                    "their gated product is computed inside the experts module; measure point 'act'")
    return sites


def _apply_rules(rules: list[FamilyRule], modules: dict[str, nn.Module], point: str) -> list[ActivationSite]:
    sites = []
    for rule in rules:
        pattern = re.compile(rf"(?:^|\.)(?P<path>{rule.layer})\.{re.escape(rule.act)}$")
        for name, mod in modules.items():
            m = pattern.search(name)
            if not m:
                continue
            layer_path = name[: len(name) - len(rule.act) - 1]
            path = {role: f"{layer_path}.{getattr(rule, role)}" if getattr(rule, role) else None
                    for role in ("first", "mult", "down", "routed")}
            # A rule applies only where all its modules exist (T5 plain vs gated share paths).
            if any(p is not None and p not in modules for p in path.values()):
                continue
            if path["routed"] is not None:
                experts = modules[path["routed"]]
                if not is_routed_experts(experts):
                    continue
                width, count, fused = expert_width(experts), experts.num_experts, _experts_layout(experts)
            else:
                width, count, fused = out_features(modules[path["first"]]) // (2 if rule.fused else 1), 0, rule.fused
            sites.append(ActivationSite(
                module=name if point == "act" else path["down"], point=point, stack=rule.stack,
                layer=int(m.group("layer")), width=width, activation=type(mod).__name__, family=rule.family,
                first=path["first"], mult=path["mult"], down=path["down"], fused=fused, experts=count,
                routed=path["routed"]))
    return _ordered(sites)


def _experts_layout(experts: nn.Module) -> str | None:
    """Routed experts' gate/up layout: transformers' concatenated [gate; up] is "gate-up"; None
    for experts without a gate (or an interleaved layout, not in :data:`FUSED_LAYOUTS`)."""
    gated = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
    return "gate-up" if gated and getattr(experts, "is_concatenated", True) else None


def _ordered(sites: list[ActivationSite]) -> list[ActivationSite]:
    order = {s: i for i, s in enumerate(STACKS)}
    return sorted(sites, key=lambda s: (order[s.stack], s.layer, s.routed is None))


_TORCH_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU)
# A parameter-free leaf module named like an activation is one (BLOOM's BloomGelu, model-file
# classes); attention's softmax and plain pass-throughs are not.
_ACTIVATION_NAME = re.compile(r"gelu|relu|silu|swish|mish|activation|act(fn)?$|^act", re.IGNORECASE)
_NOT_ACTIVATION_NAME = re.compile(r"softmax|identity|dropout|norm|linear|attention|attn", re.IGNORECASE)


def _is_activation(mod: nn.Module) -> bool:
    if isinstance(mod, _TORCH_ACTIVATIONS):
        return True
    if isinstance(mod, ActivationWrapper):  # e.g. ADA-DEFT's α·σ / skipped-block stand-ins
        return True
    # transformers' own activation classes (GELUActivation, NewGELUActivation, ...) live here.
    if type(mod).__module__ == "transformers.activations":
        return type(mod).__name__ not in ("LinearActivation",)
    name = type(mod).__name__
    return (_ACTIVATION_NAME.search(name) is not None and _NOT_ACTIVATION_NAME.search(name) is None
            and not any(True for _ in mod.parameters()) and not any(True for _ in mod.children()))


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


def decoder_only(base: nn.Module) -> bool:
    """Whether ``base`` is a decoder-only (causal) model, whatever head it carries: it generates,
    its config says so, its checkpoint was a causal LM, or its model type has a causal-LM class
    and no masked-LM one (BERT-likes have both)."""
    config = getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False) or (callable(getattr(base, "can_generate", None)) and base.can_generate()):
        return True
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or ()):
        return True
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _first_and_down(siblings, outer) -> tuple[str | None, str | None, str | None]:
    """(first, down, fused layout) among the activation's dense siblings (``outer``: BERT-style
    layers one level up). A block maps h → w → h: first's outputs are down's inputs and the
    other way round (so a down projection wider than the MLP is not taken for the first);
    a first with twice down's inputs holds fused gate/up halves. Else: the widest sibling."""
    for fused in (None, "gate-up"):
        for first_name, first in siblings:
            w = out_features(first) // (2 if fused else 1)
            for down_name, down in siblings + outer:
                if down_name != first_name and in_features(down) == w and out_features(down) == in_features(first) \
                        and (not fused or out_features(first) == 2 * w):
                    return first_name, down_name, fused
    first_name, first = max(siblings, key=lambda nc: out_features(nc[1]))
    down = next((n for n, c in siblings + outer if n != first_name and in_features(c) == out_features(first)), None)
    return first_name, down, None


def _generic_sites(base: nn.Module, modules: dict[str, nn.Module], point: str) -> list[ActivationSite]:
    """Activation modules inside numbered layers that sit next to a dense layer.

    First and down projections: :func:`_first_and_down`. Stack comes from the path
    ("encoder"/"decoder"), else from whether the model is decoder-only. Layers are numbered in
    forward order within each stack (Swin's stages restart their block numbers).
    """
    decoder = decoder_only(base)
    found = []
    for name, mod in modules.items():
        if not _is_activation(mod) or not re.search(r"\.\d+\.", f".{name}."):
            continue
        if re.search(r"attn|attention", name, re.IGNORECASE):
            continue
        parent = name.rpartition(".")[0]
        siblings = _dense_under(parent, modules, depth=1)
        if not siblings:
            continue
        outer = _dense_under(parent.rpartition(".")[0], modules, depth=2)
        first, down, fused = _first_and_down(siblings, outer)
        if point == "product" and down is None:
            continue
        path = f".{name}."
        stack = "decoder" if ".decoder." in path else "encoder" if ".encoder." in path else (
            "decoder" if decoder else "encoder")
        numbers = tuple(int(n) for n in re.findall(r"\.(\d+)(?=\.)", path))
        width = out_features(modules[first]) // (2 if fused else 1)
        found.append((stack, numbers, ActivationSite(
            module=name if point == "act" else down, point=point, stack=stack, layer=0, width=width,
            activation=type(mod).__name__, family="generic", first=first,
            mult=first if fused else None, down=down, fused=fused)))
    found.sort(key=lambda f: (f[0], f[1]))
    sites, seen = [], {}
    for stack, _, site in found:
        seen[stack] = seen.get(stack, -1) + 1
        sites.append(ActivationSite(**{**site.to_dict(), "layer": seen[stack]}))
    return _ordered(sites)
