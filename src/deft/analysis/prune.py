"""WANDA pruning (Sun et al. 2023, "A simple and effective pruning approach for large language
models"; METHOD.md §6), and magnitude pruning as the baseline.

Score of weight W_ij (row i = output, column j = input feature):

    S_ij = |W_ij| · ‖X_j‖₂

with ‖X_j‖₂ the L2 norm of input feature j over all calibration tokens — real tokens only (the
attention mask drops padding), collected by forward pre-hooks on the pruned layers. Weights
are compared **per output row**: unstructured pruning zeroes the ``round(sparsity · in)``
lowest-scored weights of every row; N:M semi-structured pruning keeps, in every group of M
consecutive input weights of a row, the N highest-scored ones.

Targets:

* ``"mlp_first"`` — the first dense layer of every MLP (``find_sites(model)``'s ``.first``;
  the gate projection in gated MLPs; a fused gate/up layer whole — rows are compared on their
  own, so its halves need no split), the DEFT paper's setting;
* ``"all_linear"`` — every ``nn.Linear`` / GPT-2 ``Conv1D`` of the backbone, task heads and
  ``lm_head`` excluded.

A peft model with mergeable adapters (LoRA, ...) is merged first (:func:`merge_peft`), so the
pruned weights are the deployed ones W + ΔW. GPT-2's ``Conv1D`` stores its weight as
(in, out); it is scored and pruned through its (out, in) transpose.

Calibration runs the whole model once over the calibration batches and prunes all targets
from the unpruned model's inputs ("one-shot"). ``PruneConfig(sequential=True)`` follows the
reference implementation instead: transformer layer by layer, each layer's inputs recomputed
after the layers before it were pruned (one calibration pass per layer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.batches import call_model, model_device, move_batch
from ..core.layers import dense_layer, is_conv1d, unwrap_model, weight_out_in
from ..core.masks import TokenMasks
from ..core.sites import UnsupportedModelError, find_sites, require_dense
from ..methods import BottleneckAdapter, merge_peft


TARGETS = ("mlp_first", "all_linear")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_HEAD_NAMES = re.compile(
    r"(^|\.)(lm_head|classifier|score|qa_outputs|pre_classifier|cls|head|heads|output_projection)(\.|$)")


@dataclass
class PruneConfig:
    """How to prune.

    ``sparsity`` — fraction of each row's weights to zero (unstructured; ignored when
    ``structure`` is set: N:M gives 1 − N/M). ``structure`` — ``None`` or ``"N:M"``
    (``"2:4"``, ``"4:8"``, ...). ``calibration_samples`` — how many sequences of the
    calibration batches to use (the paper: 128 random training samples; draw them with
    :func:`calibration_indices`, which uses ``seed``).
    """

    sparsity: float = 0.5
    structure: str | None = None
    targets: str = "mlp_first"
    calibration_samples: int = 128
    seed: int = 0
    sequential: bool = False

    def __post_init__(self):
        check_sparsity(self.sparsity)
        if self.structure is not None:
            parse_n_m(self.structure)
        if self.targets not in TARGETS:
            raise ValueError(f"unknown prune targets {self.targets!r}; choose one of {TARGETS}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_n_m(self.structure) if self.structure is not None else None

    def to_dict(self) -> dict:
        return asdict(self)


# --- Validation -------------------------------------------------------------------------------
def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def parse_n_m(structure: str) -> tuple[int, int]:
    """``"N:M"`` → (N, M), with 1 ≤ N ≤ M."""
    m = _NM.match(structure) if isinstance(structure, str) else None
    if m is None:
        raise ValueError(f"malformed N:M structure {structure!r}; expected e.g. '2:4' or '4:8'")
    n, mm = int(m.group(1)), int(m.group(2))
    if mm < 1 or n < 1:
        raise ValueError(f"N:M structure {structure!r} needs N >= 1 and M >= 1")
    if n > mm:
        raise ValueError(f"N:M structure {structure!r} keeps N={n} of M={mm}: N must not exceed M")
    return n, mm


# --- Layers -----------------------------------------------------------------------------------
def target_modules(model: nn.Module, targets: str = "mlp_first") -> dict[str, nn.Module]:
    """The layers to prune, by path in the unwrapped transformers model, in forward order."""
    if targets not in TARGETS:
        raise ValueError(f"unknown prune targets {targets!r}; choose one of {TARGETS}")
    base = unwrap_model(model)
    modules = dict(base.named_modules())
    try:
        sites = find_sites(base).sites
    except UnsupportedModelError:
        if targets == "mlp_first":
            raise
        sites = ()  # all_linear needs no MLP sites
    for site in sites:  # routed experts' 3-D weights are neither a first layer nor a Linear: refused, not left out
        if site.routed:
            require_dense(site, "WANDA / magnitude pruning")
    if targets == "mlp_first":
        return {site.first: modules[site.first] for site in sites if site.first in modules}
    prefix = getattr(base, "base_model_prefix", "") or ""
    backbone = getattr(base, prefix, None) if prefix else None
    keep_under = f"{prefix}." if isinstance(backbone, nn.Module) and backbone is not base else None
    out_emb = base.get_output_embeddings() if callable(getattr(base, "get_output_embeddings", None)) else None
    # A bottleneck adapter wraps the frozen down projection: that base layer is pruned through
    # the wrapper (as for peft wrappers), while the adapter's own bottleneck layers are trained
    # PEFT modules, not base weights, and are left alone.
    adapters = {name for name, mod in modules.items() if isinstance(mod, BottleneckAdapter)}
    found = {}
    for name, mod in modules.items():
        if name.rpartition(".")[0] in adapters:
            continue
        if not (isinstance(mod, (nn.Linear, BottleneckAdapter)) or is_conv1d(mod)) or mod is out_emb:
            continue
        if re.search(r"(^|\.)(base_layer|lora_[AB]|lora_embedding_[AB])(\.|$)", name):
            continue  # inside an unmerged peft wrapper: the wrapper's base layer is pruned via the wrapper
        if keep_under is not None and not name.startswith(keep_under):
            continue
        if keep_under is None and _HEAD_NAMES.search(name):
            continue
        found[name] = mod
    return found


# --- Calibration ------------------------------------------------------------------------------
def calibration_indices(population: int, samples: int = 128, seed: int = 0) -> list[int]:
    """``samples`` distinct indices drawn at random (reproducibly) from ``range(population)``."""
    if population < 1:
        raise ValueError("empty calibration population")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(population, generator=g)[: min(samples, population)].tolist())


def _batch_rows(batch) -> int | None:
    if isinstance(batch, Mapping):
        for key in ("input_ids", "inputs_embeds", "pixel_values", "attention_mask"):
            t = batch.get(key)
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                return int(t.shape[0])
        return None
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return None


def _take_rows(batch, rows: int, n: int):
    def cut(t):
        return t[:n] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == rows else t

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def limit_samples(batches: Iterable, samples: int | None) -> list:
    """The batches, cut after ``samples`` sequences (the last batch trimmed)."""
    out, seen = [], 0
    for batch in batches:
        if samples is not None and seen >= samples:
            break
        rows = _batch_rows(batch)
        if samples is not None and rows is not None and seen + rows > samples:
            batch = _take_rows(batch, rows, samples - seen)
            rows = samples - seen
        out.append(batch)
        seen += rows or 0
    return out


@torch.no_grad()
def collect_input_norms(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable,
                        max_samples: int | None = None) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ per input feature j of each module, over the real tokens of ``batches``.

    ``modules`` maps names to layers of ``model``; names under a ``decoder`` path of an
    encoder–decoder model are aligned with the decoder mask. Forward pre-hooks are removed
    afterwards and the training mode restored. Returns float32 tensors of shape (in,).
    """
    sums: dict[str, torch.Tensor] = {}
    state = {"masks": TokenMasks()}

    def hook(name, module, inputs):
        x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
        if not isinstance(x, torch.Tensor):
            return
        x = x.detach()
        flat = x.reshape(-1, x.shape[-1])
        keep = TokenMasks.align(tuple(x.shape[:-1]), state["masks"].for_module(name))
        if keep is not None:
            flat = flat[keep.to(flat.device)]
        sq = flat.to(torch.float64).pow(2).sum(dim=0)
        sums[name] = sq if name not in sums else sums[name] + sq

    handles = []
    was_training = {m: m.training for m in model.modules()}
    device = model_device(model)
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda m, i, _n=name: hook(_n, m, i)))
        model.eval()
        for batch in limit_samples(batches, max_samples):
            state["masks"] = TokenMasks.from_batch(model, batch)
            call_model(model, move_batch(batch, device))
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag
    norms = {}
    for name, module in modules.items():
        if name not in sums:
            raise RuntimeError(f"module {name!r} received no input during calibration")
        norms[name] = sums[name].sqrt().to(torch.float32)
    return norms


# --- Scores and masks -------------------------------------------------------------------------
def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| · ‖X_j‖₂ for an (out, in) ``weight`` and an (in,) ``input_norm``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    norm = input_norm.reshape(-1)
    if norm.numel() != weight.shape[1]:
        raise ValueError(f"input norm has {norm.numel()} features, weight has {weight.shape[1]} inputs "
                         "(GPT-2 Conv1D weights must be transposed to (out, in) first)")
    return weight.detach().abs().float() * norm.to(weight.device, torch.float32).unsqueeze(0)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (True = prune) of the ``round(sparsity · in)`` lowest scores of every row
    (Python's round: halves go to the even count)."""
    sparsity = check_sparsity(sparsity)
    k = int(round(sparsity * scores.shape[1]))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask (True = prune): in each group of ``m`` consecutive inputs of a row, all but the
    ``n`` highest scores."""
    if not (isinstance(n, int) and isinstance(m, int)) or n < 1 or m < 1:
        raise ValueError(f"N:M needs positive integers, got {n}:{m}")
    if n > m:
        raise ValueError(f"N:M keeps N={n} of M={m}: N must not exceed M")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"input width {cols} is not divisible by M={m} for {n}:{m} pruning")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=-1, largest=True, sorted=False).indices
    prune = torch.ones_like(groups, dtype=torch.bool)
    prune.scatter_(-1, keep, False)
    return prune.reshape(rows, cols)


def prune_unstructured(weight: torch.Tensor, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero, in place, the ``round(sparsity · in)`` lowest-scored weights of every row of the
    (out, in) ``weight``; returns the pruned-entries mask."""
    _check_shapes(weight, scores)
    mask = unstructured_mask(scores, sparsity)
    with torch.no_grad():
        weight.masked_fill_(mask.to(weight.device), 0)
    return mask


def prune_n_m(weight: torch.Tensor, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured pruning of the (out, in) ``weight``, in place; returns the mask."""
    _check_shapes(weight, scores)
    mask = n_m_mask(scores, n, m)
    with torch.no_grad():
        weight.masked_fill_(mask.to(weight.device), 0)
    return mask


def _check_shapes(weight: torch.Tensor, scores: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.shape != scores.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and scores {tuple(scores.shape)} must be the "
                         "same 2-D (out, in) shape")


def _prune_layer(module: nn.Module, scores: torch.Tensor, config: PruneConfig) -> float:
    weight = weight_out_in(module)  # a view: pruning it prunes the layer
    if config.n_m is not None:
        prune_n_m(weight, scores, *config.n_m)
    else:
        prune_unstructured(weight, scores, config.sparsity)
    return float((weight == 0).sum()) / weight.numel()


def check_prunable(model: nn.Module, config: PruneConfig) -> None:
    """Refuse what cannot be pruned (quantised weights, N:M on widths M does not divide) *before*
    anything is merged: a refused call leaves the model as it was."""
    _check_layers(target_modules(model, config.targets), config)


def _check_layers(modules: dict[str, nn.Module], config: PruneConfig) -> None:
    if not modules:
        raise ValueError(f"no layers to prune for targets={config.targets!r}")
    for name, module in modules.items():
        layer = dense_layer(module)
        n_out, n_in = (layer.nf, layer.weight.shape[0]) if is_conv1d(layer) else \
            (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if tuple(weight_out_in(module).shape) != (n_out, n_in) or not weight_out_in(module).is_floating_point():
            raise ValueError(f"layer {name!r} ({type(layer).__name__}) does not store a plain floating-point "
                             "weight matrix (quantized?): prune before quantizing")
    if config.n_m is not None:
        m = config.n_m[1]
        for name, module in modules.items():
            width = weight_out_in(module).shape[1]
            if width % m:
                raise ValueError(f"layer {name!r}: input width {width} is not divisible by M={m} "
                                 f"for {config.structure} pruning")


def _layer_groups(names: list[str]) -> list[list[str]]:
    """Targets grouped by transformer layer (path up to the first numeric component), in order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        m = re.search(r"^(.*?\.\d+)(\.|$)", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return list(groups.values())


# --- Methods ----------------------------------------------------------------------------------
@torch.no_grad()
def wanda_prune(model: nn.Module, batches: Iterable, config: PruneConfig | None = None) -> dict[str, float]:
    """Prune ``model`` in place with WANDA; returns the achieved sparsity of each pruned layer.

    ``model`` is a transformers model or a peft wrapper (mergeable adapters are merged into
    the base weights first; the pruned model is then ``merge_peft(model)``'s result, which the
    wrapper also runs). ``batches`` are calibration inputs as for the model's forward
    (dicts with ``input_ids``/``attention_mask``, ...); the first
    ``config.calibration_samples`` sequences are used.
    """
    config = config if config is not None else PruneConfig()
    check_prunable(model, config)
    runner = merge_peft(model)
    modules = target_modules(runner, config.targets)
    _check_layers(modules, config)
    calib = limit_samples(batches, config.calibration_samples)
    if not calib:
        raise ValueError("no calibration batches")
    groups = _layer_groups(list(modules)) if config.sequential else [list(modules)]
    achieved: dict[str, float] = {}
    for group in groups:
        subset = {name: modules[name] for name in group}
        norms = collect_input_norms(runner, subset, calib)
        for name, module in subset.items():
            scores = wanda_scores(weight_out_in(module), norms[name])
            achieved[name] = _prune_layer(module, scores, config)
    return achieved


@torch.no_grad()
def magnitude_prune(model: nn.Module, config: PruneConfig | None = None) -> dict[str, float]:
    """Baseline: prune by |W| per output row (same targets and structures as WANDA)."""
    config = config if config is not None else PruneConfig()
    runner = merge_peft(model)
    modules = target_modules(runner, config.targets)
    _check_layers(modules, config)
    return {name: _prune_layer(module, magnitude_scores(weight_out_in(module)), config)
            for name, module in modules.items()}


__all__ = [
    "PruneConfig", "TARGETS", "merge_peft", "target_modules", "collect_input_norms", "wanda_scores",
    "magnitude_scores", "unstructured_mask", "n_m_mask", "prune_unstructured", "prune_n_m",
    "wanda_prune", "magnitude_prune", "calibration_indices", "limit_samples", "parse_n_m",
    "check_sparsity", "weight_out_in", "is_conv1d",
]
