"""Helpers the benchmark scripts share: interleaved timing (:mod:`lib.timing`) and reusable
training runs (:mod:`lib.runs`). Peak memory of a deployed model is the library's
(:func:`deft.deploy.peak_memory_of_export`)."""
