"""Grouped-query attention: which KV heads survive, real-parameter budgets, and the attention
solvers for the `free` and `uniform` GQA modes (ALGORITHM.md §0 A1, §2.4, §3).

Query head h reads KV head h // g in the dense model (g = n_q / n_kv). A KV head is removed iff
every query head mapped to it is removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from tyr.arch import Shape
from tyr.local import (
    OBSState,
    Problem,
    Solution,
    group_rows,
    magnitude_order,
    obs_remove,
    removal_order,
    scores,
    solution_for_kept,
)

__all__ = [
    "GQA_MODES",
    "HeadLayout",
    "layout",
    "attn_removed",
    "round_half_up",
    "spread",
    "uniform_structures",
    "prune_attention",
]

GQA_MODES = ("free", "uniform")


def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def spread(total: int, n: int) -> list[int]:
    """Split an integer total over n slots as evenly as possible: ⌊(b+1)U/n⌋ − ⌊bU/n⌋ (§2.4)."""
    return [(b + 1) * total // n - b * total // n for b in range(n)]


@dataclass(frozen=True)
class HeadLayout:
    """Which heads a pruned attention sub-layer keeps (ALGORITHM.md §2.5)."""

    kept_q: tuple[int, ...]  # ascending original query-head indices
    kept_kv: tuple[int, ...]  # ascending original KV-head indices
    q_to_kv: tuple[int, ...]  # for each kept query head, its index into kept_kv


def layout(kept_q: Sequence[int], n_q: int, n_kv: int) -> HeadLayout:
    g = n_q // n_kv
    kept_q = tuple(sorted(int(h) for h in kept_q))
    kept_kv = tuple(sorted({h // g for h in kept_q}))
    pos = {kv: i for i, kv in enumerate(kept_kv)}
    return HeadLayout(kept_q, kept_kv, tuple(pos[h // g] for h in kept_q))


def attn_removed(shape: Shape, kept_q: Sequence[int]) -> int:
    """Real parameters removed from one attention sub-layer when it keeps these query heads."""
    lay = layout(kept_q, shape.n_q, shape.n_kv)
    return shape.attn_params(shape.n_q, shape.n_kv) - shape.attn_params(len(lay.kept_q), len(lay.kept_kv))


def uniform_structures(shape: Shape) -> list[tuple[int, int]]:
    """Feasible (a, b) of `gqa="uniform"`: a kept KV groups of b query heads each; (0, 0) = removed."""
    return [(0, 0)] + [(a, b) for a in range(1, shape.n_kv + 1) for b in range(1, shape.group + 1)]


def _structure_removed(shape: Shape, a: int, b: int) -> int:
    return shape.attn_params(shape.n_q, shape.n_kv) - shape.attn_params(a * b, a)


def _nearest_prefix(shape: Shape, order: Sequence[int], target: int) -> int:
    """Number k of heads from `order` whose real removal is nearest `target` (ties: fewer)."""
    best_k, best_gap = 0, abs(target)
    for k in range(1, len(order) + 1):
        gap = abs(attn_removed(shape, [h for h in range(shape.n_q) if h not in set(order[:k])]) - target)
        if gap < best_gap:
            best_k, best_gap = k, gap
    return best_k


def _free(problem: Problem, shape: Shape, target: int, saliency: str, magnitude: bool) -> Solution:
    n = shape.n_q
    if magnitude:
        order = magnitude_order(problem.W, shape.head_dim)
    else:
        # One head per step is a deterministic greedy sequence: every target's removal is a
        # prefix of the full sequence, so the candidates of a sub-layer share it.
        key = ("free-order", saliency)
        if key not in problem.memo:
            groups = group_rows(n, shape.head_dim, problem.W.device)
            problem.memo[key] = removal_order(problem, groups, [1] * n, saliency)
        order = problem.memo[key]
    k = _nearest_prefix(shape, order, target)
    gone = set(order[:k])
    kept = torch.tensor([h for h in range(n) if h not in gone], dtype=torch.long)
    return solution_for_kept(problem, kept, shape.head_dim, refit_weights=not magnitude)


def _solve_structure(
    problem: Problem, shape: Shape, a: int, b: int, saliency: str, magnitude: bool
) -> Solution:
    """Keep a whole KV groups of b query heads each (§3.4)."""
    n_kv, g, dh = shape.n_kv, shape.group, shape.head_dim
    if a == 0:
        return solution_for_kept(problem, torch.zeros(0, dtype=torch.long), dh)
    if magnitude:
        head_norm = problem.W.reshape(shape.n_q, -1).norm(dim=1).view(n_kv, g)
        kv_keep = torch.argsort(head_norm.sum(dim=1), descending=True, stable=True)[:a]
        kept = [
            int(kv) * g + int(j) for kv in kv_keep for j in torch.argsort(head_norm[kv], descending=True)[:b]
        ]
        return solution_for_kept(problem, torch.tensor(kept), dh, refit_weights=False)
    state = OBSState.start(problem)
    kv_groups = group_rows(n_kv, g * dh, problem.W.device)
    heads = group_rows(shape.n_q, dh, problem.W.device)
    for _ in range(n_kv - a):  # (1) whole KV groups, one per step
        worst = int(torch.argmin(scores(state, problem.G, kv_groups, saliency)))
        obs_remove(state, kv_groups[worst])
    for _ in range(g - b):  # (2) the weakest remaining head of every surviving group, jointly
        s = scores(state, problem.G, heads, saliency).view(n_kv, g)
        alive = torch.isfinite(s).any(dim=1)
        pick = [kv * g + int(torch.argmin(s[kv])) for kv in range(n_kv) if alive[kv]]
        obs_remove(state, heads[torch.tensor(pick)].reshape(-1))
    removed = state.removed.view(shape.n_q, dh).all(dim=1)
    return solution_for_kept(problem, (~removed).nonzero().flatten(), dh)


def _uniform(problem: Problem, shape: Shape, target: int, saliency: str, magnitude: bool) -> Solution:
    options = uniform_structures(shape)
    gaps = [abs(_structure_removed(shape, a, b) - target) for a, b in options]
    best = min(gaps)
    tied = [ab for ab, gap in zip(options, gaps, strict=True) if gap == best]
    solutions = [_solve_structure(problem, shape, a, b, saliency, magnitude) for a, b in tied]
    return min(solutions, key=lambda s: s.eps)


def prune_attention(
    problem: Problem, shape: Shape, target: int, *, mode: str, saliency: str, magnitude: bool = False
) -> Solution:
    """Prune query heads of o_proj so that the real parameters removed are nearest `target`.

    `free`: heads one per step in saliency order, stopping at the count nearest the target
    (§3.5); `uniform`: the feasible (a, b) structure nearest the target (§3.4).
    `magnitude=True` is the baseline: rank by weight norm, no compensation and no refit.
    """
    if mode == "free":
        return _free(problem, shape, target, saliency, magnitude)
    if mode == "uniform":
        return _uniform(problem, shape, target, saliency, magnitude)
    raise ValueError(f"unknown gqa mode {mode!r}; expected one of {GQA_MODES}")
