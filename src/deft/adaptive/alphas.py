"""ADA-DEFT's α: one learned scalar α_l per MLP block (METHOD.md §4).

Every MLP block l gets a trainable scalar α_l (per stack), initialised 0.80 + N(0, 0.05²), that
scales the block's activation where it enters the dropout, ``A_l ← α_l · σ(·)``. The density loss
is taken on the scaled activation, so it pulls α_l toward 0 wherever the task allows (ADA-DEFT);
without the density loss the same α_l is ADA-PEFT. Blocks with small |α| are then removed
(:mod:`deft.adaptive.skipping`); export folds α into the weights (:mod:`deft.deploy.export`).

How α is put in — generically, from the site table of :mod:`deft.core.sites`, so every family
and every PEFT method of :mod:`deft.methods` is covered by the same code: the activation module
at ``site.module`` is replaced *at the same path* by :class:`ScaledActivation` (``α · inner(x)``).
Capture hooks on that path therefore see α·σ, which is what the density loss must see; site
discovery still finds the same path (family rules match the path; the generic fallback
recognises :class:`~deft.core.layers.ActivationWrapper`). For gated MLPs α scales σ's output
and hence the gated product. peft freezes every non-adapter parameter when it wraps a model,
so α is added *after* the method and marked trainable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.layers import module_device, set_module, unwrap_model
from ..core.sites import ActivationSite, SiteMap, find_sites
from .modules import ScaledActivation, SkippedActivation

ADAPTIVE_DIR = "adaptive"  # inside a run directory (and inside Trainer checkpoints)
WEIGHTS_FILE = "adaptive.safetensors"
INFO_FILE = "adaptive.json"
PLOT_FILE = "alphas.png"


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


def sites_at_act(model: nn.Module, sites: SiteMap | Sequence[ActivationSite] | None) -> tuple[ActivationSite, ...]:
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


def adaptive_weights(model: nn.Module) -> AdaptiveWeights | None:
    """The α handle of ``model``; None for a model without α."""
    base = unwrap_model(model)
    try:
        sites = find_sites(model, "act").sites
    except ValueError:
        return None
    with_alpha = [s for s in sites if isinstance(base.get_submodule(s.module), ScaledActivation) or
                  getattr(base.get_submodule(s.module), "alpha", None) is not None]
    return AdaptiveWeights(model, with_alpha) if with_alpha else None


# -- α ------------------------------------------------------------------------------------------

class AdaptiveWeights:
    """Handle on the α of one model: read, set, save, restore, report.

    A view: everything is read from the model's :class:`ScaledActivation` /
    :class:`SkippedActivation` modules, so the handle never goes stale (merging LoRA, skipping
    blocks). ``sites`` are the blocks with α, at σ's output, in forward order (encoder, then
    decoder); α is keyed by ``site.module`` (the path of the activation in the unwrapped model).
    """

    def __init__(self, model: nn.Module, sites: Sequence[ActivationSite]):
        self.model = model
        self.sites = tuple(sites)

    def _wrappers(self) -> dict[str, nn.Module]:
        base = unwrap_model(self.model)
        return {s.module: base.get_submodule(s.module) for s in self.sites}

    @property
    def config(self) -> AdaptiveConfig:
        return next((m.config for m in self.modules().values() if m.config is not None), AdaptiveConfig())

    @property
    def initial(self) -> dict[str, float]:
        return {path: m.initial for path, m in self._wrappers().items() if getattr(m, "initial", None) is not None}

    @property
    def skipped(self) -> dict[str, float]:
        """α of the blocks already removed (their last value)."""
        return {path: m.alpha for path, m in self._wrappers().items()
                if isinstance(m, SkippedActivation) and m.alpha is not None}

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
            wrappers = self._wrappers()
            for site, value in zip(self.sites, initial):
                wrappers[site.module].initial = value
        skipped = self.skipped
        self.set_alphas({k: v for k, v in state.items() if k not in skipped})
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
    if any(isinstance(m, ScaledActivation) for m in base.modules()):
        raise AdaptiveError("the model already has ADA weights (apply_adaptive was called twice)")
    act_sites = sites_at_act(model, sites)
    if not act_sites:
        raise AdaptiveError("no MLP activation site to put an ADA weight on")
    values = initial_alphas(len(act_sites), config)
    for site, value in zip(act_sites, values.tolist()):
        inner = base.get_submodule(site.module)
        if isinstance(inner, SkippedActivation):
            raise AdaptiveError(f"block {site.module} is already skipped; apply ADA weights before skipping")
        first = base.get_submodule(site.first) if site.first else None
        wrapper = ScaledActivation(inner, value, config.lr_scale, device=module_device(first, inner),
                                   initial=value, config=config)
        set_module(base, site.module, wrapper)
    return AdaptiveWeights(model, act_sites).requires_grad_(True)


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
