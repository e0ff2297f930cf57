"""What turns a trained run into a model that runs on its own: merge, fold, skip, write, load.

* **inference form** (:func:`prepare_for_inference`) — blocks under the skip threshold removed
  (:mod:`deft.adaptive.skipping`), LoRA merged (``merge_and_unload``), α folded into the down
  projection (``down(α·z) = (α·W) z + b``, also for gated MLPs).
* **export** (:func:`export_model`, ``deft export``) — an export without skipped blocks and
  without adapters is a plain transformers directory. Skipped blocks or bottleneck adapters
  change the module structure; such exports store their weights under the ``deft`` variant
  (``model.deft.safetensors``), which plain ``from_pretrained`` refuses, and load with
  :func:`load_exported`, which builds the reduced structure *before* loading, so the skipped
  weights are never allocated. Prefix / prompt tuning cannot be merged into weights: their
  virtual tokens are exported as a peft directory (``peft/``) on top of the exported base.
  QLoRA export is refused (merging into NF4 weights re-quantises them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..adaptive import (DEFAULT_SKIP_THRESHOLD, AdaptiveError, ConstantProjection, ScaledActivation, SkippedActivation,
                        ZeroProjection, adaptive_weights, skip_blocks, skipped_sites)
from ..core.layers import float_dtype, out_features, set_module, unwrap_model
from ..core.sites import ActivationSite, find_sites
from ..core.thresholds import (Thresholds, applied_thresholds, apply_thresholds, current_thresholds,
                              thresholded_modules)
from ..methods import BottleneckAdapter, applied_method, config_to_dict
from ..training import RunDir, load_run

EXPORT_INFO_FILE = "deft_export.json"
EXPORT_VARIANT = "deft"  # weights of structurally reduced exports: model.deft.safetensors
PEFT_EXPORT_DIR = "peft"


def _fold_alpha(base: nn.Module, site: ActivationSite, alpha: float) -> None:
    """α into the down projection's weight: down(α·z) = (α·W) z + b (for gated MLPs too; for
    routed experts into every expert's 3-D down weight)."""
    if site.routed:
        weight = getattr(base.get_submodule(site.routed), "down_proj", None)
        if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
            raise AdaptiveError(f"cannot fold α into the experts of {site.routed}: their down weights are not float")
        with torch.no_grad():
            weight.mul_(alpha)
        return
    down = base.get_submodule(site.down)
    target = down.base_layer if isinstance(down, BottleneckAdapter) else down
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
            set_module(base, site.module, module.inner)
            folded[site.module] = alpha
    return folded


def _method_name(model: nn.Module) -> str | None:
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
        kept = current_thresholds(model)
        model = model.merge_and_unload()  # α and skipped blocks live in the modules: nothing to re-attach
        if kept is not None and kept.point == "product":  # hooks on a merged LoRA layer went with it
            apply_thresholds(model, kept)
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
            set_module(base, name, module.unload_and_optionally_merge_module(
                merge=True, safe_merge=False, adapter_names=None))


def export_model(model: nn.Module, out_dir: str | Path, threshold: float | None = DEFAULT_SKIP_THRESHOLD, *,
                 tokenizer=None, extra: dict | None = None) -> dict:
    """Write ``model`` (as built by a method's ``apply``/``load``, with or without α) as a
    standalone directory (see the module doc). ``model`` is consumed: it is skipped, merged and
    folded in place. Returns the ``deft_export.json`` content."""
    record = applied_method(model)
    thresholds = {path: m.tau for path, m in thresholded_modules(model).items()}
    threshold_summary = applied_thresholds(model)
    current = current_thresholds(model)
    neuron_masks = current.neurons if current is not None else None
    neuron_fill = current.fill if current is not None else None
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
    # Thresholds hold no weights: a plain from_pretrained would drop them silently, so a thresholded
    # export is stored under the deft variant, which only load_exported (re-applying them) reads.
    structured = bool(removed) or method == "adapter" or bool(thresholds)
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
        "thresholds": {**threshold_summary, "taus": thresholds, **({"neurons": neuron_masks} if neuron_masks else {}),
                       **({"fill": neuron_fill} if neuron_fill else {})}
        if thresholds else None,
        "load_with": ("transformers" if peft_dir is None else "transformers + peft") if not structured
        else "deft.deploy.load_exported",
        "parameters": sum(p.numel() for p in unwrap_model(model).parameters()),
    }
    (out / EXPORT_INFO_FILE).write_text(json.dumps(payload, indent=2))
    return payload


def export_run(run_dir: str | Path, out_dir: str | Path, threshold: float | None = DEFAULT_SKIP_THRESHOLD) -> dict:
    """``deft export``: :func:`export_model` on a trained run (its tokenizer included)."""
    if RunDir(run_dir).check().is_shrunk:
        # load_exported rebuilds the architecture at its full MLP widths before loading weights.
        raise ValueError(f"{run_dir} is a shrunk run (deft shrink): exporting it is not supported yet; "
                         "load it with deft eval / deft.training.load_run")
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
    skipped = [ActivationSite(**s) for s in info["skipped"]]
    sites = find_sites(model, "act")
    by_path = {s.module: s for s in sites}
    for site in skipped:
        if site.module not in by_path:
            raise AdaptiveError(f"exported skipped block {site.module} is not a site of {type(model).__name__}")
        down = model.get_submodule(site.down)
        dtype = float_dtype(down)
        set_module(model, site.first, ZeroProjection(0, site.first_width, dtype))  # both halves if fused
        if site.mult and site.mult != site.first:
            set_module(model, site.mult, ZeroProjection(0, site.width, dtype))
        set_module(model, site.module, SkippedActivation(model.get_submodule(site.module)))
        set_module(model, site.down, ConstantProjection(torch.zeros(out_features(down), dtype=dtype), site.width))
    if info.get("method") == "adapter":
        cfg = info["method_config"]
        removed = {s.module for s in skipped}
        for site in sites:
            if site.module not in removed:
                set_module(model, site.down, BottleneckAdapter(model.get_submodule(site.down),
                                                                cfg["reduction_factor"], cfg["non_linearity"]))


def load_exported(directory: str | Path, sparse_mlp: bool | None = None, int8_head: bool = False) -> nn.Module:
    """Load a directory written by :func:`export_run` (``deft export``), in eval mode.

    Plain exports go through ``from_pretrained``; reduced ones through a subclass of the
    architecture whose constructor builds the reduced structure, so ``from_pretrained`` loads
    only the weights that remain. Prefix / prompt exports are wrapped with their peft modules.

    ``sparse_mlp``: swap the MLP blocks of a thresholded export for :class:`SparseMLP` (the fused
    kernel for batch-1 decoding; prefill and batches take the dense path, the same math). None
    (default): for thresholded decoder-only models, where every block is covered — otherwise the
    dense path with a one-line notice; True: required (ValueError if it cannot be done); False: never.
    ``int8_head``: the LM head as :class:`~deft.deploy.int8_head.Int8LMHead` (int8 rows for one
    decoding token, the float32 argmax kept exact; ValueError for a model without one).
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
    if info.get("thresholds"):
        th = info["thresholds"]
        apply_thresholds(model, Thresholds(taus=th["taus"], mode=th["mode"], target_density=th["target_density"],
                                           point=th["point"], neurons=th.get("neurons"), fill=th.get("fill")))
    model.requires_grad_(False)
    model.eval()
    _swap_sparse_mlps(model, info, sparse_mlp)
    if int8_head:
        from .int8_head import quantize_lm_head

        quantize_lm_head(model)
    return model


def _swap_sparse_mlps(model: nn.Module, info: dict, wanted: bool | None) -> None:
    from .sparse_mlp import sparsify_mlps

    if wanted is False:
        return
    config = getattr(unwrap_model(model), "config", None)
    decoder_only = callable(getattr(model, "can_generate", None)) and model.can_generate() and \
        not getattr(config, "is_encoder_decoder", False)
    if wanted is None and not (info.get("thresholds") and decoder_only):
        return
    if wanted and not info.get("thresholds"):
        raise ValueError("this export has no thresholds: a sparse MLP would skip only exact zeros "
                         "(deft sparsify the run, then export it)")
    try:
        sparsify_mlps(model)
    except ValueError as error:
        if wanted:
            raise
        print(f"deft: sparse MLP kernel not used, dense path instead: {error}", file=sys.stderr)
