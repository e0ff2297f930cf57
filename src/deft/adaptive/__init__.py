"""ADA-DEFT: one learned weight α per MLP block (:mod:`~deft.adaptive.alphas`), the modules that
carry it (:mod:`~deft.adaptive.modules`), and exact removal of the blocks it switches off
(:mod:`~deft.adaptive.skipping`). Export of the result is :mod:`deft.deploy`."""

from .alphas import (ADAPTIVE_DIR, INFO_FILE, PLOT_FILE, WEIGHTS_FILE, AdaptiveConfig, AdaptiveError, AdaptiveWeights,
                     adaptive_weights, apply_adaptive, checkpoint_callback, frozen_alphas, initial_alphas,
                     load_adaptive, plot_alphas, sites_at_act)
from .modules import ConstantProjection, ScaledActivation, SkippedActivation, ZeroProjection
from .skipping import (DEFAULT_SKIP_THRESHOLD, ThresholdPoint, pick_threshold, skip_blocks, skip_sites, skipped_sites,
                       threshold_curve)

__all__ = ["ADAPTIVE_DIR", "INFO_FILE", "PLOT_FILE", "WEIGHTS_FILE", "AdaptiveConfig", "AdaptiveError",
           "AdaptiveWeights", "adaptive_weights", "apply_adaptive", "checkpoint_callback", "frozen_alphas",
           "initial_alphas", "load_adaptive", "plot_alphas", "sites_at_act", "ConstantProjection",
           "ScaledActivation", "SkippedActivation", "ZeroProjection", "DEFAULT_SKIP_THRESHOLD", "ThresholdPoint",
           "pick_threshold", "skip_blocks", "skip_sites", "skipped_sites", "threshold_curve"]
