"""Layer streaming: block-0 inputs captured with every argument, blocks run one at a time,
activations offloaded, Gram matrices accumulated by hooks, and lazily read block weights.
"""

from __future__ import annotations

from tyr.stream import lazy
from tyr.stream.blocks import (
    ActivationStore,
    BlockInputs,
    Prefix,
    StopForward,
    capture,
    final_hidden,
    forward_block,
    on_device,
    run_blocks,
    to_device,
)
from tyr.stream.lazy import LazyModel, editing, resident
from tyr.stream.stats import (
    Gram,
    collect_gram,
    intermediate_placement,
    propagate_mlp,
)

__all__ = [
    "ActivationStore",
    "BlockInputs",
    "capture",
    "forward_block",
    "run_blocks",
    "final_hidden",
    "Prefix",
    "StopForward",
    "to_device",
    "on_device",
    "Gram",
    "collect_gram",
    "intermediate_placement",
    "propagate_mlp",
    "LazyModel",
    "editing",
    "resident",
    "lazy",
]
