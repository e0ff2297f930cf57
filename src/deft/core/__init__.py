"""The method's concepts, independent of training and deployment: where the MLP activations are
(:mod:`~deft.core.sites`), which positions are real tokens (:mod:`~deft.core.masks`), dense-layer
helpers (:mod:`~deft.core.layers`), the indicator approximations (:mod:`~deft.core.approx`), the
density loss (:mod:`~deft.core.loss`), the density metric (:mod:`~deft.core.metrics`), the hooks
that feed both (:mod:`~deft.core.capture`) and one evaluation pass (:mod:`~deft.core.evaluation`)."""
