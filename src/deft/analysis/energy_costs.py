"""The cost model of :mod:`deft.analysis.energy`: energy per operation (the sponge estimator's
hardware model), which modules are counted as which kind of operation, the counts an operation
costs, the report, and the energy change."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from ..core.layers import is_conv1d

# --- Energy constants -------------------------------------------------------------------------
# Source: the sponge-examples estimator (Shumailov et al. 2021; iliaishacked/sponge_examples,
# energy_estimator/analyse.py, class HardwareModel), which takes its 45 nm, 0.9 V figures from
# M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014
# (IEEE doc. 6757323), assuming 32-bit floating point throughout:
#   * one memory access = 1950 pJ — a DRAM access (Horowitz: 1.3–2.6 nJ; the estimator takes the
#     midpoint and assumes DRAM dominates, on-chip caches negligible, reads cost what writes do);
#   * one computation = 3.7 pJ — a 32-bit float multiply (the estimator charges every
#     computation the same).
SPONGE_MEMORY_PJ = 1950.0
SPONGE_COMPUTE_PJ = 3.7
# Other 45 nm figures of the same table (Horowitz 2014), for configurations that want them:
HOROWITZ_45NM_PJ = {
    "dram_access": 1950.0,  # 1.3–2.6 nJ (64-bit); midpoint, as the sponge estimator
    "sram_8kb_64bit": 10.0,  # 8 kB cache access, 64-bit word
    "sram_8kb_32bit": 5.0,  # half of the above, for a 32-bit word
    "fp32_mult": 3.7,
    "fp32_add": 0.9,
    "int32_mult": 3.1,
    "int32_add": 0.1,
}
# The sponge estimator's zero test for 32-bit floats: |x| > 2**-126 (denormals count as zero).
SPONGE_ZERO_THRESHOLD_FP32 = 2.0 ** -126

KINDS = ("linear", "embedding", "norm", "activation", "attention_qk", "attention_av")

# --- Module classification --------------------------------------------------------------------
_NORM_NAME = re.compile(r"(LayerNorm|RMSNorm|GroupNorm|LayerNorm2d)$", re.IGNORECASE)
_TORCH_ACTS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.LeakyReLU, nn.ELU,
               nn.SELU, nn.CELU, nn.Hardswish, nn.Hardtanh, nn.Softsign, nn.Tanhshrink)


def module_kind(module: nn.Module) -> str | None:
    """The kind (:data:`KINDS`) a leaf module is counted as, or None (not counted)."""
    if next(module.children(), None) is not None:
        return None  # only leaves; containers (LoRA wrappers included) are counted through them
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or _NORM_NAME.search(type(module).__name__) or \
            type(module).__name__ == "RMSNorm":
        return "norm"
    if isinstance(module, _TORCH_ACTS) or (
            type(module).__module__ == "transformers.activations" and type(module).__name__ != "LinearActivation"):
        return "activation"
    return None


@dataclass
class EnergyConfig:
    """Per-operation energies (pJ) and the zero-skipping ASIC's abilities.

    Defaults: the sponge estimator's hardware model (see the constants above). ``weight_pj``
    and ``activation_pj`` are both the memory access cost there; they are separate here so an
    on-chip (SRAM) configuration can be modelled, e.g. ``activation_pj=5.0``.
    """

    weight_pj: float = SPONGE_MEMORY_PJ  # per parameter value read
    activation_pj: float = SPONGE_MEMORY_PJ  # per activation value read or written
    mac_pj: float = SPONGE_COMPUTE_PJ  # per multiply-accumulate
    elementwise_pj: float = SPONGE_COMPUTE_PJ  # per elementwise operation (norms, activations)
    norm_ops_per_element: int = 4  # LayerNorm: subtract mean, scale by 1/σ, multiply γ, add β
    zero_threshold: float = SPONGE_ZERO_THRESHOLD_FP32  # |x| <= threshold counts as zero
    skip_zero_weights: bool = True  # compressed weights, MACs with a zero weight skipped
    skip_zero_activations: bool = True  # compressed activations, MACs with a zero input skipped
    count_attention: bool = True  # QKᵀ and AV products

    def __post_init__(self):
        for name in ("weight_pj", "activation_pj", "mac_pj", "elementwise_pj", "zero_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"EnergyConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.norm_ops_per_element < 0:
            raise ValueError(f"EnergyConfig.norm_ops_per_element must be >= 0, got {self.norm_ops_per_element}")

    def to_dict(self) -> dict:
        return asdict(self)


# --- Counts -----------------------------------------------------------------------------------
@dataclass
class OpCounts:
    """Value and operation counts of one operation (dense = all, ``*_nz`` = what the
    zero-skipping ASIC still pays for)."""

    params: int = 0
    params_nz: int = 0
    inputs: int = 0
    inputs_nz: int = 0
    outputs: int = 0
    outputs_nz: int = 0
    macs: int = 0
    macs_nz: int = 0
    ops: int = 0
    ops_nz: int = 0

    def add(self, other: "OpCounts") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def dense_energy(self, cfg: EnergyConfig) -> float:
        return (cfg.weight_pj * self.params + cfg.activation_pj * (self.inputs + self.outputs)
                + cfg.mac_pj * self.macs + cfg.elementwise_pj * self.ops)

    def sparse_energy(self, cfg: EnergyConfig) -> float:
        return (cfg.weight_pj * self.params_nz + cfg.activation_pj * (self.inputs_nz + self.outputs_nz)
                + cfg.mac_pj * self.macs_nz + cfg.elementwise_pj * self.ops_nz)


@dataclass
class EnergyReport:
    """Result of :func:`estimate_energy`. Energies are in pJ, summed over all batches."""

    dense_energy: float
    sparse_energy: float
    per_layer: list[dict]
    batch_ratios: list[float] = field(default_factory=list)
    tokens: int = 0
    batches: int = 0
    skipped: list[str] = field(default_factory=list)
    config: EnergyConfig = field(default_factory=EnergyConfig)

    @property
    def energy_ratio(self) -> float:
        """Zero-skipping energy / dense energy over the whole run (≤ 1)."""
        return self.sparse_energy / self.dense_energy if self.dense_energy else 1.0

    @property
    def mean_batch_ratio(self) -> float | None:
        """Mean of the per-call ratios (the sponge estimator's per-input ratio at batch size 1)."""
        return sum(self.batch_ratios) / len(self.batch_ratios) if self.batch_ratios else None

    def by_kind(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for row in self.per_layer:
            agg = out.setdefault(row["kind"], {"dense": 0.0, "sparse": 0.0})
            agg["dense"] += row["dense"]
            agg["sparse"] += row["sparse"]
        for agg in out.values():
            agg["ratio"] = agg["sparse"] / agg["dense"] if agg["dense"] else 1.0
        return out

    def to_dict(self) -> dict:
        return {
            "energy_ratio": self.energy_ratio,
            "dense_energy_pj": self.dense_energy,
            "sparse_energy_pj": self.sparse_energy,
            "mean_batch_ratio": self.mean_batch_ratio,
            "tokens": self.tokens,
            "batches": self.batches,
            "by_kind": self.by_kind(),
            "per_layer": [dict(row) for row in self.per_layer],
            "skipped": list(self.skipped),
            "config": self.config.to_dict(),
        }


def energy_change(er_peft, er_deft) -> float:
    """Energy change (%) = (ER_PEFT − ER_DEFT) / ER_PEFT × 100 (METHOD.md §5).

    Accepts energy ratios or :class:`EnergyReport` objects.
    """
    a = er_peft.energy_ratio if isinstance(er_peft, EnergyReport) else float(er_peft)
    b = er_deft.energy_ratio if isinstance(er_deft, EnergyReport) else float(er_deft)
    if a == 0:
        raise ValueError("ER_PEFT is 0: energy change undefined")
    return (a - b) / a * 100.0
