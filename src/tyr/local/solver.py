"""Local pruning of one sub-layer at one sparsity (docs/algorithm.md §4): pure tensor math.

Convention y = x·W with W ∈ ℝ^{d_in×d_out} (``nn.Linear.weight`` stores Wᵀ). A *group* is a set
of rows of W that is removed together: the d_h rows of one query head in o_proj, one row per
neuron in down_proj. Nothing here knows about modules, hooks, files or devices.

Objective (paper Eq. 2): f(Ŵ) = −⟨Ŵ, G⟩ + ½⟨Ŵ, H_d Ŵ⟩ with H_d = H + λI, G = H_d·W, i.e.
½‖XŴ − XW‖² + ½λ‖Ŵ − W‖² + const, subject to the rows of removed groups being zero.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "DAMP",
    "SALIENCIES",
    "SCHEDULES",
    "Problem",
    "OBSState",
    "Solution",
    "make_problem",
    "chol_inverse",
    "group_rows",
    "scores",
    "obs_remove",
    "removal_order",
    "schedule_steps",
    "refit",
    "rel_error",
    "solve",
    "solve_problem",
    "solution_for_kept",
    "magnitude_order",
]

log = logging.getLogger(__name__)

SALIENCIES = ("obs_block", "paper")  # the first is the default
SCHEDULES = ("rounds", "per_step")
DAMP = 0.01  # λ = DAMP·mean(diag H) (§4.1)
_TINY = 1e-12


@dataclass
class Problem:
    """One sub-layer's solver inputs. The Gram matrix is kept as given (fp32) and the damped
    H_d = H + λI in the solver dtype is formed only while a step needs it, so that one d_in²
    matrix of the solver dtype (H_d⁻¹) is held at a time (docs/algorithm.md §4.9)."""

    W: Tensor  # [d_in, d_out] dense weight with dead rows zeroed, solver dtype
    H: Tensor  # [d_in, d_in] Gram matrix, as accumulated
    G: Tensor  # [d_in, d_out] H_d·W (first-order Taylor term)
    lam: float
    dead: Tensor  # bool [d_in]: H_pp == 0
    _hinv: Tensor | None = None
    memo: dict = field(default_factory=dict)  # results shared by the candidates of one sub-layer

    def hd(self, rows: Tensor | None = None) -> Tensor:
        """H_d (or its [rows, rows] block) in the solver dtype, freshly allocated."""
        H = self.H if rows is None else self.H[rows][:, rows]
        out = H.to(self.W.dtype, copy=True)
        out.diagonal().add_(self.lam)
        return out

    def hd_matmul(self, X: Tensor, rows: int = 1024) -> Tensor:
        """H_d·X, forming H_d a band of rows at a time (the product's rows are independent)."""
        out = torch.empty((self.H.shape[0], X.shape[1]), dtype=X.dtype, device=X.device)
        for lo in range(0, self.H.shape[0], rows):
            hi = min(lo + rows, self.H.shape[0])
            band = self.H[lo:hi].to(X.dtype, copy=True)
            band[:, lo:hi].diagonal().add_(self.lam)
            torch.mm(band, X, out=out[lo:hi])
        return out

    def hinv(self) -> Tensor:
        """H_d⁻¹, computed once and shared by every candidate of the sub-layer (§5.3)."""
        if self._hinv is None:
            A = self.hd()
            if not _inverse_in_place(A):
                del A  # spoiled by the failed factorisation
                A = chol_inverse(self.hd())
            self._hinv = A
        return self._hinv


def make_problem(W: Tensor, H: Tensor, *, damp: float = DAMP, dtype: torch.dtype | None = None) -> Problem:
    """Zero dead rows, damp H by λ = damp·mean(diag H) and form G = H_d·W (§4.1).

    The solver works in fp64 on the CPU (cheap there) and in fp32 on an accelerator (§4.9).
    """
    if dtype is None:
        dtype = torch.float64 if H.device.type == "cpu" else torch.float32
    W = W.detach().to(device=H.device, dtype=dtype).clone()
    H = H.detach()
    diag = H.diagonal().to(dtype)
    dead = diag <= 0
    W[dead] = 0
    mean_diag = float(diag.clamp(min=0).mean())
    lam = damp * mean_diag if mean_diag > 0 else 1.0  # all dead: any λ > 0 makes H_d = λI
    problem = Problem(W=W, H=H, G=W, lam=lam, dead=dead)
    problem.G = problem.hd_matmul(W)
    return problem


def _cholesky(A: Tensor, jitter: float) -> Tensor:
    """Lower Cholesky factor; on failure add ×10 the jitter up to three times, then fp64 on CPU."""
    extra = 0.0
    for attempt in range(4):
        shifted = A if attempt == 0 else A + extra * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        L, info = torch.linalg.cholesky_ex(shifted)
        if int(info.max()) == 0:
            if attempt:
                log.warning("Cholesky needed %.3g extra damping", extra)
            return L
        extra = jitter * (10 ** (attempt + 1) - 1)
    if A.dtype != torch.float64 or A.device.type != "cpu":
        return _cholesky(A.double().cpu(), jitter).to(A.dtype).to(A.device)
    raise FloatingPointError("matrix is not positive definite even after damping")


def chol_inverse(A: Tensor, jitter: float | None = None) -> Tensor:
    """Inverse of a symmetric positive-definite matrix through its Cholesky factor."""
    if jitter is None:
        jitter = max(float(A.diagonal().mean()) * 0.01, _TINY)
    return torch.cholesky_inverse(_cholesky(A, jitter))


def _inverse_in_place(A: Tensor) -> bool:
    """Overwrite the SPD matrix A with its inverse (factor and inverse in A's memory); False,
    with A spoiled, when the factorisation fails (the caller then uses :func:`chol_inverse`).
    CPU only; on an accelerator the out-of-place path is taken."""
    if A.device.type != "cpu":
        return False
    # LAPACK works on column-major storage; A is symmetric, so its transposed view is A itself
    # in that layout and the factorisation needs no copy.
    F = A.mT
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.cholesky_ex(F, out=(F, info))
    if int(info) != 0:
        return False
    torch.cholesky_inverse(F, out=F)
    return True


def group_rows(n_groups: int, size: int, device: torch.device | None = None) -> Tensor:
    """Row indices of each group, [n_groups, size]: group g owns rows g·size … g·size+size−1."""
    return torch.arange(n_groups * size, device=device).view(n_groups, size)


@dataclass
class OBSState:
    """Compensated weight and inverse Hessian during progressive removal (§4.4)."""

    W: Tensor  # [d_in, d_out]
    Hinv: Tensor  # [d_in, d_in]
    removed: Tensor  # bool [d_in]
    rounds: int = 0

    @classmethod
    def start(cls, problem: Problem, consume: bool = False) -> OBSState:
        """The state before any removal; `consume` takes the problem's H_d⁻¹ instead of a copy
        (for a problem solved once)."""
        hinv = problem.hinv()
        if consume:
            problem._hinv = None
        return cls(
            W=problem.W.clone(),
            Hinv=hinv if consume else hinv.clone(),
            removed=torch.zeros(problem.W.shape[0], dtype=torch.bool, device=problem.W.device),
        )


def _spd_solve(B: Tensor, X: Tensor) -> Tensor:
    """Solve B·Y = X for a batch of small SPD blocks B [n, r, r], X [n, r, c]."""
    jitter = max(float(B.diagonal(dim1=-2, dim2=-1).mean()) * 1e-10, _TINY)
    return torch.cholesky_solve(X, _cholesky(B, jitter))


def scores(state: OBSState, G: Tensor, groups: Tensor, saliency: str, chunk_bytes: int = 32 << 20) -> Tensor:
    """Saliency of each group (lower goes first); groups with a removed row score +∞ (§4.3).

    groups: [n_groups, size] row indices. Evaluated on the current W and H⁻¹ with G fixed.
    Single-row groups (MLP channels) are scored `chunk_bytes` of W rows at a time, so the
    gathered copies stay small; each row's score is computed alone, so chunks change nothing.
    """
    n, d_out = groups.shape[0], state.W.shape[1]
    rows = max(1, chunk_bytes // (d_out * state.W.element_size()))
    if groups.shape[1] == 1 and n > rows:
        return torch.cat([_scores(state, G, groups[i : i + rows], saliency) for i in range(0, n, rows)])
    return _scores(state, G, groups, saliency)


def _scores(state: OBSState, G: Tensor, groups: Tensor, saliency: str) -> Tensor:
    Wg = state.W[groups]  # [n, size, d_out]
    Gg = G[groups]
    first = (Wg * Gg).sum(dim=(1, 2))  # ⟨W_R, G_R⟩
    diag = state.Hinv.diagonal()[groups]  # [n, size]; removed rows hold 0
    removed = state.removed[groups]
    bad = (diag <= 0) & ~removed
    if bool(bad.any()):
        log.warning("clamped %d non-positive [H⁻¹]_pp of kept rows", int(bad.sum()))
    diag = torch.where(diag > 0, diag, torch.full_like(diag, _TINY))
    if saliency == "paper":
        row_first = (Wg * Gg).sum(dim=2).abs()
        row_obs = (Wg * Wg).sum(dim=2) / (2 * diag)
        out = (row_first + row_obs).mean(dim=1)
    elif saliency == "obs_block":
        if groups.shape[1] == 1:
            obs = (Wg[:, 0] ** 2).sum(dim=1) / (2 * diag[:, 0])
        else:
            B = state.Hinv[groups.unsqueeze(2), groups.unsqueeze(1)]  # [n, size, size]
            live = ~state.removed[groups].any(dim=1)
            obs = torch.zeros(groups.shape[0], dtype=Wg.dtype, device=Wg.device)
            if live.any():
                Y = _spd_solve(B[live], Wg[live])
                obs[live] = 0.5 * (Wg[live] * Y).sum(dim=(1, 2))
        out = obs + first
    else:
        raise ValueError(f"unknown saliency {saliency!r}; expected one of {SALIENCIES}")
    return out.masked_fill(removed.any(dim=1), math.inf)


def obs_remove(state: OBSState, rows: Tensor) -> None:
    """Remove rows P with OBS compensation and a block Woodbury downdate of H⁻¹ (in place)."""
    if rows.numel() == 0:
        return
    Hp = state.Hinv[:, rows]  # [d_in, |P|]
    Hpp = Hp[rows]  # [|P|, |P|]
    L = _cholesky(Hpp, max(float(Hpp.diagonal().mean()) * 1e-10, _TINY))
    MW = torch.cholesky_solve(state.W[rows], L)  # M·W_P
    MHt = torch.cholesky_solve(Hp.T.contiguous(), L)  # M·(H⁻¹)_{P,:}
    state.W.addmm_(Hp, MW, alpha=-1)
    state.W[rows] = 0
    state.Hinv.addmm_(Hp, MHt, alpha=-1)
    state.Hinv[rows] = 0
    state.Hinv[:, rows] = 0
    state.removed[rows] = True
    # The downdate is symmetric in exact arithmetic; rounding drift is symmetrised away every
    # 4 rounds (every round costs half the solve time on CPU for no measurable change in fp64).
    state.rounds += 1
    if state.rounds % 4 == 0:
        symmetrize_(state.Hinv)


def symmetrize_(A: Tensor, rows: int = 512) -> Tensor:
    """A ← (A + Aᵀ)/2 in place, a band of rows at a time (no full-size temporary)."""
    for lo in range(0, A.shape[0], rows):
        hi = min(lo + rows, A.shape[0])
        band = (A[lo:hi] + A[:, lo:hi].T) * 0.5
        A[lo:hi] = band
        A[:, lo:hi] = band.T
    return A


def schedule_steps(r: int, schedule: str, rounds: int = 16, per_step: int = 16) -> list[int]:
    """How many groups each round removes (§4.5); sums to r."""
    if r <= 0:
        return []
    if schedule == "rounds":
        R = max(1, min(rounds, r))
        base, extra = divmod(r, R)
        return [base + 1] * extra + [base] * (R - extra)
    if schedule == "per_step":
        m = max(1, per_step)
        return [m] * (r // m) + ([r % m] if r % m else [])
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def removal_order(
    problem: Problem,
    groups: Tensor,
    steps: Iterable[int],
    saliency: str,
    stop: Callable[[list[int]], bool] | None = None,
    consume: bool = False,
) -> list[int]:
    """Progressive OBS removal (§4.4): returns group indices in the order they were removed.

    Each round removes the `m` lowest-scoring remaining groups jointly; `stop(order)` is asked
    after every round and ends the removal early when it returns True. `consume`: the problem
    is solved once, so its H_d⁻¹ is updated in place rather than copied.
    """
    state = OBSState.start(problem, consume)
    order: list[int] = []
    for m in steps:
        s = scores(state, problem.G, groups, saliency)
        pick = torch.topk(s, m, largest=False).indices  # ascending score
        obs_remove(state, groups[pick].reshape(-1))
        order.extend(int(i) for i in pick)
        if stop is not None and stop(order):
            break
    return order


def refit(problem: Problem, kept_rows: Tensor) -> Tensor:
    """Ŵ_K = (H_d)_KK⁻¹·G_K, Ŵ_¬K = 0 (§4.6): the ridge least-squares fit of XW from kept inputs."""
    W_hat = torch.zeros_like(problem.W)
    if kept_rows.numel() == 0:
        return W_hat
    Hkk = problem.hd(kept_rows)
    try:
        L = _cholesky(Hkk, max(problem.lam, _TINY))
        W_hat[kept_rows] = torch.cholesky_solve(problem.G[kept_rows], L)
    except FloatingPointError:
        log.warning("refit fell back to lstsq")
        W_hat[kept_rows] = torch.linalg.lstsq(
            Hkk.double().cpu(), problem.G[kept_rows].double().cpu()
        ).solution.to(W_hat)
    return W_hat


def rel_error(problem: Problem, W_hat: Tensor) -> float:
    """ε = ⟨Ŵ−W, H_d(Ŵ−W)⟩ / ⟨W, H_d W⟩ (0 for an unchanged weight, 1-ish for a removed one).

    With G = H_d·W: ⟨D, H_d D⟩ = ⟨Ŵ, H_d Ŵ⟩ − 2⟨Ŵ, G⟩ + ⟨W, G⟩, one d_in²·d_out product."""
    den = float((problem.W * problem.G).sum())
    if den <= 0:
        return 0.0
    num = float((W_hat * problem.hd_matmul(W_hat)).sum()) - 2 * float((W_hat * problem.G).sum()) + den
    return max(num, 0.0) / den


@dataclass
class Solution:
    """A pruned sub-layer: full-size weight (zero rows for removed groups) and kept groups."""

    weight: Tensor  # [d_in, d_out] solver dtype
    kept: Tensor  # int64 ascending group indices
    eps: float


def solution_for_kept(problem: Problem, kept: Tensor, size: int, *, refit_weights: bool = True) -> Solution:
    """Refit (or just mask) the weight for a given kept set of groups."""
    kept = torch.sort(kept.to(torch.long)).values
    n = problem.W.shape[0] // size
    if kept.numel() == n:  # r = 0: the weight with dead rows zeroed, no refit (§4.8)
        return Solution(problem.W.clone(), kept, 0.0)
    rows = group_rows(n, size, problem.W.device)[kept].reshape(-1)
    if refit_weights:
        W_hat = refit(problem, rows)
    else:
        W_hat = torch.zeros_like(problem.W)
        W_hat[rows] = problem.W[rows]
    return Solution(W_hat, kept, rel_error(problem, W_hat))


def _kept_after(n: int, removed: Sequence[int], device: torch.device) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=device)
    if removed:
        mask[torch.tensor(list(removed), dtype=torch.long, device=device)] = False
    return mask.nonzero().flatten()


def solve(
    W: Tensor,
    H: Tensor,
    size: int,
    r: int,
    *,
    saliency: str = SALIENCIES[0],
    schedule: str = SCHEDULES[0],
    rounds: int = 16,
    per_step: int = 16,
    damp: float = DAMP,
    dtype: torch.dtype | None = None,
) -> Solution:
    """Remove r of the W.shape[0]/size groups: progressive OBS removal, then the final refit."""
    problem = make_problem(W, H, damp=damp, dtype=dtype)
    return solve_problem(
        problem, size, r, saliency=saliency, schedule=schedule, rounds=rounds, per_step=per_step, consume=True
    )


def solve_problem(
    problem: Problem,
    size: int,
    r: int,
    *,
    saliency: str = SALIENCIES[0],
    schedule: str = SCHEDULES[0],
    rounds: int = 16,
    per_step: int = 16,
    consume: bool = False,
) -> Solution:
    """:func:`solve` on a prepared problem (several removal counts share one problem, unless
    `consume`: then its H_d⁻¹ is used up by this solve)."""
    n = problem.W.shape[0] // size
    if not 0 <= r <= n:
        raise ValueError(f"cannot remove {r} of {n} groups")
    if r == n or bool(problem.dead.all()):  # all channels dead: every level behaves as r = n
        return Solution(torch.zeros_like(problem.W), torch.zeros(0, dtype=torch.long), 1.0)
    if r == 0:
        return solution_for_kept(problem, torch.arange(n), size)
    groups = group_rows(n, size, problem.W.device)
    order = removal_order(
        problem, groups, schedule_steps(r, schedule, rounds, per_step), saliency, consume=consume
    )
    return solution_for_kept(problem, _kept_after(n, order, problem.W.device), size)


def magnitude_order(W: Tensor, size: int) -> list[int]:
    """Baseline: groups ordered by the L2 norm of their rows, smallest first."""
    n = W.shape[0] // size
    norms = W.detach().double().reshape(n, size * W.shape[1]).norm(dim=1)
    return [int(i) for i in torch.argsort(norms, stable=True)]
