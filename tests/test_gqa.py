"""GQA bookkeeping, real-parameter budgets and the attention solvers."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from tyr.budget import Shape, attn_removed, layout, round_half_up, spread
from tyr.local import make_problem, prune_attention, uniform_structures


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


def test_uniform_structures():
    s = shape()
    structs = uniform_structures(s)
    assert (0, 0) in structs and (3, 3) in structs and len(structs) == 1 + 3 * 3


def _attn_problem(s: Shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_in = s.n_q * s.head_dim
    X = torch.randn(300, d_in, generator=g, dtype=torch.float64)
    X[:, : s.head_dim] *= 0.05  # head 0 is weak
    W = torch.randn(d_in, s.hidden, generator=g, dtype=torch.float64)
    return make_problem(W, X.T @ X)


@pytest.mark.parametrize("target_units", [0, 1, 3, 4, 7, 8])
def test_free_mode_removes_the_count_nearest_the_target(target_units):
    s = shape(n_q=6, n_kv=2, d=16, dh=4)
    unit = 2 * s.hidden * s.head_dim
    sol = prune_attention(_attn_problem(s), s, target_units * unit, mode="free", saliency="obs_block")
    removed = attn_removed(s, sol.kept.tolist())
    # Each removed head frees 1 unit, an emptied group one more: the gap to the target is ≤ 1 unit.
    assert abs(removed - target_units * unit) <= unit
    if target_units >= 1:
        assert 0 not in sol.kept.tolist()  # the weak head goes first


@pytest.mark.parametrize("magnitude", [False, True])
def test_uniform_mode_keeps_whole_groups_of_equal_size(magnitude):
    s = shape(n_q=6, n_kv=2, d=16, dh=4)
    unit = 2 * s.hidden * s.head_dim
    for target in range(0, 9):
        sol = prune_attention(
            _attn_problem(s, 1), s, target * unit, mode="uniform", saliency="paper", magnitude=magnitude
        )
        lay = layout(sol.kept.tolist(), s.n_q, s.n_kv)
        counts = [lay.q_to_kv.count(i) for i in range(len(lay.kept_kv))]
        assert len(set(counts)) <= 1  # every kept group keeps the same number b of heads
        best = min(
            abs(s.attn_params(6, 2) - s.attn_params(a * b, a) - target * unit)
            for a, b in uniform_structures(s)
        )
        assert abs(attn_removed(s, sol.kept.tolist()) - target * unit) == best
