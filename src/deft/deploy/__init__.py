"""What turns a trained run into something that runs: the inference form and export/load
(:mod:`~deft.deploy.export`), measurement of a deployed model (:mod:`~deft.deploy.measure`) and
the ADA-DEFT inference benchmark (:mod:`~deft.deploy.bench`), activation thresholds calibrated
for a run (:mod:`~deft.deploy.sparsify`) and the metric against deployed density
(:mod:`~deft.deploy.sweep`), and the native CPU kernels that turn zeros into speed (the sparse MLP,
:mod:`~deft.deploy.sparse_mlp`; the int8 LM head, :mod:`~deft.deploy.int8_head`; their build,
:mod:`~deft.deploy.native`)."""

from .bench import DEFAULT_CURVE, bench_inference
from .export import (EXPORT_INFO_FILE, EXPORT_VARIANT, PEFT_EXPORT_DIR, export_model, export_run, fold_alphas,
                     load_exported, prepare_for_inference, read_export_info)
from .int8_head import Int8LMHead, quantize_lm_head
from .measure import model_bytes, peak_memory_of_export, timed_pass
from .sparsify import DEFAULT_CALIBRATION_SAMPLES, choose_thresholds, collect_magnitudes, sparsify_run
from .shrink import shrink_run
from .sparse_mlp import SparseMLP, sparsify_mlps
from .sweep import DEFAULT_DENSITIES, density_sweep, plot_density_sweep

__all__ = ["DEFAULT_CURVE", "EXPORT_INFO_FILE", "EXPORT_VARIANT", "PEFT_EXPORT_DIR", "bench_inference", "export_model",
           "export_run", "fold_alphas", "load_exported", "model_bytes", "peak_memory_of_export",
           "prepare_for_inference", "read_export_info", "timed_pass", "DEFAULT_CALIBRATION_SAMPLES",
           "choose_thresholds", "collect_magnitudes", "sparsify_run", "DEFAULT_DENSITIES", "density_sweep",
           "plot_density_sweep", "SparseMLP", "sparsify_mlps", "shrink_run", "Int8LMHead", "quantize_lm_head"]
