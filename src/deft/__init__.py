"""deft — density-efficient fine-tuning of Hugging Face transformers.

Layers, each depending only on the ones before it (``tasks`` and ``io`` on ``core`` only):

* :mod:`deft.core`     — sites, real-token masks, dense-layer helpers, approximations, the density
  loss, the density metric, the capture hooks, one evaluation pass
* :mod:`deft.methods`  — PEFT methods behind one interface (lora, qlora, adapter, prefix, prompt)
* :mod:`deft.adaptive` — ADA-DEFT: α per MLP block, exact block skipping
* :mod:`deft.training` — TrainConfig (every default), the Trainer with the density term, the run
  directory, train / load_run, PEFT vs DEFT over seeds
* :mod:`deft.analysis` — the ASIC energy model and WANDA pruning, applied to runs
* :mod:`deft.deploy`   — inference form, export / load, deployment measurements
* :mod:`deft.tasks`    — task specs and data (GLUE, SQuAD) and one runner per task kind
* :mod:`deft.io`       — model aliases and loading
* :mod:`deft.cli`      — the ``deft`` command
"""

__version__ = "0.1.0"
