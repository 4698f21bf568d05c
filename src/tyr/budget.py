"""The budget: how a target sparsity becomes units removed per sub-layer (docs/algorithm.md §2,
§3.5, §5.1, §5.2, §8).

This module is the one home of that rule. The supernet, the search, `--method uniform`,
`--genome` and `tyr plan` all ask it, so they cannot drift apart. It is pure integer and
rational arithmetic on a model's :class:`Shape`; it imports neither torch nor anything else of
tyr.

Units: an FFN unit is one intermediate neuron; FFN counts (totals, centres, steps) are whole
multiples of the shape's FFN grain (`--ffn-unit`, 1 by default; 32 keeps every FFN width a
multiple of the quantization block of GGUF's Q8_0/Q4_0). An attention unit is 2·d·d_h real parameters:
removing a query head frees one (its q_proj rows and o_proj columns), emptying a KV group frees
one more (its k_proj and v_proj rows). An attention sub-layer has n_q + n_kv units, and a kept
structure (q query heads over v KV heads) removes (n_q − q) + (n_kv − v) of them. Targets,
centres and level steps are counted in these units; a count no structure removes exactly is
realised by the nearest one that does (§3.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "KINDS",
    "GQA_MODES",
    "BUDGETS",
    "Shape",
    "Gene",
    "HeadLayout",
    "SubLayer",
    "Widths",
    "round_half_up",
    "spread",
    "layout",
    "attn_removed",
    "mlp_removed",
    "attn_target",
    "structures",
    "attn_structures",
    "allot",
    "type_totals",
    "initial_centres",
    "ffn_step_floor",
    "step_units",
    "steps",
    "level_range",
    "sublayers",
    "recentre",
    "candidate_units",
]

KINDS = ("attn", "mlp")
DELTA_1 = Fraction(1, 8)  # Δ_1 = 12.5 % of a sub-layer's units per level step (§5.2)
GQA_MODES = ("free", "uniform")  # the first is the default (§3.3, §3.4)
# The search's budget: attention and FFN each at the target (the paper), or one real-parameter
# budget that the search may trade between them (§7.2).
BUDGETS = ("per_kind", "joint")


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
    ffn_unit: int = 1  # FFN counts are multiples of this many neurons (--ffn-unit)

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
        """n: the units of one sub-layer of `kind` (attention: n_q + n_kv; FFN: neurons)."""
        return self.n_q + self.n_kv if kind == "attn" else self.intermediate

    def attn_units_removed(self, q: int, v: int) -> int:
        """Attention units removed by keeping q query heads over v KV heads."""
        return self.n_q - q + self.n_kv - v


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


def attn_target(shape: Shape, units: int) -> int:
    """The real-parameter removal that `units` attention units ask for: their share of the
    sub-layer's P_A (units·2·d·d_h exactly without biases)."""
    return round(Fraction(units * shape.attn_params(shape.n_q, shape.n_kv), shape.units("attn")))


def structures(shape: Shape, mode: str = GQA_MODES[0]) -> dict[int, list[tuple[int, int]]]:
    """Every structure (q, v) an attention sub-layer can keep, by the units it removes.

    `free` (§3.3): q query heads over any v KV groups they can fill, ⌈q/g⌉ ≤ v ≤ min(q, n_kv);
    `uniform` (§3.4): v whole groups of b heads each, q = v·b. q = 0 keeps nothing (0, 0)."""
    if mode not in GQA_MODES:
        raise ValueError(f"unknown gqa mode {mode!r}; expected one of {GQA_MODES}")
    n_kv, g = shape.n_kv, shape.group
    if mode == "free":
        pairs = [(q, v) for q in range(1, shape.n_q + 1) for v in range(-(-q // g), min(q, n_kv) + 1)]
    else:
        pairs = [(v * b, v) for v in range(1, n_kv + 1) for b in range(1, g + 1)]
    out: dict[int, list[tuple[int, int]]] = {}
    for q, v in sorted([(0, 0), *pairs], reverse=True):  # most query heads first
        out.setdefault(shape.attn_units_removed(q, v), []).append((q, v))
    return dict(sorted(out.items()))


def attn_structures(shape: Shape, units: int, mode: str = GQA_MODES[0]) -> list[tuple[int, int]]:
    """The structures that remove the feasible unit count nearest `units` (ties: fewer)."""
    table = structures(shape, mode)
    return table[min(table, key=lambda r: (abs(r - units), r))]


def allot(total: int, slots: int, feasible: Sequence[int]) -> list[int]:
    """`total` units over `slots` slots, each slot a feasible count: slot b takes the feasible
    count nearest what is left ÷ the slots left (ties: fewer), so the realised sum is corrected
    slot by slot and is exact whenever the counts allow it. Like :func:`spread`, it gives every
    slot the same count when that count is feasible and divides the total; otherwise the two may
    order the larger and smaller counts differently (§2.4)."""
    out: list[int] = []
    left = total
    for b in range(slots):
        want = Fraction(left, slots - b)
        pick = min(feasible, key=lambda r: (abs(r - want), r))
        out.append(pick)
        left -= pick
    return out


# ---------------------------------------------------------------------------------------------
# Per-type totals and the starting point of the search.


def type_totals(shape: Shape, sparsity: float) -> dict[str, int]:
    """U per kind: round_half_up(S·n·L) units removed over all blocks, in exact rationals (§2.4);
    the FFN's counted in grains of `shape.ffn_unit` neurons (returned in neurons)."""
    S, L, g = Fraction(str(sparsity)), shape.n_layers, shape.ffn_unit
    return {
        "attn": round_half_up(S * shape.units("attn") * L),
        "mlp": g * round_half_up(S * Fraction(shape.intermediate, g) * L),
    }


def initial_centres(shape: Shape, sparsity: float, mode: str = GQA_MODES[0]) -> dict[str, list[int]]:
    """Units removed per block at the start of iteration 1, and by `--method uniform`: each
    kind's U spread evenly, attention over the counts that a structure of `mode` removes, the
    FFN's in whole grains."""
    totals, L, g = type_totals(shape, sparsity), shape.n_layers, shape.ffn_unit
    return {
        "attn": allot(totals["attn"], L, list(structures(shape, mode))),
        "mlp": [g * x for x in spread(totals["mlp"] // g, L)],
    }


# ---------------------------------------------------------------------------------------------
# Levels: steps, floors, ranges, re-centring.


def ffn_step_floor(d_ff: int) -> int:
    """min(32, ⌈d_ff/64⌉): the reference's 32 on large models, the 1.5625 % grid on small ones."""
    return min(32, -(-d_ff // 64))


def step_units(n: int, iteration: int, floor: int, delta1: Fraction = DELTA_1) -> int:
    """u_t = max(f, round_half_up(n·Δ_t)) with Δ_t = Δ_1 / 2^(t−1), t = 1, 2, … (§5.2)."""
    return max(floor, round_half_up(n * delta1 / 2 ** (iteration - 1)))


def attn_grain(shape: Shape) -> int:
    """The smallest attention change: one unit (a query head) under GQA; two under MHA, where a
    query head and its KV head go together."""
    return 2 if shape.group == 1 else 1


def steps(shape: Shape, iteration: int) -> dict[str, int]:
    """Each kind's level step in iteration `iteration`, in units; an attention step is a whole
    number of grains (under MHA: the paper's steps in heads, §5.2), an FFN step a whole number
    of `shape.ffn_unit` neurons."""
    grain, g = attn_grain(shape), shape.ffn_unit
    floor = -(-ffn_step_floor(shape.intermediate) // g)  # in FFN grains
    return {
        "attn": grain * step_units(shape.units("attn") // grain, iteration, 1),
        "mlp": g * step_units(shape.intermediate // g, iteration, floor),
    }


def level_range(centre: int, step: int, n: int, half: int = 4) -> tuple[int, int]:
    """Levels k with 0 ≤ centre + k·step ≤ n, |k| ≤ half (§5.1)."""
    return -min(centre // step, half), min((n - centre) // step, half)


@dataclass(frozen=True)
class SubLayer:
    """One gene's candidates: level k removes centre + k·step units of n. `fixed`: the attention
    structures (q, v) the level-0 candidate must choose from (`--genome`), else any of the
    level's unit count."""

    gene: Gene
    n: int
    centre: int
    step: int
    low: int
    high: int
    fixed: tuple[tuple[int, int], ...] = ()

    def units(self, level: int) -> int:
        return self.centre + level * self.step

    @property
    def levels(self) -> range:
        return range(self.low, self.high + 1)


def sublayers(
    shape: Shape,
    centres: dict[Gene, int],
    step: dict[str, int],
    half: int,
    widths: Widths | None = None,
    mode: str = GQA_MODES[0],
) -> dict[Gene, SubLayer]:
    """Every gene's levels around its centre: |k| ≤ half, 0 ≤ units ≤ n; with `widths`
    (`--genome`), each attention sub-layer held to the structures they allow."""
    out = {}
    for gene, c in centres.items():
        n = shape.units(gene.kind)
        lo, hi = level_range(c, step[gene.kind], n, half)
        fixed = widths.attn_choices(shape, gene.block, mode) if widths and gene.kind == "attn" else []
        out[gene] = SubLayer(gene, n, c, step[gene.kind], lo, hi, tuple(fixed))
    return out


def recentre(
    centres: dict[Gene, int], genes: Sequence[Gene], genome: Sequence[int], step: dict[str, int]
) -> dict[Gene, int]:
    """r_ℓ ← r_ℓ + k*_ℓ·u_t: the next iteration's centres from this one's best genome (§8)."""
    return {g: centres[g] + k * step[g.kind] for g, k in zip(genes, genome, strict=True)}


def candidate_units(
    shape: Shape, sparsity: float, iteration: int, levels: int, mode: str = GQA_MODES[0]
) -> list[tuple[str, list[int]]]:
    """For every sub-layer, (kind, units removed at each level) in iteration `iteration`,
    centred on the initial centres (later iterations re-centre on the search's result, unknown
    in advance). Kinds in turn: every block's attention, then every block's FFN."""
    start = initial_centres(shape, sparsity, mode)
    step = steps(shape, iteration)
    out: list[tuple[str, list[int]]] = []
    for kind in KINDS:
        centres = {Gene(b, kind): c for b, c in enumerate(start[kind])}
        for sub in sublayers(shape, centres, step, levels // 2).values():
            out.append((kind, [sub.units(k) for k in sub.levels]))
    return out


# ---------------------------------------------------------------------------------------------
# `--genome`: widths given per block.


@dataclass(frozen=True)
class Widths:
    """What `--genome` asks for, kept per block: query heads, KV heads (None: the solver picks
    the structure with that many query heads), FFN neurons."""

    q_heads: tuple[int, ...]
    kv_heads: tuple[int | None, ...]
    intermediate: tuple[int, ...]

    def attn_choices(self, shape: Shape, block: int, mode: str = GQA_MODES[0]) -> list[tuple[int, int]]:
        """The structures block `block` may keep ([] when none of `mode` matches)."""
        q, v = self.q_heads[block], self.kv_heads[block]
        return [s for ss in structures(shape, mode).values() for s in ss if s[0] == q and v in (None, s[1])]

    def centres(self, shape: Shape, mode: str = GQA_MODES[0]) -> dict[str, list[int]]:
        """Units removed per block (attention: of the structure kept first among the choices)."""
        attn = []
        for b in range(shape.n_layers):
            q, v = self.attn_choices(shape, b, mode)[0]
            attn.append(shape.attn_units_removed(q, v))
        return {"attn": attn, "mlp": [shape.intermediate - f for f in self.intermediate]}
