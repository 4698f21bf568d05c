"""GQA bookkeeping, budgets in real attention units (2·d·d_h) and the attention solvers."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from tyr.budget import (
    Shape,
    attn_removed,
    attn_structures,
    candidate_units,
    initial_centres,
    layout,
    round_half_up,
    spread,
    steps,
    structures,
)
from tyr.local import head_subsets, make_problem, prune_attention, solution_for_kept, subset_eps


def shape(n_q=9, n_kv=3, d=576, dh=64, q_bias=False, kv_bias=False) -> Shape:
    return Shape(
        hidden=d,
        n_layers=30,
        n_q=n_q,
        n_kv=n_kv,
        head_dim=dh,
        intermediate=1536,
        q_bias=q_bias,
        kv_bias=kv_bias,
        o_bias=False,
        mlp_bias=False,
        down_bias=False,
    )


def test_layout_maps_kept_heads_to_kept_kv():
    lay = layout([8, 0, 2, 7], n_q=9, n_kv=3)  # groups {0,1,2} {3,4,5} {6,7,8}
    assert lay.kept_q == (0, 2, 7, 8)
    assert lay.kept_kv == (0, 2)
    assert lay.q_to_kv == (0, 0, 1, 1)


def test_real_parameter_counts_follow_groups():
    s = shape()
    unit = 2 * 576 * 64
    assert s.attn_params(9, 3) == 24 * 576 * 64
    assert attn_removed(s, [1, 2, 4, 5, 7, 8]) == 3 * unit  # one head per group: no KV head freed
    assert attn_removed(s, [3, 4, 5, 6, 7, 8]) == 4 * unit  # a whole group: its k/v rows go too
    assert attn_removed(s, []) == s.attn_params(9, 3)
    biased = shape(q_bias=True, kv_bias=True)
    assert attn_removed(biased, [3, 4, 5, 6, 7, 8]) == 4 * unit + 3 * 64 + 2 * 64


def test_spread_and_rounding():
    assert spread(135, 30) == [4, 5] * 15
    assert spread(7, 3) == [2, 2, 3]
    assert round_half_up(Fraction(5, 2)) == 3 and round_half_up(Fraction(7, 2)) == 4


def test_structures_by_units_removed_on_the_smollm2_shape():
    s = shape()
    free = structures(s)
    assert free[0] == [(9, 3)] and free[12] == [(0, 0)]
    assert free[6] == [(4, 2), (3, 3)]  # the two ways to remove half of the attention
    assert 11 not in free and set(free) == set(range(11)) | {12}  # 1 query head cannot keep 0 KV heads
    assert structures(s, "uniform") == {
        0: [(9, 3)], 3: [(6, 3)], 4: [(6, 2)], 6: [(4, 2), (3, 3)], 8: [(3, 1), (2, 2)],
        9: [(2, 1)], 10: [(1, 1)], 12: [(0, 0)],
    }  # fmt: skip
    assert attn_structures(s, 11) == [(1, 1)]  # an infeasible count: the nearest, ties to fewer
    for units, pairs in free.items():
        for q, v in pairs:
            assert s.attn_params(9, 3) - s.attn_params(q, v) == units * 2 * s.hidden * s.head_dim


@pytest.mark.parametrize("mode", ["free", "uniform"])
def test_the_even_split_is_every_blocks_centre_when_feasible(mode):
    s = shape()
    assert initial_centres(s, 0.5, mode) == {"attn": [6] * 30, "mlp": [768] * 30}
    if mode == "free":
        assert initial_centres(s, 0.25)["attn"] == [3] * 30
    # 92 %: 11 units is infeasible, so blocks take 10 and 12 and the total is off by at most
    # one unit (331 is odd; no mix of 10 and 12 reaches it).
    high = initial_centres(s, 0.92, mode)["attn"]
    assert abs(sum(high) - round_half_up(Fraction("0.92") * 12 * 30)) <= 1 and set(high) == {10, 12}


def test_real_removal_strictly_increases_over_levels():
    s = shape()
    for t in (1, 2, 3, 4):
        for kind, units in candidate_units(s, 0.5, t, 9):
            assert units == sorted(set(units)), (t, kind, units)
            if kind == "attn":
                real = [s.attn_params(9, 3) - s.attn_params(*attn_structures(s, u)[0]) for u in units]
                assert real == sorted(set(real)), (t, real)
    assert [steps(s, t)["attn"] for t in (1, 2, 3, 4)] == [2, 1, 1, 1]  # 12 units: 1.5 → 2, then 1


def test_mha_steps_are_the_papers_in_heads():
    mha = shape(n_q=32, n_kv=32, d=4096, dh=128)
    assert [steps(mha, t)["attn"] // 2 for t in (1, 2, 3, 4)] == [4, 2, 1, 1]  # §5.2: 32 heads
    assert initial_centres(mha, 0.5)["attn"] == [32] * 30  # 16 heads and their KV heads
    odd = shape(n_q=9, n_kv=9, dh=64)  # 4.5 heads per block at 50 %: 4 and 5 alternate
    assert initial_centres(odd, 0.5)["attn"] == [8, 10] * 15


def _attn_problem(s: Shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_in = s.n_q * s.head_dim
    X = torch.randn(300, d_in, generator=g, dtype=torch.float64)
    X[:, : s.head_dim] *= 0.05  # head 0 is weak
    X[:, s.head_dim :] += 0.7 * X[:, : d_in - s.head_dim]  # each head correlated with the previous
    W = torch.randn(d_in, s.hidden, generator=g, dtype=torch.float64)
    return make_problem(W, X.T @ X)


def test_head_subsets_fill_exactly_the_groups_asked():
    s = shape(n_q=9, n_kv=3, d=16, dh=2)
    for q, v in [(4, 2), (3, 3), (6, 3), (1, 1), (0, 0)]:
        subsets = list(head_subsets(s, q, v, "free"))
        brute = [c for c in itertools.combinations(range(9), q) if len({h // 3 for h in c}) == v]
        assert sorted(subsets) == brute
    assert len(list(head_subsets(s, 4, 2, "uniform"))) == 3 * 3 * 3  # 2 of 3 groups, 2 of 3 heads each


@pytest.mark.parametrize("mode", ["free", "uniform"])
def test_the_solver_keeps_the_best_subset_of_every_structure_at_the_budget(mode):
    """At 6 units of 12 the feasible structures are (4q, 2kv) and (3q, 3kv); the solver compares
    every subset of both and keeps the least error, which a brute-force refit confirms."""
    s = shape(n_q=9, n_kv=3, d=16, dh=2)
    problem = _attn_problem(s, 3)
    options = attn_structures(s, 6, mode)
    sol = prune_attention(problem, s, options, mode=mode, saliency="obs_block")
    every = [k for q, v in options for k in head_subsets(s, q, v, mode)]
    errors = [solution_for_kept(problem, torch.tensor(k), s.head_dim).eps for k in every]
    assert sol.eps == pytest.approx(min(errors), rel=1e-9)
    assert attn_removed(s, sol.kept.tolist()) == 6 * 2 * s.hidden * s.head_dim
    for q in (2, 4, 7):  # by the kept rows (k ≤ n/2) and by the removed ones
        sets = [k for k in itertools.combinations(range(9), q)][:6]
        refits = [solution_for_kept(problem, torch.tensor(k), s.head_dim).eps for k in sets]
        assert subset_eps(problem, sets, s.head_dim).tolist() == pytest.approx(refits, rel=1e-8)


@pytest.mark.parametrize("mode", ["free", "uniform"])
@pytest.mark.parametrize("magnitude", [False, True])
def test_greedy_and_magnitude_keep_the_structure_asked(mode, magnitude, monkeypatch):
    import tyr.local.gqa as gqa

    monkeypatch.setattr(gqa, "EXHAUSTIVE_SUBSETS", 0)  # the greedy path of large models
    s = shape(n_q=8, n_kv=2, d=16, dh=2)
    problem = _attn_problem(s, 1)
    for units, pairs in structures(s, mode).items():
        sol = prune_attention(problem, s, pairs, mode=mode, saliency="paper", magnitude=magnitude)
        lay = layout(sol.kept.tolist(), s.n_q, s.n_kv)
        assert (len(lay.kept_q), len(lay.kept_kv)) in pairs
        assert attn_removed(s, sol.kept.tolist()) == units * 2 * s.hidden * s.head_dim
        if mode == "uniform":
            counts = [lay.q_to_kv.count(i) for i in range(len(lay.kept_kv))]
            assert len(set(counts)) <= 1  # every kept group keeps the same number of heads
        if units == 1 and not magnitude:
            assert 0 not in sol.kept.tolist()  # the weak head goes first


def test_exhaustive_is_no_worse_than_greedy():
    import tyr.local.gqa as gqa

    s = shape(n_q=9, n_kv=3, d=16, dh=2)
    for seed in range(3):
        problem = _attn_problem(s, seed)
        for units in (3, 5, 6, 8):
            options = attn_structures(s, units)
            best = prune_attention(problem, s, options, mode="free", saliency="obs_block")
            saved, gqa.EXHAUSTIVE_SUBSETS = gqa.EXHAUSTIVE_SUBSETS, 0
            try:
                greedy = prune_attention(problem, s, options, mode="free", saliency="obs_block")
            finally:
                gqa.EXHAUSTIVE_SUBSETS = saved
            assert best.eps <= greedy.eps + 1e-12
