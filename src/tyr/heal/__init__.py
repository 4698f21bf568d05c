"""Recovery: distillation of a pruned export from its dense teacher (`tyr heal`)."""

from __future__ import annotations

from tyr.heal.distill import (
    Outcome,
    TrainOptions,
    batch_rows,
    distill_loss,
    lr_factor,
    train,
)
from tyr.heal.run import (
    LOG_FILE,
    heal,
    run_heal,
)

__all__ = [
    "heal",
    "run_heal",
    "LOG_FILE",
    "TrainOptions",
    "Outcome",
    "train",
    "distill_loss",
    "lr_factor",
    "batch_rows",
]
