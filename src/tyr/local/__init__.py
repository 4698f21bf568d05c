"""Local pruning of one sub-layer at one sparsity: pure tensor math (OBS saliency,
progressive removal, refit) and the GQA attention solvers.
"""

from __future__ import annotations

from tyr.local.gqa import (
    EXHAUSTIVE_SUBSETS,
    GQA_MODES,
    head_subsets,
    prune_attention,
    subset_eps,
)
from tyr.local.solver import (
    DAMP,
    SALIENCIES,
    SCHEDULES,
    OBSState,
    Problem,
    Solution,
    chol_inverse,
    group_rows,
    magnitude_order,
    make_problem,
    obs_remove,
    refit,
    rel_error,
    removal_order,
    schedule_steps,
    scores,
    solution_for_kept,
    solve,
    solve_problem,
)

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
    "GQA_MODES",
    "EXHAUSTIVE_SUBSETS",
    "head_subsets",
    "subset_eps",
    "prune_attention",
]
