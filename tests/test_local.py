"""The local pruner against brute force on small random problems."""

from __future__ import annotations

import itertools

import pytest
import torch

from tyr.local import (
    OBSState,
    group_rows,
    magnitude_order,
    make_problem,
    obs_remove,
    refit,
    schedule_steps,
    scores,
    solution_for_kept,
    solve,
)


def problem_data(d_in: int = 24, d_out: int = 7, n: int = 200, seed: int = 0, dead: tuple[int, ...] = ()):
    """Correlated inputs X [n, d_in] (so that compensation matters), a dense W and H = XᵀX."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * 0.4 + torch.eye(
        d_in, dtype=torch.float64
    )
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix
    X[:, list(dead)] = 0
    W = torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
    return X, W, X.T @ X


def objective(X, W, W_hat, lam):
    """½‖XŴ − XW‖² + ½λ‖Ŵ − W‖² (docs/algorithm.md §4.1)."""
    return 0.5 * ((X @ (W_hat - W)) ** 2).sum() + 0.5 * lam * ((W_hat - W) ** 2).sum()


def test_refit_is_the_exact_least_squares_optimum_for_its_kept_set():
    X, W, H = problem_data()
    p = make_problem(W, H)
    kept = torch.tensor([0, 1, 2, 5, 6, 7, 8, 12, 13, 20, 21, 22, 23])
    W_hat = refit(p, kept)
    # Brute force: ridge least squares [X_K; √λ I] Ŵ_K ≈ [XW; √λ W_K] through lstsq.
    A = torch.cat([X[:, kept], p.lam**0.5 * torch.eye(len(kept), dtype=X.dtype)])
    B = torch.cat([X @ W, p.lam**0.5 * W[kept]])
    expect = torch.linalg.lstsq(A, B).solution
    assert torch.allclose(W_hat[kept], expect, atol=1e-9)
    assert W_hat[[3, 4, 9, 10, 11, 14, 15, 16, 17, 18, 19]].abs().max() == 0
    # And no perturbation of the kept rows does better.
    base = objective(X, W, W_hat, p.lam)
    for _ in range(5):
        other = W_hat.clone()
        other[kept] += 1e-3 * torch.randn_like(other[kept])
        assert objective(X, W, other, p.lam) > base


@pytest.mark.parametrize("size", [1, 3])
def test_obs_compensation_matches_the_refit(size):
    X, W, H = problem_data(d_in=24)
    p = make_problem(W, H)
    groups = group_rows(24 // size, size)
    state = OBSState.start(p)
    for step in ([0], [5, 2], [7]):  # progressive, with a joint two-group round
        obs_remove(state, groups[torch.tensor(step)].reshape(-1))
    kept_rows = (~state.removed).nonzero().flatten()
    assert torch.allclose(state.W, refit(p, kept_rows), atol=1e-8)


def test_obs_block_term_is_the_exact_objective_increase_of_one_group():
    X, W, H = problem_data(d_in=18)
    p = make_problem(W, H)
    groups = group_rows(6, 3)
    state = OBSState.start(p)
    s = scores(state, p.G, groups, "obs_block")
    first = (p.W[groups] * p.G[groups]).sum(dim=(1, 2))
    base = objective(X, W, p.W, p.lam)
    for gi in range(6):
        kept = groups[[j for j in range(6) if j != gi]].reshape(-1)
        exact = objective(X, W, refit(p, kept), p.lam) - base
        assert float(s[gi] - first[gi]) == pytest.approx(float(exact), rel=1e-8)


def test_paper_saliency_formula():
    """σ_p = |⟨G_p, W_p⟩| + ‖W_p‖²/(2[H⁻¹]_pp), a group's score the mean of its rows (Eq. 4)."""
    X, W, H = problem_data(d_in=12)
    p = make_problem(W, H)
    state = OBSState.start(p)
    groups = group_rows(4, 3)
    Hinv = torch.linalg.inv(p.hd())
    rows = [abs(float(p.G[i] @ p.W[i])) + float(p.W[i] @ p.W[i]) / (2 * float(Hinv[i, i])) for i in range(12)]
    expect = torch.tensor(rows, dtype=torch.float64).view(4, 3).mean(dim=1)
    assert torch.allclose(scores(state, p.G, groups, "paper"), expect, rtol=1e-9)
    obs_remove(state, groups[1])
    assert scores(state, p.G, groups, "paper")[1] == float("inf")


@pytest.mark.parametrize("saliency", ["obs_block", "paper"])
def test_pruner_beats_magnitude_removal(saliency):
    for seed in range(3):
        X, W, H = problem_data(d_in=32, d_out=9, seed=seed)
        sol = solve(W, H, 1, 12, saliency=saliency, schedule="rounds", rounds=4)
        p = make_problem(W, H)
        gone = set(magnitude_order(W, 1)[:12])
        mag = solution_for_kept(
            p, torch.tensor([j for j in range(32) if j not in gone]), 1, refit_weights=False
        )
        assert len(sol.kept) == 20
        assert objective(X, W, sol.weight, p.lam) < objective(X, W, mag.weight, p.lam)
        assert sol.eps < mag.eps


def test_greedy_is_close_to_the_best_subset():
    X, W, H = problem_data(d_in=16, d_out=5)
    p = make_problem(W, H)
    groups = group_rows(8, 2)
    sol = solve(W, H, 2, 3, schedule="per_step", per_step=1)
    best = min(
        objective(X, W, refit(p, groups[[g for g in range(8) if g not in drop]].reshape(-1)), p.lam)
        for drop in itertools.combinations(range(8), 3)
    )
    got = objective(X, W, sol.weight, p.lam)
    assert best <= got <= 1.5 * best


def test_edge_cases_r0_rn_and_dead_channels():
    X, W, H = problem_data(d_in=12, dead=(3, 7))
    zero = solve(W, H, 1, 0)
    assert zero.eps == 0 and len(zero.kept) == 12
    assert zero.weight[[3, 7]].abs().max() == 0  # dead rows zeroed, nothing else changed
    keep = [j for j in range(12) if j not in (3, 7)]
    assert torch.equal(zero.weight[keep], W[keep])
    full = solve(W, H, 1, 12)
    assert full.weight.abs().max() == 0 and len(full.kept) == 0
    two = solve(W, H, 1, 2, schedule="per_step", per_step=1)
    assert sorted(set(range(12)) - set(two.kept.tolist())) == [3, 7]  # dead channels go first
    X0 = torch.zeros(5, 6, dtype=torch.float64)
    for r in (0, 2):  # all channels dead: every level behaves as r = n
        all_dead = solve(torch.randn(6, 3, dtype=torch.float64), X0.T @ X0, 1, r)
        assert all_dead.weight.abs().max() == 0 and len(all_dead.kept) == 0


def test_rank_deficient_hessian_still_solves():
    X, W, H = problem_data(d_in=40, n=10)  # rank 10 < 40: only the damping keeps H_d invertible
    sol = solve(W, H, 4, 5)
    assert torch.isfinite(sol.weight).all() and len(sol.kept) == 5


def test_schedules():
    assert schedule_steps(5504, "rounds") == [344] * 16
    assert schedule_steps(37, "rounds", rounds=16) == [3] * 5 + [2] * 11
    assert schedule_steps(3, "rounds") == [1, 1, 1]
    assert schedule_steps(37, "per_step", per_step=16) == [16, 16, 5]
    assert schedule_steps(0, "rounds") == []
    with pytest.raises(ValueError):
        schedule_steps(3, "nope")
