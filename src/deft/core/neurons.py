"""Removing MLP neurons: a smaller dense model with the same function where those neurons were 0.

Neuron j of an MLP block is row j of the first projection (the gate and up rows of a gated MLP;
rows j and width + j of a fused gate/up layer) and column j of the down projection. Removing it
copies the kept rows / columns into smaller ``nn.Linear`` (or GPT-2 ``Conv1D``) layers at the same module paths, found from the site table
(:func:`deft.core.sites.find_sites`): no kernel, no mask, any batch size. What the removed
neurons contributed on average (``bias_delta``, one vector per block) is added to the down
projection's bias — created if the layer had none and the delta is non-zero — so a neuron
that is 0 on every token is removed exactly and one that is nearly always 0 is replaced by its
mean contribution.

The activation module at the site stays (thresholds, ADA's α): it is elementwise, so it runs
on the kept neurons unchanged (a threshold's neuron mask is cut to the kept neurons). Layers must be plain float dense layers: merge LoRA first
(:func:`deft.methods.merge_peft`); bottleneck adapters and 4-bit layers are refused.

What was removed is data (:class:`NeuronRemoval`: kept indices and original width per site,
the bias deltas), saved in a run directory as ``shrink.json`` + ``shrink.safetensors`` and
re-applied to the rebuilt model on every load (:meth:`deft.training.RunDir.apply_shrink`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .layers import dense_layer, is_conv1d, set_module, unwrap_model, weight_out_in
from .sites import ActivationSite, find_sites, require_dense
from .thresholds import threshold_path

__all__ = ["SHRINK_FILE", "SHRINK_WEIGHTS_FILE", "NeuronRemoval", "apply_removal", "check_removable",
           "mlp_parameters", "remove_neurons"]

SHRINK_FILE = "shrink.json"
SHRINK_WEIGHTS_FILE = "shrink.safetensors"
FORMAT = 1


def _plain_dense(base: nn.Module, path: str, role: str) -> nn.Module:
    """The layer at ``path`` if it is a plain float Linear / Conv1D; a one-line ValueError otherwise."""
    layer = base.get_submodule(path)
    if hasattr(layer, "lora_A"):
        raise ValueError(f"the MLP's {role} layer {path} holds unmerged LoRA: merge it first (deft.methods.merge_peft)")
    if dense_layer(layer) is not layer:
        raise ValueError(f"the MLP's {role} layer {path} is wrapped in a {type(layer).__name__}: adapters cannot be "
                         "merged into the weights, so adapter runs cannot be shrunk")
    if not (isinstance(layer, nn.Linear) or is_conv1d(layer)):
        raise ValueError(f"the MLP's {role} layer {path} is a {type(layer).__name__}, not nn.Linear or Conv1D")
    weight = layer.weight
    if not weight.is_floating_point() or type(weight).__name__ == "Params4bit":
        raise ValueError(f"the MLP's {role} layer {path} holds quantised ({weight.dtype}) weights (QLoRA): neurons "
                         "cannot be removed from a 4-bit layer")
    return layer


def _roles(site: ActivationSite) -> list[tuple[str, str]]:
    require_dense(site, "removing neurons")
    mult = [("mult", site.mult)] if site.mult and site.mult != site.first else []  # fused: one layer, both halves
    return [("first", site.first), *mult, ("down", site.down)]


def check_removable(model: nn.Module, paths=None) -> None:
    """ValueError unless every MLP (of the sites at ``paths``; default all) is plain dense layers."""
    base = unwrap_model(model)
    for site in find_sites(model, "act"):
        if paths is None or site.module in paths:
            for role, path in _roles(site):
                _plain_dense(base, path, role)


def _new_dense(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A layer of ``old``'s kind holding ``weight`` ((out, in)) and ``bias``."""
    grad = old.weight.requires_grad
    if is_conv1d(old) and weight.numel():  # Conv1D's forward cannot take width 0; a Linear of width 0 can
        new = type(old)(0, 0)  # Conv1D(nf, nx) has no device / dtype arguments: fill in afterwards
        new.nf, new.nx = weight.shape
        new.weight = nn.Parameter(weight.t().contiguous(), requires_grad=grad)
        new.bias = nn.Parameter(bias if bias is not None else weight.new_zeros(weight.shape[0]), requires_grad=grad)
        return new
    with warnings.catch_warnings():  # a zero-width layer (every neuron removed) warns at init
        warnings.simplefilter("ignore")
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=grad)
    return new


@torch.no_grad()
def remove_neurons(model: nn.Module, keep: Mapping[str, torch.Tensor],
                   bias_delta: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Keep only neurons ``keep[site]`` (indices into the block's width) of each listed site,
    in place; ``bias_delta[site]`` (model width) is added to that block's down-projection bias.
    Sites not in ``keep`` are left as they are. Returns ``model``."""
    bias_delta = dict(bias_delta or {})
    base = unwrap_model(model)
    sites = {s.module: s for s in find_sites(model, "act")}
    unknown = sorted((set(keep) | set(bias_delta)) - set(sites))
    if unknown:
        raise ValueError(f"no MLP activation site at {unknown[:3]} in this model (its sites: {sorted(sites)[:3]} ...)")
    for path, indices in keep.items():
        site = sites[path]
        layers = {role: _plain_dense(base, p, role) for role, p in _roles(site)}
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() and (indices.min() < 0 or indices.max() >= site.width
                                or indices.unique().numel() != indices.numel()):
            raise ValueError(f"{path}: kept neurons must be distinct indices in [0, {site.width})")
        for role, layer in layers.items():
            weight = weight_out_in(layer)
            index = indices.to(weight.device)
            bias = getattr(layer, "bias", None)
            bias = bias.data if bias is not None else None
            if role == "first" and site.fused:  # neuron j is row j of each half
                index = torch.cat([index, index + site.width])
            if role == "down":
                weight = weight.index_select(1, index)
                delta = bias_delta.pop(path, None)
                if delta is not None and bool(delta.ne(0).any()):
                    delta = delta.to(device=weight.device, dtype=weight.dtype)
                    bias = delta.clone() if bias is None else bias + delta
            else:
                weight = weight.index_select(0, index)
                bias = bias.index_select(0, index) if bias is not None else None
            set_module(base, getattr(site, role), _new_dense(layer, weight, bias))
        activation = base.get_submodule(threshold_path(base, path))
        if getattr(activation, "keep", None) is not None:  # a neuron mask (and its fill) follows its neurons
            keep = activation.keep.to(indices.device).index_select(0, indices)
            fill = getattr(activation, "fill", None)
            fill = None if fill is None else fill.to(indices.device).index_select(0, indices)
            all_kept = bool(keep.all())  # all kept: no mask left to apply (a kept neuron's fill is 0)
            activation.keep = None if all_kept else keep
            activation.fill = None if all_kept else fill
    if bias_delta:
        raise ValueError(f"bias deltas for {sorted(bias_delta)[:3]} without kept neurons: give keep for those sites")
    return model


def mlp_parameters(model: nn.Module) -> int:
    """Parameters of the MLP blocks' dense layers (first, up, down: weights and biases)."""
    base = unwrap_model(model)
    return sum(p.numel() for site in find_sites(model, "act") for _, path in _roles(site)
               for p in base.get_submodule(path).parameters())


def _ranges(indices: torch.Tensor) -> str:
    """Sorted indices as ``"0-3,7,9-12"`` (one short line in ``shrink.json`` even for wide layers)."""
    values, parts, start = sorted(indices.tolist()), [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def _parse_ranges(text: str) -> list[int]:
    out = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out


@dataclass
class NeuronRemoval:
    """Which neurons each block keeps (``kept``: site path → indices in the original width
    ``widths``) and what is added to its down bias (``bias_delta``, only non-zero ones)."""

    kept: dict[str, torch.Tensor]
    widths: dict[str, int]
    bias_delta: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        # sorted: the saved form (index ranges) keeps no order, and a reload must give the same layers
        self.kept = {p: torch.as_tensor(v, dtype=torch.long).reshape(-1).sort().values for p, v in self.kept.items()}
        if set(self.kept) != set(self.widths):
            raise ValueError("a neuron removal needs the original width of every site it keeps neurons of")

    def save(self, directory: str | Path, summary: dict | None = None) -> Path:
        """``shrink.json`` (kept indices, widths, and ``summary`` if given) and, when any bias
        changes, ``shrink.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"format": FORMAT, "sites": {p: {"width": self.widths[p], "kept_count": int(self.kept[p].numel()),
                                                   "kept": _ranges(self.kept[p])} for p in self.kept}}
        if summary is not None:
            payload["summary"] = summary
        weights = directory / SHRINK_WEIGHTS_FILE
        if self.bias_delta:
            save_file({p: t.detach().cpu().contiguous() for p, t in self.bias_delta.items()}, str(weights))
        elif weights.is_file():
            weights.unlink()  # a stale file from an earlier removal would otherwise be loaded
        path = directory / SHRINK_FILE
        path.write_text(json.dumps(payload, indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "NeuronRemoval | None":
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / SHRINK_FILE
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        if payload.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown neuron-removal format {payload.get('format')!r} "
                             f"(this deft reads {FORMAT})")
        weights = directory / SHRINK_WEIGHTS_FILE
        return cls(kept={p: _parse_ranges(s["kept"]) for p, s in payload["sites"].items()},
                   widths={p: int(s["width"]) for p, s in payload["sites"].items()},
                   bias_delta=load_file(str(weights)) if weights.is_file() else {})


def apply_removal(model: nn.Module, removal: NeuronRemoval) -> nn.Module:
    """``removal`` applied to ``model`` (in place), which must still have the original widths."""
    widths = {s.module: s.width for s in find_sites(model, "act")}
    wrong = {p: (w, widths.get(p)) for p, w in removal.widths.items() if widths.get(p) != w}
    if wrong:
        path, (want, have) = next(iter(wrong.items()))
        raise ValueError(f"this neuron removal was made for width {want} at {path}, the model has {have} "
                         f"({len(wrong)} site(s) differ): not the model it was made for")
    return remove_neurons(model, removal.kept, removal.bias_delta)
