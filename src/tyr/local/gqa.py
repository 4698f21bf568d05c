"""Grouped-query attention: which KV heads survive, real-parameter budgets, and the attention
solvers for the `free` and `uniform` GQA modes (docs/algorithm.md §2.4, §3).

Query head h reads KV head h // g in the dense model (g = n_q / n_kv). A KV head is removed iff
every query head mapped to it is removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tyr.budget import Shape, attn_removed
from tyr.local.solver import (
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
    "uniform_structures",
    "prune_attention",
]

GQA_MODES = ("free", "uniform")


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
