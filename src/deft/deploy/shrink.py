"""``deft shrink``: the MLP neurons a thresholded run never uses, removed — a smaller dense model.

Thresholds (``deft sparsify`` or ``--train-density``) make activations exactly 0; a neuron that
is 0 on every real token of a calibration set (training examples of the run's task) can leave
the model: its row of the first projection (gate and up rows for gated MLPs) and its column of
the down projection (:func:`deft.core.neurons.remove_neurons`). The result is a dense model that
is smaller at every batch size on any hardware — unlike a zero-skipping kernel, which pays off
at batch 1 only. ``max_dead_share`` > 0 also removes neurons active on at most that share of
the calibration tokens; what each removed neuron contributed on average (its mean input to the
down projection × its down column) is folded into the down bias, which is exactly 0 for the
neurons that were never active. A neuron-form run trained with ``--neuron-fill mean`` holds its
removed neurons at a constant instead of 0: they are removed too, and the constant, which is
their mean, is folded exactly.

Activity is counted at the down projection's input — σ's output after thresholds (and ADA's α)
for plain MLPs, the gated product for gated ones: that is what a removed column multiplies.
LoRA is merged first; bottleneck adapters and 4-bit (QLoRA) layers are refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from ..core.batches import call_model, model_device, move_batch
from ..core.capture import ActivationCapture
from ..core.layers import unwrap_model, weight_out_in
from ..core.neurons import NeuronRemoval, apply_removal, check_removable, mlp_parameters
from ..core.sites import SiteMap, find_sites, require_dense
from ..core.thresholds import current_thresholds
from ..methods import merge_peft
from ..tasks.runners.glue import GlueRunner, without_labels
from ..training import RunDir, TrainConfig, load_run, task_runner
from .sparsify import DEFAULT_CALIBRATION_SAMPLES, evaluation_summary


def check_request(calibration_samples: int, max_dead_share: float) -> None:
    """One-line errors for what ``deft shrink`` cannot do, before anything is loaded."""
    if calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {calibration_samples}")
    if not 0 <= max_dead_share < 1:
        raise ValueError(f"--max-dead-share is a share of calibration tokens in [0, 1), got {max_dead_share}")


class NeuronActivity:
    """Per site and neuron: real tokens it is non-zero on and the sum of its value; a meter fed
    by :class:`~deft.core.capture.ActivationCapture`."""

    def __init__(self, widths: list[int]):
        self.nonzero = [torch.zeros(w, dtype=torch.long) for w in widths]
        self.sums = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.tokens = [0] * len(widths)

    @torch.no_grad()
    def update(self, index: int, act: torch.Tensor, mask: torch.Tensor) -> None:
        values = act[mask]  # (real tokens, width)
        self.nonzero[index] += values.ne(0).sum(0).cpu()
        self.sums[index] += values.double().sum(0).cpu()
        self.tokens[index] += values.shape[0]

    def end_sequences(self) -> None:  # the capture's meter protocol; nothing per sequence here
        pass


def down_input_sites(model: nn.Module) -> SiteMap:
    """The "act" site table with every site hooked at its down projection's input."""
    sites = find_sites(model, "act")
    for site in sites:
        require_dense(site, "removing neurons")
    return SiteMap(tuple(replace(s, module=s.down, point="product") for s in sites), sites.family, sites.model_type,
                   "product")


@torch.no_grad()
def measure_activity(model: nn.Module, batches: Iterable) -> NeuronActivity:
    """:class:`NeuronActivity` of ``model`` (eval mode) over ``batches`` (model keyword inputs)."""
    sites = down_input_sites(model)
    activity = NeuronActivity([s.width for s in sites])
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with ActivationCapture(model, sites, meter=activity):
            for batch in batches:
                call_model(model, move_batch(batch, device))
    finally:
        model.train(was_training)
    return activity


def filled_neurons(model: nn.Module) -> dict[str, torch.Tensor]:
    """Site path → bool vector of the neurons the run holds at a constant fill (outside its neuron
    mask, ``--neuron-fill mean``): constant on every token, so removable with the constant folded."""
    current = current_thresholds(model)
    if current is None or not current.fill:
        return {}
    widths = {s.module: s.width for s in find_sites(model, "act")}
    out = {}
    for path in current.fill:
        outside = torch.ones(widths[path], dtype=torch.bool)
        outside[torch.as_tensor(current.neurons[path], dtype=torch.long)] = False
        out[path] = outside
    return out


@torch.no_grad()
def plan_removal(model: nn.Module, activity: NeuronActivity, max_dead_share: float = 0.0) -> NeuronRemoval:
    """Which neurons go (active on at most ``max_dead_share`` of the calibration tokens, or held at
    a constant fill) and the mean contribution of those that go, W_down[:, removed] ·
    mean(a[removed]), per block."""
    base = unwrap_model(model)
    filled = filled_neurons(model)
    kept, widths, deltas = {}, {}, {}
    for index, site in enumerate(find_sites(model, "act")):
        tokens = activity.tokens[index]
        if not tokens:
            continue
        active_share = activity.nonzero[index].double() / tokens
        goes = active_share <= max_dead_share
        if site.module in filled:
            goes = goes | filled[site.module]
        removed = goes.nonzero().reshape(-1)
        if not removed.numel():
            continue
        kept[site.module] = (~goes).nonzero().reshape(-1)
        widths[site.module] = site.width
        mean = activity.sums[index][removed] / tokens  # exactly 0 for neurons never active, the fill for filled ones
        if bool(mean.ne(0).any()):
            down = weight_out_in(base.get_submodule(site.down))
            deltas[site.module] = (down.index_select(1, removed.to(down.device)).double().cpu() @ mean).to(down.dtype)
    return NeuronRemoval(kept=kept, widths=widths, bias_delta=deltas)


def layer_report(model: nn.Module, removal: NeuronRemoval, activity: NeuronActivity) -> list[dict]:
    """Per block: width before and after, neurons removed, whether its down bias changed."""
    rows = []
    for index, site in enumerate(find_sites(model, "act")):
        after = int(removal.kept[site.module].numel()) if site.module in removal.kept else site.width
        rows.append({"site": site.module, "stack": site.stack, "layer": site.layer, "width_before": site.width,
                     "width_after": after, "removed": site.width - after,
                     "removed_share": (site.width - after) / site.width if site.width else 0.0,
                     "calibration_tokens": activity.tokens[index], "bias_folded": site.module in removal.bias_delta})
    return rows


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shrink_run(run: str, output: str, *, calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
               max_dead_share: float = 0.0, calibration_batch_size: int = 32, max_samples: int | None = None,
               batch_size: int | None = None, data_dir: str | None = None, progress: bool = True) -> dict:
    """``deft shrink``: remove the MLP neurons of a thresholded ``run`` that its calibration set
    never activates, evaluate before and after, and write the shrunk run to ``output`` (every
    part of ``run`` plus ``shrink.json`` / ``shrink.safetensors``); returns the summary."""
    check_request(calibration_samples, max_dead_share)
    source = RunDir(run).check()
    if not (source / RunDir.THRESHOLDS).is_file():
        raise ValueError(f"{run} has no activation thresholds ({RunDir.THRESHOLDS}), so no neuron is exactly 0: "
                         "run `deft sparsify` first (or train with --train-density)")
    if (source / RunDir.SHRINK).is_file():
        raise ValueError(f"{run} is already shrunk ({RunDir.SHRINK}): shrink its source run instead")
    out = RunDir(output)
    if out.path.resolve() == source.path.resolve():
        raise ValueError(f"--output {output} is the source run itself: choose a new directory")
    config = TrainConfig.from_dict(source.read_config())
    runner = task_runner(config)
    if not isinstance(runner, GlueRunner):
        raise ValueError(f"shrink calibrates on GLUE tasks so far; {config.task!r} is a {runner.task.kind} task")

    config, model, tokenizer = load_run(source)
    model = merge_peft(model)
    check_removable(model)  # adapters, 4-bit layers: refused before any evaluation
    options = dict(max_samples=max_samples, batch_size=batch_size, data_dir=data_dir, progress=progress)
    # before: the thresholded run merged as the shrunk model is, so before/after differ by the removal only
    before = evaluation_summary(runner, model, tokenizer, **options)
    params_before, mlp_before = _parameters(model), mlp_parameters(model)
    _, loader = runner.loader(tokenizer, "train", max_samples=calibration_samples, batch_size=calibration_batch_size,
                              data_dir=data_dir)
    activity = measure_activity(model, without_labels(loader))
    removal = plan_removal(model, activity, max_dead_share)
    layers = layer_report(model, removal, activity)
    apply_removal(model, removal)
    after = evaluation_summary(runner, model, tokenizer, **options)
    mlp_after = mlp_parameters(model)
    width_before = sum(r["width_before"] for r in layers)
    width_after = sum(r["width_after"] for r in layers)
    summary = {
        "source_run": str(run), "task": config.task, "main_metric": runner.task.main_metric,
        "calibration": {"samples": calibration_samples, "tokens": max(activity.tokens, default=0),
                        "max_dead_share": max_dead_share},
        "neurons_before": width_before, "neurons_after": width_after,
        "neurons_removed_share": 1 - width_after / width_before if width_before else 0.0,
        "blocks_removed": sum(r["width_after"] == 0 for r in layers),
        "mlp_params_before": mlp_before, "mlp_params_after": mlp_after,
        "mlp_params_removed_share": 1 - mlp_after / mlp_before if mlp_before else 0.0,
        "params_before": params_before, "params_after": _parameters(model),
        "layers": layers,
        # after: density over the neurons left (the removed ones were (nearly) always 0, so it rises)
        "before": before, "after": after,
    }
    source.derive(output)
    removal.save(out.path, summary=summary)
    return summary
