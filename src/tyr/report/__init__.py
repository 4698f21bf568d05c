"""Accounting: the report of a finished run, deployment speed and memory, and the plan that
estimates a run before it starts.
"""

from __future__ import annotations

from tyr.report.document import (
    PLOTS,
    build_report,
    dense_source,
    ensure_evals,
    read_evals,
    weights_bytes,
)
from tyr.report.plan import (
    FORWARD_FLOPS_PER_S_2T,
    GPUS,
    LOCAL_SOLVE_FACTOR,
    REFERENCE,
    Dims,
    dims_of,
    estimate,
    format_plan,
    load_config,
)
from tyr.report.quality import (
    ABOVE_CHANCE_MIN,
    TASK_NAMES,
    above_chance_retention,
    accuracies,
    in_order,
    mean_accuracy,
)
from tyr.report.speed import (
    cost_per_million,
    measure,
    measure_in_subprocess,
    peak_memory_bytes,
    peak_rss_bytes,
)

__all__ = [
    "PLOTS",
    "build_report",
    "ensure_evals",
    "dense_source",
    "read_evals",
    "weights_bytes",
    "TASK_NAMES",
    "ABOVE_CHANCE_MIN",
    "accuracies",
    "mean_accuracy",
    "above_chance_retention",
    "in_order",
    "measure",
    "measure_in_subprocess",
    "cost_per_million",
    "peak_memory_bytes",
    "peak_rss_bytes",
    "Dims",
    "REFERENCE",
    "FORWARD_FLOPS_PER_S_2T",
    "GPUS",
    "LOCAL_SOLVE_FACTOR",
    "load_config",
    "dims_of",
    "estimate",
    "format_plan",
]
