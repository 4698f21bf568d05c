"""Pure weight slicing (docs/algorithm.md §2.5, §3): producer rows and consumer columns.

Tensors are in ``nn.Linear`` orientation: weight [out_features, in_features], bias [out_features].
A *compact* consumer weight holds only the input columns of kept units, in ascending unit order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Pair",
    "unit_index",
    "take_rows",
    "take_cols",
    "compact_cols",
    "expand_cols",
    "slice_qkv",
    "slice_gate_up",
]

Pair = tuple[Tensor, Tensor | None]


def unit_index(units: Sequence[int], size: int, device: torch.device | None = None) -> Tensor:
    """Row/column indices of whole units of `size` consecutive channels, ascending units."""
    u = torch.as_tensor(list(units), dtype=torch.long, device=device)
    return (u[:, None] * size + torch.arange(size, device=device)).reshape(-1)


def take_rows(weight: Tensor, bias: Tensor | None, idx: Tensor) -> Pair:
    """Keep output channels `idx` of a producer (rows of the Linear weight, entries of its bias)."""
    w = weight.index_select(0, idx.to(weight.device)).contiguous()
    b = None if bias is None else bias.index_select(0, idx.to(bias.device)).contiguous()
    assert w.shape == (idx.numel(), weight.shape[1])
    return w, b


def take_cols(weight: Tensor, idx: Tensor) -> Tensor:
    """Keep input channels `idx` of a consumer (columns of the Linear weight)."""
    w = weight.index_select(1, idx.to(weight.device)).contiguous()
    assert w.shape == (weight.shape[0], idx.numel())
    return w


def compact_cols(full: Tensor, kept: Sequence[int], size: int) -> Tensor:
    """[d_out, n·size] → [d_out, |kept|·size]: the consumer columns of the kept units."""
    return take_cols(full, unit_index(kept, size))


def expand_cols(compact: Tensor, kept: Sequence[int], size: int, n: int) -> Tensor:
    """Inverse of :func:`compact_cols`: zero columns for the units that are not kept."""
    full = compact.new_zeros(compact.shape[0], n * size)
    full[:, unit_index(kept, size, compact.device)] = compact
    return full


def slice_qkv(q: Pair, k: Pair, v: Pair, kept_q: Sequence[int], kept_kv: Sequence[int], head_dim: int):
    """q rows of the kept query heads, k/v rows of the kept KV heads."""
    kvi = unit_index(kept_kv, head_dim)
    q2, k2, v2 = take_rows(*q, unit_index(kept_q, head_dim)), take_rows(*k, kvi), take_rows(*v, kvi)
    assert k2[0].shape == v2[0].shape
    return q2, k2, v2


def slice_gate_up(gate: Pair, up: Pair, kept: Sequence[int]) -> tuple[Pair, Pair]:
    """gate/up rows of the kept neurons."""
    idx = unit_index(kept, 1)
    g2, u2 = take_rows(*gate, idx), take_rows(*up, idx)
    assert g2[0].shape == u2[0].shape
    return g2, u2
