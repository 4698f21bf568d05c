"""The calls that differ between transformers versions, each isolated here with the version it
works around (supported: transformers >= 5.14, < 6; checked here on 5.24.0)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import Tensor

__all__ = ["cache_kwarg", "layer_output"]


@functools.cache
def cache_kwarg(cls: Any) -> str:
    """The forward's keyword for the KV cache: `cache` in transformers 5.24 (the version checked
    here), `past_key_values` in earlier releases; read from the signature of `cls.forward`."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def layer_output(out: Tensor | tuple[Any, ...]) -> Tensor:
    """A decoder layer's hidden states: transformers 5.24 returns the tensor; releases whose
    layers return a tuple put it first."""
    return out[0] if isinstance(out, tuple) else out
