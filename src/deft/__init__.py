"""deft — density-efficient fine-tuning of Hugging Face transformers.

The pieces, one module per concept:

* :mod:`deft.sites`   — where each model family's MLP activations live (a table + generic discovery)
* :mod:`deft.capture` — mask-aware forward hooks that feed the loss and the metric
* :mod:`deft.approx`  — differentiable stand-ins for the indicator 1[a != 0]
* :mod:`deft.loss`    — the density loss (paper eq. 6)
* :mod:`deft.metrics` — streamed activation density and density change (eq. 10)
* :mod:`deft.models`  — model aliases and loading (hub or local, offline-friendly)
* :mod:`deft.tasks`   — datasets and task metrics
"""

__version__ = "0.1.0"
