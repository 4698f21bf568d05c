"""Grouped-query attention: the attention solvers of the `free` and `uniform` GQA modes
(docs/algorithm.md §3).

Query head h reads KV head h // g in the dense model (g = n_q / n_kv). A KV head is removed iff
every query head mapped to it is removed. The caller names the structures (q query heads kept
over v KV heads, :func:`tyr.budget.attn_structures`) that meet its target; the solver decides
which heads, and among several structures keeps the one of least error.

Which heads: when a sub-layer has few enough head subsets of the given structures
(:data:`EXHAUSTIVE_SUBSETS`), every one is scored by the objective itself, the error left after
the refit of §4.6 (:func:`subset_eps`), and the best is exact. Otherwise a structure is solved
greedily: whole KV groups go first, then single heads (free) or the weakest head of every
surviving group (uniform), each step by the OBS saliency with compensation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from tyr.budget import GQA_MODES, Shape
from tyr.local.solver import (
    OBSState,
    Problem,
    Solution,
    group_rows,
    obs_remove,
    scores,
    solution_for_kept,
)

__all__ = [
    "GQA_MODES",
    "EXHAUSTIVE_SUBSETS",
    "head_subsets",
    "subset_eps",
    "prune_attention",
]

EXHAUSTIVE_SUBSETS = 1024  # head subsets scored exactly per candidate; above, greedy per structure
_BATCH_BYTES = 256 << 20  # the gathered blocks of one batch of subsets


def _subset_count(shape: Shape, q: int, v: int, mode: str) -> int:
    """How many head subsets keep q query heads over exactly v KV groups."""
    g = shape.group
    if q == 0:
        return 1
    if mode == "uniform":
        return math.comb(shape.n_kv, v) * math.comb(g, q // v) ** v
    # v chosen groups, q heads among their v·g with no chosen group empty (inclusion–exclusion)
    inside = sum((-1) ** j * math.comb(v, j) * math.comb((v - j) * g, q) for j in range(v + 1))
    return math.comb(shape.n_kv, v) * inside


def head_subsets(shape: Shape, q: int, v: int, mode: str) -> Iterator[tuple[int, ...]]:
    """Every ascending set of q kept query heads that fills exactly v KV groups (uniform: v
    groups of q/v heads each)."""
    g = shape.group
    if q == 0:
        yield ()
        return
    for groups in itertools.combinations(range(shape.n_kv), v):
        if mode == "uniform":
            per = [itertools.combinations(range(kv * g, kv * g + g), q // v) for kv in groups]
            for parts in itertools.product(*per):
                yield tuple(h for part in parts for h in part)
        else:
            pool = [h for kv in groups for h in range(kv * g, kv * g + g)]
            for kept in itertools.combinations(pool, q):
                if len({h // g for h in kept}) == v:
                    yield kept


def subset_eps(problem: Problem, kept: Sequence[Sequence[int]], head_dim: int) -> Tensor:
    """ε (§4.9) after the refit of §4.6 for each kept head set K (all of one size): the exact
    local error of keeping K, batched over the sets.

    With R the removed rows, ⟨D, H_d D⟩ = tr([(H_d⁻¹)_RR]⁻¹·(W Wᵀ)_RR) = ⟨W, G⟩ − tr((H_d)_KK⁻¹·(G Gᵀ)_KK);
    each set uses the smaller of R and K, so one k×k factorisation and inverse per set
    (k ≤ half the rows), from d_in² products formed once per sub-layer. A block that fails to
    factor scores +∞."""
    heads = torch.tensor(kept, dtype=torch.long, device=problem.W.device).view(len(kept), -1)
    d_in = problem.W.shape[0]
    n = d_in // head_dim
    den = float((problem.W * problem.G).sum())
    if den <= 0:
        return torch.zeros(len(kept), dtype=problem.W.dtype)
    by_kept = heads.shape[1] * 2 <= n
    if not by_kept:  # the removed heads of each set, ascending
        mask = torch.ones(len(kept), n, dtype=torch.bool, device=heads.device)
        mask.scatter_(1, heads, False)
        heads = mask.nonzero()[:, 1].view(len(kept), -1)
    if heads.shape[1] == 0:  # nothing kept (ε = 1) or nothing removed (ε = 0)
        return torch.full((len(kept),), 1.0 if by_kept else 0.0, dtype=problem.W.dtype)
    key = ("gqa-products", by_kept)
    if key not in problem.memo:
        problem.memo[key] = (
            (problem.hd(), problem.G @ problem.G.T) if by_kept else (problem.hinv(), problem.W @ problem.W.T)
        )
    A, M = problem.memo[key]
    rows = (heads.unsqueeze(-1) * head_dim + torch.arange(head_dim, device=heads.device)).flatten(1)
    k = rows.shape[1]
    per = max(1, _BATCH_BYTES // (3 * k * k * A.element_size()))
    out = []
    for lo in range(0, rows.shape[0], per):
        idx = rows[lo : lo + per]
        ii, jj = idx.unsqueeze(-1), idx.unsqueeze(-2)
        L, info = torch.linalg.cholesky_ex(A[ii, jj])
        value = (torch.cholesky_inverse(L) * M[ii, jj]).sum(dim=(1, 2))
        eps = 1 - value / den if by_kept else value / den
        out.append(eps.clamp(min=0).masked_fill(info != 0, math.inf))
    return torch.cat(out)


def _exhaustive(problem: Problem, shape: Shape, options: Sequence[tuple[int, int]], mode: str) -> Tensor:
    """The kept heads, over every subset of every structure in `options`, of least error."""
    best: tuple[float, tuple[int, ...]] | None = None
    for q, v in options:
        subsets = list(head_subsets(shape, q, v, mode))
        eps = subset_eps(problem, subsets, shape.head_dim)
        i = int(torch.argmin(eps))
        if best is None or float(eps[i]) < best[0]:
            best = (float(eps[i]), subsets[i])
    assert best is not None
    return torch.tensor(best[1], dtype=torch.long)


def _greedy(problem: Problem, shape: Shape, q: int, v: int, mode: str, saliency: str) -> Tensor:
    """One structure by progressive OBS removal (§3.4, §4.4): the n_kv − v weakest whole KV
    groups one per step; then, free: the weakest remaining head one per step, never the last of
    its group; uniform: the weakest head of every surviving group jointly, until q/v are left."""
    n_q, n_kv, g, dh = shape.n_q, shape.n_kv, shape.group, shape.head_dim
    if q == 0:
        return torch.zeros(0, dtype=torch.long)
    state = OBSState.start(problem)
    kv_groups = group_rows(n_kv, g * dh, problem.W.device)
    heads = group_rows(n_q, dh, problem.W.device)
    for _ in range(n_kv - v):
        obs_remove(state, kv_groups[int(torch.argmin(scores(state, problem.G, kv_groups, saliency)))])
    if mode == "uniform":
        for _ in range(g - q // v):
            s = scores(state, problem.G, heads, saliency).view(n_kv, g)
            alive = torch.isfinite(s).any(dim=1)
            pick = [kv * g + int(torch.argmin(s[kv])) for kv in range(n_kv) if alive[kv]]
            obs_remove(state, heads[torch.tensor(pick)].reshape(-1))
    else:
        for _ in range(v * g - q):
            s = scores(state, problem.G, heads, saliency).view(n_kv, g)
            last = torch.isfinite(s).sum(dim=1, keepdim=True) == 1  # a group's last head stays
            s = s.masked_fill(last & torch.isfinite(s), math.inf).flatten()
            obs_remove(state, heads[int(torch.argmin(s))])
    return (~state.removed.view(n_q, dh).all(dim=1)).nonzero().flatten()


def _magnitude(problem: Problem, shape: Shape, q: int, v: int, mode: str) -> Tensor:
    """The baseline: the v KV groups of largest head-norm sum, then the largest heads in them
    (free: each group's largest, then the largest of the rest; uniform: q/v in each)."""
    n_kv, g = shape.n_kv, shape.group
    if q == 0:
        return torch.zeros(0, dtype=torch.long)
    norm = problem.W.reshape(shape.n_q, -1).norm(dim=1).view(n_kv, g)
    groups = torch.argsort(norm.sum(dim=1), descending=True, stable=True)[:v].tolist()
    rank = {kv: torch.argsort(norm[kv], descending=True, stable=True).tolist() for kv in groups}
    if mode == "uniform":
        kept = [kv * g + j for kv in groups for j in rank[kv][: q // v]]
    else:
        kept = [kv * g + rank[kv][0] for kv in groups]
        rest = sorted(
            ((kv * g + j) for kv in groups for j in rank[kv][1:]),
            key=lambda h: (-float(norm.view(-1)[h]), h),
        )
        kept += rest[: q - v]
    return torch.tensor(sorted(kept), dtype=torch.long)


def prune_attention(
    problem: Problem,
    shape: Shape,
    options: Sequence[tuple[int, int]],
    *,
    mode: str,
    saliency: str,
    magnitude: bool = False,
) -> Solution:
    """Prune query heads of o_proj to one of the structures `options` ((q kept, v kept) pairs,
    all of `mode`), choosing heads and structure of least error, and refit (§3.3–§3.5).

    `saliency` orders the greedy removal used above :data:`EXHAUSTIVE_SUBSETS`; the exhaustive
    choice minimises the objective itself. `magnitude=True` is the baseline: heads ranked by
    weight norm, no compensation and no refit.
    """
    if mode not in GQA_MODES:
        raise ValueError(f"unknown gqa mode {mode!r}; expected one of {GQA_MODES}")
    if not options:
        raise ValueError("no attention structure to prune to")
    dh = shape.head_dim
    if magnitude:
        sols = [
            solution_for_kept(problem, _magnitude(problem, shape, q, v, mode), dh, refit_weights=False)
            for q, v in options
        ]
        return min(sols, key=lambda s: s.eps)
    if sum(_subset_count(shape, q, v, mode) for q, v in options) <= EXHAUSTIVE_SUBSETS:
        return solution_for_kept(problem, _exhaustive(problem, shape, options, mode), dh)
    sols = [solution_for_kept(problem, _greedy(problem, shape, q, v, mode, saliency), dh) for q, v in options]
    return min(sols, key=lambda s: s.eps)
