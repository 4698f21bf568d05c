"""Opening models: the embedded default, hub ids, Hugging Face directories and GGUF files;
weights whole or block by block; checkpoints tyr exported; a model's fingerprint.
"""

from __future__ import annotations

from tyr.loader.checkpoint import load, load_pruned_lazy
from tyr.loader.models import (
    DEFAULT_MODEL,
    Loaded,
    Opened,
    fingerprint,
    gguf_to_hf,
    load_lazy,
    load_model,
    load_weights,
    open_model,
    resolve,
    source_gguf,
)

__all__ = [
    "DEFAULT_MODEL",
    "Loaded",
    "Opened",
    "open_model",
    "resolve",
    "load_weights",
    "load_lazy",
    "load_model",
    "gguf_to_hf",
    "source_gguf",
    "fingerprint",
    "load",
    "load_pruned_lazy",
]
