"""The family table: where each known model family computes its MLP activation.

Support for a family is data — one :class:`FamilyRule` row in :data:`FAMILY_RULES` (several
for families with several MLP kinds per layer: T5's two stacks, Qwen2-MoE's shared and routed
experts). :mod:`deft.core.sites` applies the rows and falls back to generic discovery for
model types not listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: How the two halves of a fused gate/up dense layer are laid out: ``"gate-up"``: output rows
#: [0, width) feed σ, rows [width, 2·width) are the multiplier (``chunk(2)``: Phi-3, ModernBERT).
FUSED_LAYOUTS = ("gate-up",)


@dataclass(frozen=True)
class FamilyRule:
    """Where one model family keeps its MLP, relative to a transformer layer.

    ``layer`` is a regex for the layer's module path with a named group ``layer`` (its
    index); ``act``/``first``/``mult``/``down`` are module paths relative to that layer.
    ``first`` is the dense layer whose output feeds σ (the gate projection in a gated MLP),
    ``mult`` the up projection multiplied with σ's output (gated MLPs only), ``down`` the
    projection back to the model width.

    ``fused``: ``first`` holds the gate and the up projection as halves of one dense layer
    (layout in :data:`FUSED_LAYOUTS`; ``mult`` is then the same layer). ``routed``: the path of a
    routed-experts module (3-D expert weights, :mod:`deft.core.experts`) whose activation ``act``
    is; such a rule has no ``first``/``mult``/``down`` dense layers.
    """

    family: str
    model_types: tuple[str, ...]
    layer: str
    act: str
    first: str | None
    down: str | None
    stack: str
    mult: str | None = None
    fused: str | None = None
    routed: str | None = None


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
    # gate_up_proj(x).chunk(2): gate first, up second.
    FamilyRule("phi3-fused", ("phi3",), r"layers\.(?P<layer>\d+)", "mlp.activation_fn", "mlp.gate_up_proj",
               "mlp.down_proj", "decoder", mult="mlp.gate_up_proj", fused="gate-up"),
    # Wi(x).chunk(2): σ's input first, the multiplier second.
    FamilyRule("modernbert-fused", ("modernbert",), r"layers\.(?P<layer>\d+)", "mlp.act", "mlp.Wi", "mlp.Wo",
               "encoder", mult="mlp.Wi", fused="gate-up"),
    # Routed experts (one site per layer, rows = the (token, expert) pairs the router chose).
    FamilyRule("mixtral-moe", ("mixtral", "qwen3_moe"), r"layers\.(?P<layer>\d+)", "mlp.experts.act_fn", None, None,
               "decoder", routed="mlp.experts"),
    # Routed experts and the shared expert every token goes through: two sites per layer.
    FamilyRule("qwen2-moe", ("qwen2_moe",), r"layers\.(?P<layer>\d+)", "mlp.experts.act_fn", None, None,
               "decoder", routed="mlp.experts"),
    FamilyRule("qwen2-moe", ("qwen2_moe",), r"layers\.(?P<layer>\d+)", "mlp.shared_expert.act_fn",
               "mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj", "decoder",
               mult="mlp.shared_expert.up_proj"),
    FamilyRule("qwen2-moe", ("qwen2_moe",), r"layers\.(?P<layer>\d+)", "mlp.act_fn", "mlp.gate_proj",  # mlp_only_layers
               "mlp.down_proj", "decoder", mult="mlp.up_proj"),
    FamilyRule("vit", ("vit",), r"layers\.(?P<layer>\d+)", "mlp.activation_fn", "mlp.fc1", "mlp.fc2", "encoder"),
    # transformers < 5 named ViT like BERT.
    FamilyRule("vit", ("vit",), r"encoder\.layer\.(?P<layer>\d+)",
               "intermediate.intermediate_act_fn", "intermediate.dense", "output.dense", "encoder"),
)


def supported_families() -> list[str]:
    return sorted({f"{r.family} ({', '.join(r.model_types)})" for r in FAMILY_RULES})
