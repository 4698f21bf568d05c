"""The heterogeneous-width model: per-block plans, their application to a model, weight
slicing, and the modeling code that exported checkpoints ship.
"""

from __future__ import annotations

from tyr.modeling import modeling_tyr
from tyr.modeling.plans import (
    LayerPlan,
    TyrAttention,
    apply_plans,
    mask_plans,
    plans_metadata,
    set_attention,
    set_mlp,
    unfuse,
)
from tyr.modeling.surgery import (
    Pair,
    compact_cols,
    expand_cols,
    slice_gate_up,
    slice_qkv,
    take_cols,
    take_rows,
    unit_index,
)

__all__ = [
    "LayerPlan",
    "TyrAttention",
    "set_attention",
    "set_mlp",
    "apply_plans",
    "mask_plans",
    "plans_metadata",
    "unfuse",
    "Pair",
    "unit_index",
    "take_rows",
    "take_cols",
    "compact_cols",
    "expand_cols",
    "slice_qkv",
    "slice_gate_up",
    "modeling_tyr",
]
