"""Pure weight slicing (ALGORITHM.md §2.5, §3): producer rows and consumer columns.

Tensors are in ``nn.Linear`` orientation: weight [out_features, in_features], bias [out_features].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["unit_index", "take_rows", "take_cols", "slice_attention", "slice_mlp"]


def unit_index(units: Sequence[int], size: int, device: torch.device | None = None) -> Tensor:
    """Row/column indices of whole units of `size` consecutive channels, ascending units."""
    u = torch.as_tensor(list(units), dtype=torch.long, device=device)
    return (u[:, None] * size + torch.arange(size, device=device)).reshape(-1)


def take_rows(weight: Tensor, bias: Tensor | None, idx: Tensor) -> tuple[Tensor, Tensor | None]:
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


Pair = tuple[Tensor, Tensor | None]


def slice_attention(
    q: Pair, k: Pair, v: Pair, o_weight: Tensor, kept_q: Sequence[int], kept_kv: Sequence[int], head_dim: int
) -> tuple[Pair, Pair, Pair, Tensor]:
    """q rows of kept query heads, k/v rows of kept KV heads, o_proj columns of kept query heads.

    o_weight: [d, n_q·d_h] (the refitted weight, zero in removed heads' columns).
    """
    qi = unit_index(kept_q, head_dim)
    kvi = unit_index(kept_kv, head_dim)
    q2, k2, v2 = take_rows(*q, qi), take_rows(*k, kvi), take_rows(*v, kvi)
    o2 = take_cols(o_weight, qi)
    assert o2.shape[1] == q2[0].shape[0] and k2[0].shape == v2[0].shape
    return q2, k2, v2, o2


def slice_mlp(gate: Pair, up: Pair, down_weight: Tensor, kept: Sequence[int]) -> tuple[Pair, Pair, Tensor]:
    """gate/up rows and down_proj columns of the kept neurons."""
    idx = unit_index(kept, 1)
    g2, u2 = take_rows(*gate, idx), take_rows(*up, idx)
    d2 = take_cols(down_weight, idx)
    assert g2[0].shape == u2[0].shape and d2.shape[1] == g2[0].shape[0]
    return g2, u2, d2
