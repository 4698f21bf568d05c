"""The search space: one integer level per sub-layer, keyed by (block, kind) (ALGORITHM.md §5, §7.1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["KINDS", "Gene", "Space", "Genome", "step_units", "level_range", "ffn_step_floor"]

KINDS = ("attn", "mlp")
Genome = tuple[int, ...]


@dataclass(frozen=True, order=True)
class Gene:
    """One sub-layer: attention or FFN of a block (an explicit type tag, never a module name)."""

    block: int
    kind: str


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def ffn_step_floor(d_ff: int) -> int:
    """min(32, ⌈d_ff/64⌉): the reference's 32 on large models, the 1.5625 % grid on small ones."""
    return min(32, -(-d_ff // 64))


def step_units(n: int, iteration: int, floor: int, delta1: Fraction = Fraction(1, 8)) -> int:
    """u_t = max(f, round_half_up(n·Δ_t)) with Δ_t = Δ_1 / 2^(t−1), t = 1, 2, … (§5.2)."""
    return max(floor, _round_half_up(n * delta1 / 2 ** (iteration - 1)))


def level_range(centre: int, step: int, n: int, half: int = 4) -> tuple[int, int]:
    """Levels k with 0 ≤ centre + k·step ≤ n, |k| ≤ half (§5.1)."""
    return -min(centre // step, half), min((n - centre) // step, half)


@dataclass(frozen=True)
class Space:
    """Genes with their level bounds; a genome is valid when Σ k = 0 within each kind and the
    optional `guard` (the GQA real-parameter budget, §3.5) accepts it."""

    genes: tuple[Gene, ...]
    low: tuple[int, ...]
    high: tuple[int, ...]
    guard: Callable[[Genome], bool] | None = None

    def __post_init__(self) -> None:
        if not len(self.genes) == len(self.low) == len(self.high):
            raise ValueError("genes, low and high must have the same length")
        if any(lo > 0 or hi < 0 for lo, hi in zip(self.low, self.high, strict=True)):
            raise ValueError("every gene's range must contain level 0")

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
        if any(sum(genome[i] for i in self.of_kind(kind)) != 0 for kind in KINDS):
            return False
        return self.guard is None or self.guard(tuple(genome))
