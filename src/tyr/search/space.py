"""The search space: one integer level per sub-layer, keyed by (block, kind) (docs/algorithm.md §5, §7.1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tyr.budget import KINDS, Gene

__all__ = ["Space", "Genome"]

Genome = tuple[int, ...]


@dataclass(frozen=True)
class Space:
    """Genes with their level bounds; a genome is valid when Σ k = 0 within each kind and the
    optional `guard` (the GQA real-parameter budget, §3.5) accepts it. `joint`: the kinds share
    one budget, which the guard alone keeps; a mutation may move a level between kinds."""

    genes: tuple[Gene, ...]
    low: tuple[int, ...]
    high: tuple[int, ...]
    guard: Callable[[Genome], bool] | None = None
    joint: bool = False

    def __post_init__(self) -> None:
        if not len(self.genes) == len(self.low) == len(self.high):
            raise ValueError("genes, low and high must have the same length")
        if any(lo > 0 or hi < 0 for lo, hi in zip(self.low, self.high, strict=True)):
            raise ValueError("every gene's range must contain level 0")
        if self.joint and self.guard is None:
            raise ValueError("a joint budget needs a guard that keeps it")

    @property
    def zero(self) -> Genome:
        return (0,) * len(self.genes)

    def of_kind(self, kind: str) -> list[int]:
        return [i for i, g in enumerate(self.genes) if g.kind == kind]

    def valid(self, genome: Sequence[int]) -> bool:
        if len(genome) != len(self.genes):
            return False
        if any(not lo <= k <= hi for k, lo, hi in zip(genome, self.low, self.high, strict=True)):
            return False
        if not self.joint and any(sum(genome[i] for i in self.of_kind(kind)) != 0 for kind in KINDS):
            return False
        return self.guard is None or self.guard(tuple(genome))
