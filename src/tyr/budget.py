"""The budget: how a target sparsity becomes units removed per sub-layer (docs/algorithm.md §2,
§3.5, §5.1, §5.2, §8).

This module is the one home of that rule. The supernet, the search, `--method uniform`,
`--genome` and `tyr plan` all ask it, so they cannot drift apart. It is pure integer and
rational arithmetic on a model's :class:`Shape`; it imports neither torch nor anything else of
tyr.

Units: an FFN unit is one intermediate neuron. An attention level counts *nominal* units of
u_A = P_A(n_q, n_kv) / n_q real parameters (a query head's average share; exactly one head
under MHA). A candidate then removes the query heads whose *real* removal is nearest the
nominal target (§3.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "KINDS",
    "Shape",
    "Gene",
    "HeadLayout",
    "SubLayer",
    "Allocation",
    "round_half_up",
    "spread",
    "layout",
    "attn_removed",
    "mlp_removed",
    "attn_unit",
    "attn_target",
    "type_totals",
    "initial_centres",
    "ffn_step_floor",
    "step_units",
    "steps",
    "level_range",
    "sublayers",
    "recentre",
    "units_of_iteration",
    "candidate_units",
    "allocate",
    "uniform_attn_target",
]

KINDS = ("attn", "mlp")
DELTA_1 = Fraction(1, 8)  # Δ_1 = 12.5 % of a sub-layer's units per level step (§5.2)
ATTN_STEP_FLOOR = 1  # one (nominal) head: heads are indivisible


@dataclass(frozen=True)
class Shape:
    """The dimensions that pruning reasons about (head_dim from the config, never d/n_q)."""

    hidden: int
    n_layers: int
    n_q: int
    n_kv: int
    head_dim: int
    intermediate: int
    q_bias: bool
    kv_bias: bool
    o_bias: bool
    mlp_bias: bool  # gate/up biases
    down_bias: bool

    @property
    def group(self) -> int:
        return self.n_q // self.n_kv

    def attn_params(self, q: int, v: int) -> int:
        """Real parameters of an attention sub-layer keeping q query and v KV heads (§3.2);
        with q = 0 only the o_proj bias remains (the removed sub-layer outputs that constant)."""
        d, dh = self.hidden, self.head_dim
        return d * dh * (2 * q + 2 * v) + dh * (q * self.q_bias + 2 * v * self.kv_bias) + d * self.o_bias

    def mlp_params(self, f: int) -> int:
        """Real parameters of an FFN sub-layer keeping f neurons (f = 0: the down_proj bias)."""
        d = self.hidden
        return 3 * d * f + 2 * f * self.mlp_bias + d * self.down_bias

    def units(self, kind: str) -> int:
        """n: the units of one sub-layer of `kind` (query heads or neurons)."""
        return self.n_q if kind == "attn" else self.intermediate


@dataclass(frozen=True, order=True)
class Gene:
    """One sub-layer: attention or FFN of a block (an explicit type tag, never a module name)."""

    block: int
    kind: str


def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def spread(total: int, n: int) -> list[int]:
    """Split an integer total over n slots as evenly as possible: ⌊(b+1)U/n⌋ − ⌊bU/n⌋ (§2.4)."""
    return [(b + 1) * total // n - b * total // n for b in range(n)]


# ---------------------------------------------------------------------------------------------
# Heads and real parameters.


@dataclass(frozen=True)
class HeadLayout:
    """Which heads a pruned attention sub-layer keeps (§2.5)."""

    kept_q: tuple[int, ...]  # ascending original query-head indices
    kept_kv: tuple[int, ...]  # ascending original KV-head indices
    q_to_kv: tuple[int, ...]  # for each kept query head, its index into kept_kv


def layout(kept_q: Sequence[int], n_q: int, n_kv: int) -> HeadLayout:
    """Query head h reads KV head h // g (g = n_q / n_kv); a KV head survives iff one of its
    query heads does (§3.1)."""
    g = n_q // n_kv
    kept_q = tuple(sorted(int(h) for h in kept_q))
    kept_kv = tuple(sorted({h // g for h in kept_q}))
    pos = {kv: i for i, kv in enumerate(kept_kv)}
    return HeadLayout(kept_q, kept_kv, tuple(pos[h // g] for h in kept_q))


def attn_removed(shape: Shape, kept_q: Sequence[int]) -> int:
    """Real parameters removed from one attention sub-layer when it keeps these query heads."""
    lay = layout(kept_q, shape.n_q, shape.n_kv)
    return shape.attn_params(shape.n_q, shape.n_kv) - shape.attn_params(len(lay.kept_q), len(lay.kept_kv))


def mlp_removed(shape: Shape, kept: int) -> int:
    """Real parameters removed from one FFN sub-layer when it keeps `kept` neurons."""
    return shape.mlp_params(shape.intermediate) - shape.mlp_params(kept)


def attn_unit(shape: Shape) -> Fraction:
    """u_A: real parameters of one nominal attention unit, P_A(n_q, n_kv) / n_q (§3.5)."""
    return Fraction(shape.attn_params(shape.n_q, shape.n_kv), shape.n_q)


def attn_target(shape: Shape, units: int) -> int:
    """The real-parameter removal that `units` nominal attention units ask for."""
    return round(units * attn_unit(shape))


# ---------------------------------------------------------------------------------------------
# Per-type totals and the starting point of the search.


def type_totals(shape: Shape, sparsity: float) -> dict[str, int]:
    """U per kind: round_half_up(S·n·L) units removed over all blocks, in exact rationals (§2.4)."""
    S, L = Fraction(str(sparsity)), shape.n_layers
    return {kind: round_half_up(S * shape.units(kind) * L) for kind in KINDS}


def initial_centres(shape: Shape, sparsity: float) -> dict[str, list[int]]:
    """Units removed per block at the start of iteration 1: each kind's U spread evenly."""
    return {kind: spread(total, shape.n_layers) for kind, total in type_totals(shape, sparsity).items()}


# ---------------------------------------------------------------------------------------------
# Levels: steps, floors, ranges, re-centring.


def ffn_step_floor(d_ff: int) -> int:
    """min(32, ⌈d_ff/64⌉): the reference's 32 on large models, the 1.5625 % grid on small ones."""
    return min(32, -(-d_ff // 64))


def step_units(n: int, iteration: int, floor: int, delta1: Fraction = DELTA_1) -> int:
    """u_t = max(f, round_half_up(n·Δ_t)) with Δ_t = Δ_1 / 2^(t−1), t = 1, 2, … (§5.2)."""
    return max(floor, round_half_up(n * delta1 / 2 ** (iteration - 1)))


def steps(shape: Shape, iteration: int) -> dict[str, int]:
    """Each kind's level step in iteration `iteration` (nominal units for attention)."""
    return {
        "attn": step_units(shape.n_q, iteration, ATTN_STEP_FLOOR),
        "mlp": step_units(shape.intermediate, iteration, ffn_step_floor(shape.intermediate)),
    }


def level_range(centre: int, step: int, n: int, half: int = 4) -> tuple[int, int]:
    """Levels k with 0 ≤ centre + k·step ≤ n, |k| ≤ half (§5.1)."""
    return -min(centre // step, half), min((n - centre) // step, half)


@dataclass(frozen=True)
class SubLayer:
    """One gene's candidates: level k removes centre + k·step (nominal) units of n."""

    gene: Gene
    n: int
    centre: int
    step: int
    low: int
    high: int

    def units(self, level: int) -> int:
        return self.centre + level * self.step

    @property
    def levels(self) -> range:
        return range(self.low, self.high + 1)


def sublayers(
    shape: Shape, centres: dict[Gene, int], step: dict[str, int], half: int
) -> dict[Gene, SubLayer]:
    """Every gene's levels around its centre: |k| ≤ half, 0 ≤ units ≤ n."""
    out = {}
    for gene, c in centres.items():
        n = shape.units(gene.kind)
        lo, hi = level_range(c, step[gene.kind], n, half)
        out[gene] = SubLayer(gene, n, c, step[gene.kind], lo, hi)
    return out


def recentre(
    centres: dict[Gene, int], genes: Sequence[Gene], genome: Sequence[int], step: dict[str, int]
) -> dict[Gene, int]:
    """r_ℓ ← r_ℓ + k*_ℓ·u_t: the next iteration's centres from this one's best genome (§8)."""
    return {g: centres[g] + k * step[g.kind] for g, k in zip(genes, genome, strict=True)}


def units_of_iteration(
    centres: Sequence[int], genome: Sequence[int], step_attn: int, step_mlp: int
) -> dict[str, list[int]]:
    """Units removed per block that one logged iteration chose (genes interleaved attn, mlp)."""
    step = {"attn": step_attn, "mlp": step_mlp}
    counts = [c + k * step[KINDS[i % 2]] for i, (c, k) in enumerate(zip(centres, genome, strict=True))]
    return {"attn": counts[0::2], "mlp": counts[1::2]}


def candidate_units(
    shape: Shape, sparsity: float, iteration: int, levels: int
) -> list[tuple[str, list[int]]]:
    """For every sub-layer, (kind, units removed at each level) in iteration `iteration`,
    centred on the initial centres (later iterations re-centre on the search's result, unknown
    in advance). Kinds in turn: every block's attention, then every block's FFN."""
    start = initial_centres(shape, sparsity)
    step = steps(shape, iteration)
    out: list[tuple[str, list[int]]] = []
    for kind in KINDS:
        centres = {Gene(b, kind): c for b, c in enumerate(start[kind])}
        for sub in sublayers(shape, centres, step, levels // 2).values():
            out.append((kind, [sub.units(k) for k in sub.levels]))
    return out


# ---------------------------------------------------------------------------------------------
# `--method uniform`: the same fraction in every block.


@dataclass(frozen=True)
class Allocation:
    """Per-type removal targets: real attention parameters in total, neurons per block."""

    attn_params: int  # U_A in real parameters, corrected block by block
    mlp_neurons: list[int]  # r_b per block, summing to U_F = round_half_up(S·d_ff·L)


def allocate(shape: Shape, sparsity: float) -> Allocation:
    """The same fraction for every block, counted in real parameters (§2.4, §3.5)."""
    S = Fraction(str(sparsity))
    attn_total = shape.n_layers * shape.attn_params(shape.n_q, shape.n_kv)
    return Allocation(round_half_up(S * attn_total), initial_centres(shape, sparsity)["mlp"])


def uniform_attn_target(left: int, blocks_left: int) -> int:
    """Block b's attention target: the real parameters still to remove, spread evenly over the
    blocks still to prune, so that the realised total is corrected block by block."""
    return round(left / blocks_left)
