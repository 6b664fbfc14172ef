"""Turn what a user passes as ``model`` into a Hugging Face directory.

A directory is used as it is; a ``.gguf`` file or a built-in name (``"smollm2-135m"``) goes through the
GGUF importer, which converts once into a cache.
"""

from __future__ import annotations

import os


def resolve_model(model: str) -> str:
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r}: expected a model directory, a .gguf file or a built-in name")
    if os.path.isdir(model):
        return model
    try:
        from nanovllm.gguf_import import resolve_model as resolve_gguf
    except ImportError:  # the gguf package is an optional extra
        if model.endswith(".gguf"):
            raise ImportError("loading a .gguf file needs the gguf package: pip install 'nanovllm[gguf]'") from None
        raise FileNotFoundError(f"model {model!r} is not a directory") from None
    return resolve_gguf(model)
