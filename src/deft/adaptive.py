"""ADA-DEFT: one learned scalar α_l per MLP block, and real skipping of the blocks it switches off.

METHOD.md §4: every MLP block l gets a trainable scalar α_l (per stack), initialised
0.80 + N(0, 0.05²), that scales the block's activation where it enters the dropout,
``A_l ← α_l · σ(·)``. The density loss is taken on the scaled activation, so it pulls α_l
toward 0 wherever the task allows (ADA-DEFT); without the density loss the same α_l is
ADA-PEFT. At inference, blocks with |α_l| under a threshold are removed outright.

How it is built — generically, from the site table of :mod:`deft.sites`, so every family
(BERT-like, DistilBERT, T5 plain and gated, GPT-2, OPT, LLaMA-family, ViT, the generic
fallback) and every PEFT method of :mod:`deft.methods` is covered by the same code:

* **α** — the activation module at ``site.module`` is replaced *at the same path* by
  :class:`ScaledActivation` (``α · inner(x)``). Capture hooks on that path therefore see
  α·σ, which is what the density loss must see; :func:`deft.sites.find_sites` still finds
  the same path (family rules match the path; the generic fallback recognises the wrapper
  through its ``wraps_activation`` flag). For gated MLPs α scales σ's output and hence the
  gated product. peft freezes every non-adapter parameter when it wraps a model, so α is
  added *after* the method and marked trainable.
* **skip** — with α_l = 0 the input of the down projection is exactly zero, so the block's
  output is the constant ``down(0)`` (the bias, plus whatever an adapter on the down
  projection adds to it; zero for bias-free T5). :func:`skip_sites` replaces ``first`` and
  ``mult`` by :class:`ZeroProjection` (an expanded zero view: no weights, no allocation),
  the activation by :class:`SkippedActivation` (passes the zeros through) and ``down`` by
  :class:`ConstantProjection` (``down(0)`` broadcast). The residual path is untouched, the
  replaced modules lose their last reference and their weights are freed. The skipped model
  is *exactly* the unskipped model with that block's α = 0 (tests check every family).
* **export** — LoRA is merged (``merge_and_unload``), α is folded into the down projection
  (``down(α·z) = (α·W) z + b``, also for gated MLPs), so an export without skipped blocks
  and without adapters is a plain transformers directory. Skipped blocks or bottleneck
  adapters change the module structure; such exports store their weights under the
  ``deft`` variant (``model.deft.safetensors``), which plain ``from_pretrained`` refuses, and
  load with :func:`load_exported`, which builds the reduced structure *before* loading, so
  the skipped weights are never allocated. Prefix / prompt tuning cannot be merged into
  weights: their virtual tokens are exported as a peft directory (``peft/``) on top of the
  exported base. QLoRA export is refused (merging into NF4 weights re-quantises them).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .sites import ActivationSite, SiteMap, find_sites, unwrap_model

ADAPTIVE_DIR = "adaptive"  # inside a run directory (and inside Trainer checkpoints)
WEIGHTS_FILE = "adaptive.safetensors"
INFO_FILE = "adaptive.json"
PLOT_FILE = "alphas.png"
EXPORT_INFO_FILE = "deft_export.json"
EXPORT_VARIANT = "deft"  # weights of structurally reduced exports: model.deft.safetensors
PEFT_EXPORT_DIR = "peft"

#: Default skip threshold on |α|. Chosen from the measured metric-vs-threshold curves of
#: ``benchmarks/ada_bench.py`` (README, "ADA-DEFT"): blocks the density loss switches off
#: end with |α| of the order of the optimizer's step (≲ 1e-2), blocks that matter stay
#: ≳ 0.1, and the metric is flat up to this value.
DEFAULT_SKIP_THRESHOLD = 0.05


class AdaptiveError(ValueError):
    """An ADA-DEFT operation that cannot be done on this model / run (the message says why)."""


@dataclass(frozen=True)
class AdaptiveConfig:
    """How the per-block weights α_l are created.

    Attributes:
        enabled: False → :func:`apply_adaptive` does nothing (plain PEFT / DEFT).
        init: mean of the initial α (paper: 0.80).
        init_std: standard deviation of the initial noise (paper: 0.05).
        seed: seed of that noise (its own generator: independent of the global RNG state).
        lr_scale: α is stored as ``α / lr_scale`` and multiplied back in the forward, so an
            Adam-type optimizer moves α ``lr_scale`` times faster than the PEFT modules
            (Adam's step does not depend on the gradient's scale). 1 = the model's learning
            rate, as the paper.
    """

    enabled: bool = True
    init: float = 0.8
    init_std: float = 0.05
    seed: int = 0
    lr_scale: float = 1.0

    def __post_init__(self):
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        if not self.lr_scale > 0:
            raise ValueError(f"lr_scale must be > 0, got {self.lr_scale}")

    def to_dict(self) -> dict:
        return asdict(self)


def initial_alphas(n: int, config: AdaptiveConfig) -> torch.Tensor:
    """``n`` initial values ``init + init_std · N(0, 1)`` from a generator seeded with ``config.seed``."""
    generator = torch.Generator().manual_seed(int(config.seed))
    noise = torch.randn(n, generator=generator, dtype=torch.float64)
    return (config.init + config.init_std * noise).to(torch.float32)


# -- modules ------------------------------------------------------------------------------------

class _Forwarding(nn.Module):
    """Forwards unknown attribute reads to ``inner`` (model code may inspect its activation)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)


class ScaledActivation(_Forwarding):
    """``α · inner(x)``: the activation of one MLP block, scaled by its trainable weight.

    The parameter ``theta`` holds ``α / lr_scale`` (see :class:`AdaptiveConfig`); read and set
    α through :attr:`alpha` / :meth:`set_alpha`. α is kept in fp32 and cast to the
    activation's dtype in the forward.
    """

    wraps_activation: ClassVar[bool] = True  # read by deft.sites' generic discovery

    def __init__(self, inner: nn.Module, alpha: float, lr_scale: float = 1.0, device=None):
        super().__init__()
        self.inner = inner
        self.lr_scale = float(lr_scale)
        self.theta = nn.Parameter(torch.tensor(float(alpha) / self.lr_scale, dtype=torch.float32, device=device))

    @property
    def alpha(self) -> torch.Tensor:
        return self.theta * self.lr_scale

    @torch.no_grad()
    def set_alpha(self, value: float) -> None:
        self.theta.fill_(float(value) / self.lr_scale)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out * self.alpha.to(out.dtype)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4f}, lr_scale={self.lr_scale:g}"


class SkippedActivation(_Forwarding):
    """The activation of a skipped block: its input is already the zeros of :class:`ZeroProjection`."""

    wraps_activation: ClassVar[bool] = True

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner  # kept (stateless) so the site still reports its activation type

    def forward(self, x, *args, **kwargs):
        return x


class _NoWeights(nn.Module):
    """Base of the replacement projections: dense-layer attributes, but no weights.

    ``weight`` is an empty placeholder tensor (a plain attribute, not in any state dict):
    model code reads it (T5 casts its hidden states to ``wo.weight.dtype``; transformers'
    ``_init_weights`` initialises ``wi.weight``), and an empty tensor satisfies both.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = torch.empty(0, dtype=dtype, device=device)
        self.bias = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, skipped"


class ZeroProjection(_NoWeights):
    """Stands in for ``first`` / ``mult`` of a skipped block: zeros of the right shape, as an
    expanded view of one scalar (no weights, no (B, T, h) allocation)."""

    def forward(self, x, *args, **kwargs):
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


class ConstantProjection(_NoWeights):
    """Stands in for ``down`` of a skipped block: ``down(0)``, broadcast over the positions.

    ``constant`` is a persistent buffer, so exports carry it and :func:`load_exported` restores it.
    """

    def __init__(self, constant: torch.Tensor, in_features: int):
        super().__init__(in_features, constant.numel(), constant.dtype, constant.device)
        self.register_buffer("constant", constant.detach().reshape(-1).clone())

    def forward(self, x, *args, **kwargs):
        return self.constant.expand(*x.shape[:-1], self.out_features)


# -- helpers ------------------------------------------------------------------------------------

def _set_module(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


def _act_sites(model: nn.Module, sites: SiteMap | Sequence[ActivationSite] | None) -> tuple[ActivationSite, ...]:
    """Sites measured at σ's output (α wraps the activation module whatever point was measured)."""
    if isinstance(sites, SiteMap) and sites.point == "act":
        return sites.sites
    if sites is not None and not isinstance(sites, SiteMap) and all(s.point == "act" for s in sites):
        return tuple(sites)
    act = find_sites(model, "act").sites
    if sites is None:
        return act
    wanted = {(s.stack, s.layer, s.first) for s in sites}
    return tuple(s for s in act if (s.stack, s.layer, s.first) in wanted)


def _float_dtype(*modules: nn.Module | None) -> torch.dtype:
    """The dtype activations have at these modules: their first floating-point tensor's
    (4-bit weights are uint8; their biases / compute dtype are float)."""
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.get_default_dtype()


def _device(*modules: nn.Module | None) -> torch.device:
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            return tensor.device
    return torch.device("cpu")


_HANDLE_ATTR = "deft_adaptive"
_SKIPPED_ATTR = "deft_skipped_sites"


def adaptive_weights(model: nn.Module) -> AdaptiveWeights | None:
    """The handle :func:`apply_adaptive` attached to ``model`` (None for a model without α)."""
    return unwrap_model(model).__dict__.get(_HANDLE_ATTR)


def skipped_sites(model: nn.Module) -> list[ActivationSite]:
    """Sites removed from ``model`` by :func:`skip_sites` (or restored by :func:`load_exported`)."""
    return list(unwrap_model(model).__dict__.get(_SKIPPED_ATTR, []))


# -- α ------------------------------------------------------------------------------------------

@dataclass
class AdaptiveWeights:
    """Handle on the α of one model: read, set, save, restore, report.

    ``sites`` are the model's sites at σ's output, in forward order (encoder, then decoder);
    α is keyed by ``site.module`` (the path of the activation in the unwrapped model).
    """

    model: nn.Module = field(repr=False)
    sites: tuple[ActivationSite, ...] = field(repr=False)
    config: AdaptiveConfig
    initial: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, float] = field(default_factory=dict)  # α of blocks already removed

    def modules(self) -> dict[str, ScaledActivation]:
        base = unwrap_model(self.model)
        out = {}
        for site in self.sites:
            module = base.get_submodule(site.module)
            if isinstance(module, ScaledActivation):
                out[site.module] = module
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [m.theta for m in self.modules().values()]

    def alphas(self) -> dict[str, float]:
        """α per site (path → value), skipped blocks included (their last value)."""
        live = {path: float(m.alpha.detach()) for path, m in self.modules().items()}
        return {s.module: live.get(s.module, self.skipped.get(s.module, float("nan"))) for s in self.sites}

    def requires_grad_(self, flag: bool = True) -> AdaptiveWeights:
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def set_alphas(self, values: dict[str, float]) -> None:
        modules = self.modules()
        unknown = sorted(set(values) - set(modules))
        if unknown:
            raise AdaptiveError(f"no α at {unknown[:3]} (skipped, or not an activation site of this model)")
        for path, value in values.items():
            modules[path].set_alpha(value)

    @contextmanager
    def forced(self, values: dict[str, float]) -> Iterator[AdaptiveWeights]:
        """Temporarily set some α (e.g. to 0: the block switched off without removing it)."""
        before = {path: a for path, a in self.alphas().items() if path in values}
        self.set_alphas(values)
        try:
            yield self
        finally:
            self.set_alphas(before)

    def below(self, threshold: float) -> list[ActivationSite]:
        """Live (not yet skipped) sites with |α| < threshold."""
        modules = self.modules()
        return [s for s in self.sites if s.module in modules and abs(float(modules[s.module].alpha.detach())) < threshold]

    def report(self) -> dict:
        """JSON-ready α: per site, and per stack as lists in layer order (the paper's Fig. 3)."""
        alphas = self.alphas()
        stacks: dict[str, list[float]] = {}
        for site in self.sites:
            stacks.setdefault(site.stack, []).append(alphas[site.module])
        return {"per_site": alphas, "per_stack": stacks,
                "initial": [self.initial.get(s.module) for s in self.sites],
                "skipped": sorted(self.skipped), "config": self.config.to_dict()}

    def save(self, directory: str | Path, plot: bool = True) -> Path:
        """Write ``adaptive.safetensors`` (α per site path), ``adaptive.json`` and ``alphas.png``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        alphas = self.alphas()
        save_file({path: torch.tensor([value], dtype=torch.float32) for path, value in alphas.items()},
                  str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        info = {**self.report(), "sites": [s.to_dict() for s in self.sites]}
        (directory / INFO_FILE).write_text(json.dumps(info, indent=2))
        if plot:
            plot_alphas(self, directory / PLOT_FILE)
        return directory

    def load(self, directory: str | Path) -> AdaptiveWeights:
        """Restore α saved by :meth:`save` (the site paths must match this model's)."""
        from safetensors.torch import load_file

        path = Path(directory) / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: no ADA weights saved in {directory}")
        state = {k: float(v.reshape(-1)[0]) for k, v in load_file(str(path)).items()}
        expected = {s.module for s in self.sites}
        if set(state) != expected:
            raise AdaptiveError(f"ADA weights in {directory} do not fit this model: saved for "
                                f"{sorted(set(state) - expected)[:3]}, missing {sorted(expected - set(state))[:3]}")
        info_file = Path(directory) / INFO_FILE
        if info_file.is_file():
            initial = json.loads(info_file.read_text()).get("initial") or []
            self.initial = {s.module: v for s, v in zip(self.sites, initial)}
        self.set_alphas({k: v for k, v in state.items() if k not in self.skipped})
        return self


def apply_adaptive(model: nn.Module, sites: SiteMap | Sequence[ActivationSite] | None = None,
                   config: AdaptiveConfig | None = None) -> AdaptiveWeights | None:
    """Add one trainable α per MLP block of ``model`` (a transformers model or a peft wrapper).

    Call it *after* the PEFT method is applied (peft freezes whatever exists when it wraps
    the model). ``sites`` may be measured at any point: α always wraps the activation module
    of the same blocks. Returns the handle (also reachable via :func:`adaptive_weights`), or
    None when ``config.enabled`` is False.
    """
    config = config or AdaptiveConfig()
    if not config.enabled:
        return None
    base = unwrap_model(model)
    if adaptive_weights(model) is not None or any(isinstance(m, ScaledActivation) for m in base.modules()):
        raise AdaptiveError("the model already has ADA weights (apply_adaptive was called twice)")
    act_sites = _act_sites(model, sites)
    if not act_sites:
        raise AdaptiveError("no MLP activation site to put an ADA weight on")
    values = initial_alphas(len(act_sites), config)
    for site, value in zip(act_sites, values.tolist()):
        inner = base.get_submodule(site.module)
        if isinstance(inner, SkippedActivation):
            raise AdaptiveError(f"block {site.module} is already skipped; apply ADA weights before skipping")
        first = base.get_submodule(site.first) if site.first else None
        wrapper = ScaledActivation(inner, value, config.lr_scale, device=_device(first, inner))
        _set_module(base, site.module, wrapper)
    handle = AdaptiveWeights(model=model, sites=tuple(act_sites), config=config,
                             initial={s.module: v for s, v in zip(act_sites, values.tolist())})
    handle.requires_grad_(True)
    object.__setattr__(base, _HANDLE_ATTR, handle)  # plain attribute: stays out of state dicts
    return handle


def load_adaptive(model: nn.Module, directory: str | Path, sites: SiteMap | None = None) -> AdaptiveWeights:
    """Apply α with the config saved in ``directory`` and restore their values (frozen: inference)."""
    info = json.loads((Path(directory) / INFO_FILE).read_text()) if (Path(directory) / INFO_FILE).is_file() else {}
    config = AdaptiveConfig(**info.get("config", {}))
    handle = apply_adaptive(model, sites, config)
    return handle.load(directory).requires_grad_(False)


@contextmanager
def frozen_alphas(model: nn.Module) -> Iterator[None]:
    """α temporarily not trainable: a method's ``save`` that stores every trainable parameter
    (bottleneck adapters) then leaves α to ``adaptive/``, their one home. No-op without α."""
    handle = adaptive_weights(model)
    params = handle.parameters() if handle else []
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def checkpoint_callback(handle: AdaptiveWeights):
    """A ``transformers.TrainerCallback`` writing α into every Trainer checkpoint (``adaptive/``).

    peft-wrapped models are checkpointed by peft, which stores only its own modules; α would
    otherwise be lost on ``--resume``. Restore with ``handle.load(checkpoint / ADAPTIVE_DIR)``.
    """
    from transformers import TrainerCallback

    class AdaptiveCheckpointCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                handle.save(Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTIVE_DIR, plot=False)

    return AdaptiveCheckpointCallback()


def plot_alphas(alphas: AdaptiveWeights | dict, path: str | Path, threshold: float | None = None) -> Path:
    """α per layer, one panel per stack (encoder / decoder), learned vs initial — the paper's Fig. 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = alphas.report() if isinstance(alphas, AdaptiveWeights) else alphas
    stacks = report["per_stack"]
    initial = report.get("initial") or []
    fig, axes = plt.subplots(1, len(stacks), figsize=(5 * len(stacks), 3.2), squeeze=False)
    offset = 0
    for ax, (stack, values) in zip(axes[0], stacks.items()):
        layers = list(range(len(values)))
        ax.bar(layers, values, color="tab:blue", label="learned α")
        init = initial[offset:offset + len(values)]
        offset += len(values)
        if init and all(v is not None for v in init):
            ax.plot(layers, init, "k.", label="initial α")
        if threshold is not None:
            ax.axhline(threshold, color="tab:red", lw=1, ls="--", label=f"skip threshold {threshold:g}")
        ax.set_title(f"{stack} α per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("α")
        ax.set_xticks(layers)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- skipping -----------------------------------------------------------------------------------

def skip_sites(model: nn.Module, sites: Sequence[ActivationSite]) -> list[ActivationSite]:
    """Remove these MLP blocks (σ-output sites): exactly the model with their α = 0 (module doc).

    Works on any model whose sites know ``first`` and ``down`` (every family rule; the
    generic fallback when it found a down projection), with or without α.
    """
    base = unwrap_model(model)
    handle = adaptive_weights(model)
    alphas = handle.alphas() if handle else {}
    done = []
    for site in sites:
        if site.point != "act":
            raise AdaptiveError(f"skip_sites takes sites at σ's output (point 'act'), got {site.point!r}")
        if not site.first or not site.down:
            raise AdaptiveError(f"cannot skip block {site.module}: its {'first' if not site.first else 'down'} "
                                "projection is unknown (generic site discovery found none)")
        act = base.get_submodule(site.module)
        if isinstance(act, SkippedActivation):
            continue
        first, down = base.get_submodule(site.first), base.get_submodule(site.down)
        mult = base.get_submodule(site.mult) if site.mult else None
        dtype, device = _float_dtype(down, first), _device(down, first)
        # The block's output when the down projection's input is zero: bias (+ adapter) or 0.
        was_training = down.training
        down.eval()
        with torch.no_grad():
            constant = down(torch.zeros(1, site.width, dtype=dtype, device=device)).reshape(-1)
        down.train(was_training)
        _set_module(base, site.first, ZeroProjection(0, site.width, dtype, device))
        if site.mult:
            _set_module(base, site.mult, ZeroProjection(0, site.width, dtype, device))
        inner = act.inner if isinstance(act, ScaledActivation) else act
        _set_module(base, site.module, SkippedActivation(inner))
        _set_module(base, site.down, ConstantProjection(constant, site.width))
        del first, down, mult, act  # the last references: their weights are freed here
        if handle is not None:
            handle.skipped[site.module] = alphas.get(site.module, 0.0)
        done.append(site)
    object.__setattr__(base, _SKIPPED_ATTR, [*skipped_sites(base), *done])
    return done


def skip_blocks(model: nn.Module, sites: SiteMap | Sequence[ActivationSite] | None = None,
                threshold: float = DEFAULT_SKIP_THRESHOLD) -> list[ActivationSite]:
    """Remove every MLP block whose |α| < ``threshold``; returns the removed sites."""
    if threshold is None or not threshold >= 0:
        raise AdaptiveError(f"skip threshold must be a number >= 0, got {threshold}")
    handle = adaptive_weights(model)
    if handle is None:
        raise AdaptiveError("this model has no ADA weights α, so no block can be chosen for skipping: "
                            "train with --ada (ADA-PEFT / ADA-DEFT) first")
    wanted = {s.module for s in _act_sites(model, sites)}
    return skip_sites(model, [s for s in handle.below(threshold) if s.module in wanted])


@dataclass(frozen=True)
class ThresholdPoint:
    """The metric with every block of |α| < ``threshold`` switched off."""

    threshold: float
    blocks_skipped: int
    skipped: tuple[str, ...]
    mlp_params_removed: int
    metric: float


def _block_params(model: nn.Module, site: ActivationSite) -> int:
    base = unwrap_model(model)
    total = 0
    for path in (site.first, site.mult, site.down):
        if path:
            total += sum(p.numel() for p in base.get_submodule(path).parameters())
    return total


def threshold_curve(model: nn.Module, evaluate: Callable[[], float], thresholds: Sequence[float]) -> list[ThresholdPoint]:
    """Metric vs skip threshold: for each threshold, the blocks under it are switched off by
    forcing their α to 0 (exactly what skipping computes, without destroying the model) and
    ``evaluate()`` is called. The model is left as it was."""
    handle = adaptive_weights(model)
    if handle is None:
        raise AdaptiveError("threshold_curve needs a model with ADA weights (apply_adaptive / a --ada run)")
    points = []
    for threshold in sorted(thresholds):
        below = handle.below(threshold)
        with handle.forced({s.module: 0.0 for s in below}):
            metric = float(evaluate())
        points.append(ThresholdPoint(float(threshold), len(below), tuple(s.module for s in below),
                                     sum(_block_params(model, s) for s in below), metric))
    return points


def pick_threshold(curve: Sequence[ThresholdPoint], max_drop: float) -> ThresholdPoint:
    """The largest threshold whose metric is within ``max_drop`` of the no-skip metric
    (the curve's first point should be threshold 0)."""
    reference = curve[0].metric
    ok = [p for p in curve if p.metric >= reference - max_drop]
    return max(ok, key=lambda p: (p.blocks_skipped, -p.threshold)) if ok else curve[0]


# -- inference form and export ---------------------------------------------------------------------

def _fold_alpha(base: nn.Module, site: ActivationSite, alpha: float) -> None:
    """α into the down projection's weight: down(α·z) = (α·W) z + b (for gated MLPs too)."""
    down = base.get_submodule(site.down)
    target = getattr(down, "base_layer", down) if type(down).__name__ == "BottleneckAdapter" else down
    weight = getattr(target, "weight", None)
    if hasattr(target, "lora_A") or not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise AdaptiveError(f"cannot fold α into {site.down} ({type(target).__name__}): not a plain float "
                            "dense layer (unmerged LoRA or quantised weight)")
    with torch.no_grad():
        weight.mul_(alpha)


def fold_alphas(model: nn.Module) -> dict[str, float]:
    """Fold every remaining α into its block's down projection and drop the α wrappers.

    The result computes the same function with the plain module structure (what export needs).
    """
    handle = adaptive_weights(model)
    if handle is None:
        return {}
    base = unwrap_model(model)
    folded = {}
    for site in handle.sites:
        module = base.get_submodule(site.module)
        if isinstance(module, ScaledActivation):
            alpha = float(module.alpha.detach())
            _fold_alpha(base, site, alpha)
            _set_module(base, site.module, module.inner)
            folded[site.module] = alpha
    base.__dict__.pop(_HANDLE_ATTR, None)  # no α left to handle
    return folded


def _method_name(model: nn.Module) -> str | None:
    from .methods import applied_method

    record = applied_method(model)
    return record.name if record else None


def prepare_for_inference(model: nn.Module, threshold: float | None = DEFAULT_SKIP_THRESHOLD, *,
                          merge: bool = True) -> tuple[nn.Module, list[ActivationSite], dict]:
    """The deployable form of a trained model: blocks under ``threshold`` removed (None: none),
    and with ``merge``: LoRA merged into the weights and α folded into the down projections.

    Returns (model, removed sites, info). The returned model may be a new object (LoRA merge
    unwraps the peft model); prefix / prompt tuning stay peft-wrapped (nothing to merge).
    """
    method = _method_name(model)
    handle = adaptive_weights(model)
    alphas = handle.alphas() if handle else {}
    removed = skip_blocks(model, None, threshold) if threshold is not None and handle is not None else []
    info = {"method": method, "alphas": alphas, "skipped": [s.module for s in skipped_sites(model)],
            "merged": False, "alphas_folded": False}
    if not merge:
        return model, removed, info
    if method == "qlora":
        raise AdaptiveError("a QLoRA run cannot be merged: merging LoRA into NF4 weights re-quantises them "
                            "(lossy). Skip blocks in memory instead (deft eval --skip-threshold) or train with lora")
    if method == "lora":
        skipped = skipped_sites(model)
        model = model.merge_and_unload()
        object.__setattr__(unwrap_model(model), _SKIPPED_ATTR, skipped)
        if handle is not None:
            object.__setattr__(unwrap_model(model), _HANDLE_ATTR, handle)
            handle.model = model
        info["merged"] = True
    info["alphas_folded"] = bool(fold_alphas(model))
    return model, removed, info


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report and no progress bars from transformers (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _resolve_modules_to_save(base: nn.Module) -> None:
    """Replace peft's ModulesToSaveWrapper (the trained task head) by its trained copy."""
    for name, module in list(base.named_modules()):
        if type(module).__name__ == "ModulesToSaveWrapper":
            _set_module(base, name, module.unload_and_optionally_merge_module(
                merge=True, safe_merge=False, adapter_names=None))


def export_model(model: nn.Module, out_dir: str | Path, threshold: float | None = DEFAULT_SKIP_THRESHOLD, *,
                 tokenizer=None, extra: dict | None = None) -> dict:
    """Write ``model`` (as built by a method's ``apply``/``load``, with or without α) as a
    standalone directory (see the module doc). ``model`` is consumed: it is skipped, merged and
    folded in place. Returns the ``deft_export.json`` content."""
    from .methods import applied_method, config_to_dict

    record = applied_method(model)
    if adaptive_weights(model) is None:
        threshold = None  # no α: nothing can be chosen for skipping, the export only merges
    model, _, info = prepare_for_inference(model, threshold, merge=True)
    removed = skipped_sites(model)  # also blocks skipped before the call
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = info["method"]
    peft_dir = None
    if method in ("prefix", "prompt"):
        # Virtual tokens cannot be merged into weights: they stay a peft module on the exported base.
        peft_dir = PEFT_EXPORT_DIR
        model.save_pretrained(str(out / PEFT_EXPORT_DIR))
    base = unwrap_model(model)
    _resolve_modules_to_save(base)
    structured = bool(removed) or method == "adapter"
    variant = EXPORT_VARIANT if structured else None
    with _quiet_transformers():
        base.save_pretrained(str(out), variant=variant)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    payload = {
        "format": 1, **(extra or {}), "architecture": type(base).__name__,
        "method": method, "method_config": config_to_dict(record.config) if record and method == "adapter" else None,
        "skip_threshold": threshold, "skipped": [s.to_dict() for s in removed], "alphas": info["alphas"],
        "lora_merged": info["merged"], "alphas_folded": info["alphas_folded"], "weights_variant": variant,
        "peft_dir": peft_dir,
        "load_with": ("transformers" if peft_dir is None else "transformers + peft") if not structured
        else "deft.adaptive.load_exported",
        "parameters": sum(p.numel() for p in unwrap_model(model).parameters()),
    }
    (out / EXPORT_INFO_FILE).write_text(json.dumps(payload, indent=2))
    return payload


def export_run(run_dir: str | Path, out_dir: str | Path, threshold: float | None = DEFAULT_SKIP_THRESHOLD) -> dict:
    """``deft export``: :func:`export_model` on a trained run (its tokenizer included)."""
    from .train import load_run

    config, model, tokenizer = load_run(run_dir)
    return export_model(model, out_dir, threshold, tokenizer=tokenizer,
                        extra={"run": str(run_dir), "task": config.task, "model": config.model})


def read_export_info(directory: str | Path) -> dict:
    path = Path(directory) / EXPORT_INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} was not written by `deft export`")
    return json.loads(path.read_text())


def _build_reduced(model: nn.Module, info: dict) -> None:
    """Give a freshly built model the exported structure (skipped blocks, adapters), before its
    weights are loaded, so nothing is allocated for the removed blocks."""
    from .methods.adapter import BottleneckAdapter

    skipped = [ActivationSite(**s) for s in info["skipped"]]
    sites = find_sites(model, "act")
    by_path = {s.module: s for s in sites}
    for site in skipped:
        if site.module not in by_path:
            raise AdaptiveError(f"exported skipped block {site.module} is not a site of {type(model).__name__}")
        down = model.get_submodule(site.down)
        dtype = _float_dtype(down)
        _set_module(model, site.first, ZeroProjection(0, site.width, dtype))
        if site.mult:
            _set_module(model, site.mult, ZeroProjection(0, site.width, dtype))
        _set_module(model, site.module, SkippedActivation(model.get_submodule(site.module)))
        out_features = _constant_width(down)
        _set_module(model, site.down, ConstantProjection(torch.zeros(out_features, dtype=dtype), site.width))
    if info.get("method") == "adapter":
        cfg = info["method_config"]
        removed = {s.module for s in skipped}
        for site in sites:
            if site.module not in removed:
                _set_module(model, site.down, BottleneckAdapter(model.get_submodule(site.down),
                                                                cfg["reduction_factor"], cfg["non_linearity"]))
    object.__setattr__(model, _SKIPPED_ATTR, skipped)


def _constant_width(down: nn.Module) -> int:
    for attr in ("out_features", "nf"):
        if isinstance(getattr(down, attr, None), int):
            return getattr(down, attr)
    return int(down.weight.shape[0])


def load_exported(directory: str | Path) -> nn.Module:
    """Load a directory written by :func:`export_run` (``deft export``), in eval mode.

    Plain exports go through ``from_pretrained``; reduced ones through a subclass of the
    architecture whose constructor builds the reduced structure, so ``from_pretrained`` loads
    only the weights that remain. Prefix / prompt exports are wrapped with their peft modules.
    """
    import transformers

    directory = Path(directory)
    info = read_export_info(directory)
    cls = getattr(transformers, info["architecture"], None)
    if cls is None:
        raise AdaptiveError(f"transformers has no class {info['architecture']!r} (exported with another version?)")
    if info.get("weights_variant"):
        original_init = cls.__init__

        def __init__(self, config, *args, **kwargs):
            original_init(self, config, *args, **kwargs)
            _build_reduced(self, info)

        cls = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    with _quiet_transformers():
        model = cls.from_pretrained(str(directory), variant=info.get("weights_variant"))
    if info.get("peft_dir"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(directory / info["peft_dir"]))
    model.requires_grad_(False)
    model.eval()
    return model


# -- measurement ---------------------------------------------------------------------------------

def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def timed_pass(model: nn.Module, batches: Sequence[dict]) -> tuple[float, torch.Tensor]:
    """(seconds, logits) of one pass over pre-collated ``batches`` (no hooks, no grad)."""
    model.eval()
    device = next(model.parameters()).device
    logits = []
    start = time.perf_counter()
    for batch in batches:
        out = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        logits.append(out.logits.float().cpu())
    return time.perf_counter() - start, torch.cat(logits)


# Run in a fresh interpreter by `peak_memory_of_export`. Linux's peak-RSS counter (VmHWM) is reset
# (writing 5 to /proc/self/clear_refs) after the imports and again after loading, so the loading's
# transient copies and the inference pass are measured apart, each over the process's own baseline.
_PEAK_MEMORY_CHILD = """
import gc, json, re, sys, time
import torch
from deft.adaptive import load_exported, model_bytes, timed_pass

def kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

torch.set_num_threads(int(sys.argv[3]))
batches = torch.load(sys.argv[2])
# Import everything loading needs before the baseline: transformers imports model code lazily.
import transformers
info = json.load(open(sys.argv[1] + "/deft_export.json"))
with torch.device("meta"):
    getattr(transformers, info["architecture"])(transformers.AutoConfig.from_pretrained(sys.argv[1]))
gc.collect()
reset_peak()
base = kib("VmRSS")
start = time.perf_counter()
model = load_exported(sys.argv[1])
loaded = time.perf_counter() - start
gc.collect()
load_peak, resident = kib("VmHWM"), kib("VmRSS")
reset_peak()
timed_pass(model, batches)
print(json.dumps({"load_seconds": loaded, "load_peak_bytes": 1024 * (load_peak - base),
                  "resident_bytes": 1024 * (resident - base), "peak_bytes": 1024 * (kib("VmHWM") - base),
                  "param_bytes": model_bytes(model)}))
"""


def peak_memory_of_export(export_dir: str | Path, batches_file: str | Path, threads: int | None = None) -> dict:
    """Memory of an export (:func:`load_exported`) in a fresh Python process, as a deployment sees it.

    Over the process's resident set before loading: ``resident_bytes`` after loading (what the
    model holds), ``peak_bytes`` the peak during one inference pass over the saved batches
    (model + activations), ``load_peak_bytes`` the peak while loading (the loader's transient
    copies). Skipped blocks are never allocated there. Needs Linux's /proc.
    """
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        raise AdaptiveError("peak-memory measurement needs Linux /proc (VmHWM reset); pass --no-peak-memory")
    cmd = [sys.executable, "-c", _PEAK_MEMORY_CHILD, str(export_dir), str(batches_file),
           str(threads or torch.get_num_threads())]
    # glibc keeps freed heap memory resident and moves its mmap threshold with the workload, which
    # made repeated measurements differ by ~15%. Serving every allocation over 64 KiB by mmap
    # returns it to the system on free, so the resident set follows live memory (repeats agree
    # within 0.2 MiB on MiniLM).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory process for {export_dir} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pct_saving(baseline: float, value: float) -> float | None:
    return (baseline - value) / baseline * 100.0 if baseline else None


DEFAULT_CURVE = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def bench_inference(run_dir: str | Path, baseline_dir: str | Path | None = None, *,
                    threshold: float = DEFAULT_SKIP_THRESHOLD, repeats: int = 5, batch_size: int = 64,
                    max_samples: int | None = None, data_dir: str | None = None,
                    curve: Sequence[float] | None = DEFAULT_CURVE, progress: bool = True,
                    peak_memory: bool = True) -> dict:
    """ADA-DEFT skipped vs the same model unskipped vs an ADA-PEFT run, side by side in one process.

    Every variant is put in its inference form (:func:`prepare_for_inference`: LoRA merged, α
    folded; QLoRA stays unmerged for all alike) and timed over the same pre-tokenised
    evaluation batches, interleaved in a rotating order so machine noise hits all alike; the
    median of ``repeats`` passes is reported (after one warm-up pass each). Memory is the
    resident bytes of parameters and buffers. The ADA-PEFT baseline goes through the same
    threshold (it normally skips nothing). ``curve``: thresholds for :func:`threshold_curve`
    on the ADA-DEFT run (None: no curve). ``peak_memory``: also export every variant and measure
    its load + one pass in a fresh process (:func:`peak_memory_of_export`); not for QLoRA, whose
    export is refused.
    """
    from .evaluation import make_loader, tokenize_glue
    from .tasks import compute_glue_metrics, get_task, load_glue, predictions_from_logits
    from .train import load_run

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    config, deft_model, tokenizer = load_run(run_dir)
    if adaptive_weights(deft_model) is None:
        raise AdaptiveError(f"{run_dir} was trained without --ada: it has no α to skip blocks by")
    task = get_task(config.task)
    if getattr(task, "kind", "glue") != "glue":
        raise AdaptiveError(f"bench-inference measures GLUE runs; {config.task!r} is a {task.kind} task")
    data = load_glue(task.name, task.dev_split, data_dir=data_dir or config.data_dir, max_samples=max_samples)
    batches = list(make_loader(tokenize_glue(data, tokenizer, config.max_length), tokenizer, batch_size))
    labels = torch.cat([b["labels"] for b in batches]).numpy()

    def metric_of(logits: torch.Tensor) -> float:
        scores = compute_glue_metrics(task.name, predictions_from_logits(task.name, logits.numpy()), labels)
        return 100.0 * scores[task.main_metric]

    payload: dict = {"run": str(run_dir), "baseline": str(baseline_dir) if baseline_dir else None,
                     "task": task.name, "split": task.dev_split, "eval_samples": len(data),
                     "metric_name": task.main_metric, "threshold": threshold, "repeats": repeats,
                     "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
                     "method": config.method, "mode": config.mode, "model": config.model}
    if curve:
        points = threshold_curve(deft_model, lambda: metric_of(timed_pass(deft_model, batches)[1]), curve)
        payload["threshold_curve"] = [asdict(p) for p in points]
        payload["largest_threshold_within_1_point"] = asdict(pick_threshold(points, 1.0))
    merge = config.method != "qlora"
    variants: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}
    variants["ada_deft_unskipped"], _, info["ada_deft_unskipped"] = prepare_for_inference(deft_model, None, merge=merge)
    _, skip_model, _ = load_run(run_dir)
    variants["ada_deft_skipped"], _, info["ada_deft_skipped"] = prepare_for_inference(skip_model, threshold, merge=merge)
    if baseline_dir is not None:
        base_config, base_model, _ = load_run(baseline_dir)
        if base_config.task != config.task or base_config.model != config.model:
            raise AdaptiveError(f"baseline {baseline_dir} is {base_config.model}/{base_config.task}, "
                                f"not {config.model}/{config.task}")
        if adaptive_weights(base_model) is None:
            raise AdaptiveError(f"baseline {baseline_dir} was trained without --ada: an ADA-PEFT run is expected")
        variants["ada_peft"], _, info["ada_peft"] = prepare_for_inference(
            base_model, threshold, merge=base_config.method != "qlora")
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    logits: dict[str, torch.Tensor] = {}
    for name in names:  # warm-up (first-call allocations, lazy inits)
        logits[name] = timed_pass(variants[name], batches)[1]
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seconds, logits[name] = timed_pass(variants[name], batches)
            times[name].append(seconds)
        if progress:
            print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    results = {}
    for name in names:
        model = variants[name]
        results[name] = {
            "median_seconds": statistics.median(times[name]), "all_seconds": times[name],
            "param_bytes": model_bytes(model), "parameters": sum(p.numel() for p in model.parameters()),
            "blocks_skipped": len(info[name]["skipped"]), "skipped": info[name]["skipped"],
            "metric": metric_of(logits[name]), "alphas": info[name]["alphas"],
        }
    payload["variants"] = results
    skipped, unskipped = results["ada_deft_skipped"], results["ada_deft_unskipped"]
    reference = results.get("ada_peft")
    payload["blocks_skipped"] = skipped["blocks_skipped"]
    payload["blocks_total"] = len(find_sites(variants["ada_deft_unskipped"], "act"))
    payload["time_saving_vs_unskipped"] = _pct_saving(unskipped["median_seconds"], skipped["median_seconds"])
    payload["memory_saving_vs_unskipped"] = _pct_saving(unskipped["param_bytes"], skipped["param_bytes"])
    payload["metric_delta_vs_unskipped"] = skipped["metric"] - unskipped["metric"]
    if reference is not None:
        payload["time_saving"] = _pct_saving(reference["median_seconds"], skipped["median_seconds"])
        payload["memory_saving"] = _pct_saving(reference["param_bytes"], skipped["param_bytes"])
        payload["metric_delta"] = skipped["metric"] - reference["metric"]
    else:
        payload["time_saving"] = payload["memory_saving"] = payload["metric_delta"] = None
    payload["memory_note"] = "param_bytes = parameters + buffers resident after loading"
    if peak_memory and config.method != "qlora":
        sources = {"ada_deft_unskipped": (run_dir, None), "ada_deft_skipped": (run_dir, threshold)}
        if baseline_dir is not None:
            sources["ada_peft"] = (baseline_dir, threshold)
        with tempfile.TemporaryDirectory(prefix="deft-peak-") as tmp:
            batches_file = Path(tmp) / "batches.pt"
            torch.save([dict(b) for b in batches], batches_file)  # plain dicts: the child loads weights_only
            for name, (source, skip) in sources.items():
                export_run(source, Path(tmp) / name, skip)
                results[name]["peak_memory"] = peak_memory_of_export(Path(tmp) / name, batches_file)
                if progress:
                    print(f"peak memory {name}: {results[name]['peak_memory']['peak_bytes'] / 2**20:.1f} MiB", flush=True)
        peak = {n: results[n]["peak_memory"]["peak_bytes"] for n in sources}
        payload["peak_memory_saving_vs_unskipped"] = _pct_saving(peak["ada_deft_unskipped"], peak["ada_deft_skipped"])
        payload["peak_memory_saving"] = _pct_saving(peak["ada_peft"], peak["ada_deft_skipped"]) \
            if "ada_peft" in peak else None
        payload["memory_note"] += ("; peak_memory = a fresh process loading the exported model (`deft export`, "
                                   "skipped blocks never allocated) and running one pass over the same batches: "
                                   "peak resident set during the pass minus the resident set before loading "
                                   "(also resident_bytes after loading and load_peak_bytes while loading)")
    return payload

