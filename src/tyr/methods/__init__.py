"""The two pruning methods side by side, each returning the per-block plans: `tyr` (supernet,
search, re-centre, coarse to fine) and `uniform` (the same fraction in every block).
"""

from __future__ import annotations

from tyr.methods.tyr import (
    SearchOptions,
    read_genome,
    search_prune,
)
from tyr.methods.uniform import (
    SolverOptions,
    prune_uniform,
)

__all__ = [
    "SearchOptions",
    "read_genome",
    "search_prune",
    "SolverOptions",
    "prune_uniform",
]
