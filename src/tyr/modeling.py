"""Heterogeneous-width blocks: per-layer head counts, KV mapping and FFN widths.

Stock transformers attention assumes the config's uniform head counts, so a pruned block gets
:class:`TyrAttention`, which gathers K/V heads by ``q_to_kv`` and skips attention entirely when
a layer keeps no query head (ALGORITHM.md §3.1, §11.3, §11.9). MLPs keep their class and get
smaller Linears.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tyr import arch
from tyr.arch import ArchSpec, Shape
from tyr.gqa import HeadLayout, layout
from tyr.surgery import expand_cols, slice_gate_up, slice_qkv

__all__ = [
    "LayerPlan",
    "TyrAttention",
    "set_attention",
    "set_mlp",
    "apply_plans",
    "mask_plans",
    "plans_metadata",
    "empty_plans",
]


@dataclass
class LayerPlan:
    """A pruned block: kept heads and neurons, and the compact refitted consumer weights.

    o_weight: [d, |kept_q|·d_h], down_weight: [d, |kept_neurons|] (Linear orientation).
    """

    heads: HeadLayout
    kept_neurons: tuple[int, ...]
    o_weight: Tensor
    down_weight: Tensor


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(1, 1, bias=bias is not None, device="meta")  # shapes set below; no init
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin


class TyrAttention(nn.Module):
    """Attention with any number of query and KV heads and an explicit query→KV map."""

    def __init__(
        self,
        q: nn.Linear,
        k: nn.Linear,
        v: nn.Linear,
        o: nn.Linear,
        q_to_kv: tuple[int, ...],
        head_dim: int,
        layer_idx: int,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        names: ArchSpec | None = None,
    ) -> None:
        super().__init__()
        spec = names or arch.REGISTRY[0]
        # Keep the family's attribute names so state-dict keys match the stock model's.
        self._names = (spec.q, spec.k, spec.v, spec.o, spec.q_norm, spec.k_norm)
        for name, mod in zip(self._names, (q, k, v, o, q_norm, k_norm), strict=True):
            if name is not None and mod is not None:
                setattr(self, name, mod)
        self.register_buffer("q_to_kv", torch.tensor(q_to_kv, dtype=torch.long), persistent=False)
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scaling = head_dim**-0.5
        self.is_causal = True

    def _part(self, i: int) -> Any:
        name = self._names[i]
        return getattr(self, name) if name is not None else None

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        q_lin, k_lin, v_lin, o_lin, q_norm, k_norm = (self._part(i) for i in range(6))
        assert q_lin is not None and k_lin is not None and v_lin is not None and o_lin is not None
        B, T, _ = hidden_states.shape
        q_to_kv: Tensor = self.get_buffer("q_to_kv")
        cache = cache if cache is not None else past_key_values
        if q_to_kv.numel() == 0:  # the whole attention sub-layer was removed
            if cache is not None:  # one never-read zero head keeps the cache's length right
                blank = hidden_states.new_zeros(B, 1, T, self.head_dim)
                cache.update(blank, blank, self.layer_idx)
            out = hidden_states.new_zeros(B, T, o_lin.out_features)
            return (out + o_lin.bias if o_lin.bias is not None else out), None
        q = q_lin(hidden_states).view(B, T, -1, self.head_dim)
        k = k_lin(hidden_states).view(B, T, -1, self.head_dim)
        v = v_lin(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        assert position_embeddings is not None
        q, k = arch.rotary_apply(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        k = k.index_select(1, q_to_kv)  # [B, q, S, d_h]
        v = v.index_select(1, q_to_kv)
        if attention_mask is not None:
            mask = attention_mask[:, :, :, : k.shape[-2]]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scaling)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return o_lin(out), None


def _pair(lin: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return lin.weight.data, (lin.bias.data if lin.bias is not None else None)


def set_attention(
    layer: nn.Module,
    spec: ArchSpec,
    shape: Shape,
    layer_idx: int,
    dense: arch.AttentionParts,
    heads: HeadLayout,
    o_compact: Tensor,
) -> None:
    """Give `layer` a physically smaller attention: q/k/v rows of the kept heads of `dense`
    and the compact o_proj weight."""
    (qw, qb), (kw, kb), (vw, vb) = slice_qkv(
        _pair(dense.q), _pair(dense.k), _pair(dense.v), heads.kept_q, heads.kept_kv, shape.head_dim
    )
    assert o_compact.shape == (dense.o.out_features, len(heads.kept_q) * shape.head_dim)
    o_bias = dense.o.bias.data if dense.o.bias is not None else None
    attn = TyrAttention(
        _linear(qw, qb),
        _linear(kw, kb),
        _linear(vw, vb),
        _linear(o_compact.to(dense.o.weight), o_bias),
        heads.q_to_kv,
        shape.head_dim,
        layer_idx,
        dense.q_norm,
        dense.k_norm,
        spec,
    )
    setattr(layer, spec.attn, attn)


def set_mlp(
    layer: nn.Module, spec: ArchSpec, dense: arch.MLPParts, kept: Sequence[int], down_compact: Tensor
) -> None:
    """Give `layer`'s MLP the gate/up rows of the kept neurons of `dense` and the compact down_proj."""
    (gw, gb), (uw, ub) = slice_gate_up(_pair(dense.gate), _pair(dense.up), kept)
    assert down_compact.shape == (dense.down.out_features, len(kept))
    mlp = getattr(layer, spec.mlp)
    down_bias = dense.down.bias.data if dense.down.bias is not None else None
    setattr(mlp, spec.gate, _linear(gw, gb))
    setattr(mlp, spec.up, _linear(uw, ub))
    setattr(mlp, spec.down, _linear(down_compact.to(dense.down.weight), down_bias))


def apply_plans(model: nn.Module, plans: list[LayerPlan | None], spec: ArchSpec, shape: Shape) -> nn.Module:
    """Replace each planned block's projections by physically smaller ones (in place)."""
    for idx, (layer, plan) in enumerate(zip(arch.layers(model, spec), plans, strict=True)):
        if plan is None:
            continue
        a, m = arch.attention_parts(layer, spec), arch.mlp_parts(layer, spec)
        set_attention(layer, spec, shape, idx, a, plan.heads, plan.o_weight)
        set_mlp(layer, spec, m, plan.kept_neurons, plan.down_weight)
    return model


def mask_plans(model: nn.Module, plans: list[LayerPlan | None], spec: ArchSpec, shape: Shape) -> nn.Module:
    """The full-size equivalent: refitted o_proj/down_proj with zero columns for removed units."""
    for layer, plan in zip(arch.layers(model, spec), plans, strict=True):
        if plan is None:
            continue
        a, m = arch.attention_parts(layer, spec), arch.mlp_parts(layer, spec)
        a.o.weight.data.copy_(expand_cols(plan.o_weight, plan.heads.kept_q, shape.head_dim, shape.n_q))
        m.down.weight.data.copy_(expand_cols(plan.down_weight, plan.kept_neurons, 1, shape.intermediate))
    return model


def plans_metadata(plans: list[LayerPlan | None], shape: Shape) -> list[dict]:
    """Per-layer widths as stored with a pruned checkpoint (ALGORITHM.md §2.5)."""
    out = []
    for plan in plans:
        if plan is None:
            heads = layout(range(shape.n_q), shape.n_q, shape.n_kv)
            neurons = shape.intermediate
        else:
            heads, neurons = plan.heads, len(plan.kept_neurons)
        out.append({**{k: list(v) for k, v in asdict(heads).items()}, "intermediate": neurons})
    return out


def empty_plans(meta: list[dict], shape: Shape, dtype: torch.dtype) -> list[LayerPlan | None]:
    """Plans with the stored widths and placeholder weights, to rebuild a pruned model's shapes."""
    plans: list[LayerPlan | None] = []
    for m in meta:
        heads = HeadLayout(tuple(m["kept_q"]), tuple(m["kept_kv"]), tuple(m["q_to_kv"]))
        plans.append(
            LayerPlan(
                heads=heads,
                kept_neurons=tuple(range(m["intermediate"])),
                o_weight=torch.zeros(shape.hidden, len(heads.kept_q) * shape.head_dim, dtype=dtype),
                down_weight=torch.zeros(shape.hidden, m["intermediate"], dtype=dtype),
            )
        )
    return plans
