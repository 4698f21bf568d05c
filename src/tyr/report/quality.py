"""Derived quality numbers of a run (docs/protocol.md §5): mean accuracy, retention and
above-chance retention, in the protocol's task order."""

from __future__ import annotations

from typing import Any

from tyr.data import CHANCE

__all__ = [
    "TASK_NAMES",
    "ABOVE_CHANCE_MIN",
    "accuracies",
    "mean_accuracy",
    "above_chance_retention",
    "in_order",
]

ABOVE_CHANCE_MIN = 0.05  # a task counts when dense is at least 5 points above chance (docs/protocol.md)
TASK_NAMES = {
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "boolq": "BoolQ",
    "hellaswag": "HellaSwag",
    "openbookqa": "OpenBookQA",
    "rte": "RTE",
    "winogrande": "WinoGrande",
    "piqa": "PIQA",
    "mmlu": "MMLU",
}


def accuracies(ev: dict[str, Any] | None) -> dict[str, float]:
    if ev is None:
        return {}
    return {
        k: float(v["acc"]) for k, v in ev["tasks"].items() if isinstance(v, dict) and v.get("acc") is not None
    }


def mean_accuracy(accs: dict[str, float], tasks: list[str]) -> float | None:
    """Unweighted mean of `accs` over `tasks` (None when there are none)."""
    return sum(accs[t] for t in tasks) / len(tasks) if tasks else None


def above_chance_retention(
    dense: dict[str, float], pruned: dict[str, float]
) -> tuple[float | None, list[str], float, float]:
    """docs/protocol.md's Σ(acc − chance) pruned ÷ Σ(acc − chance) dense over the tasks both ran that
    have a chance level and where dense is at least 5 points above it.

    Returns (retention or None when no task qualifies, the tasks used, dense sum, pruned sum).
    """
    used = [
        t
        for t in in_order(set(dense) & set(pruned))
        if t in CHANCE and dense[t] - CHANCE[t] >= ABOVE_CHANCE_MIN - 1e-12
    ]
    d = sum(dense[t] - CHANCE[t] for t in used)
    p = sum(pruned[t] - CHANCE[t] for t in used)
    return (p / d if used else None), used, d, p


def in_order(tasks: set[str] | list[str]) -> list[str]:
    """Known tasks in the protocol's order, then the others by name."""
    known = [t for t in TASK_NAMES if t in tasks]
    return known + sorted(t for t in tasks if t not in TASK_NAMES)
