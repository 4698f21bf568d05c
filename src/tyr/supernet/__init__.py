"""The supernet: locally pruned candidates at several levels per sub-layer, built block by
block with error accumulation, stored compactly on disk.
"""

from __future__ import annotations

from tyr.supernet.builder import (
    ACCUMULATIONS,
    Candidate,
    Store,
    SupernetOptions,
    build,
    propagation_weight,
)

__all__ = [
    "ACCUMULATIONS",
    "Candidate",
    "Store",
    "SupernetOptions",
    "build",
    "propagation_weight",
]
