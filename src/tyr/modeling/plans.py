"""Heterogeneous-width blocks: per-layer head counts, KV mapping and FFN widths.

Stock transformers attention assumes the config's uniform head counts, so a pruned block gets
:class:`TyrAttention`, which gathers K/V heads by ``q_to_kv`` and skips attention entirely when
a layer keeps no query head (docs/algorithm.md §3.1, §11.3, §11.9). MLPs keep their class and get
smaller Linears.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from tyr import arch
from tyr.arch import ArchSpec
from tyr.budget import HeadLayout, Shape, layout
from tyr.modeling.modeling_tyr import TyrAttention, TyrMLP, activation, attention_extras
from tyr.modeling.surgery import compact_cols, expand_cols, slice_gate_up, slice_qkv
from tyr.stream import LazyModel, editing

__all__ = [
    "LayerPlan",
    "TyrAttention",
    "set_attention",
    "set_mlp",
    "apply_plans",
    "mask_plans",
    "plans_metadata",
    "unfuse",
]


@dataclass
class LayerPlan:
    """A pruned block: kept heads and neurons, and the compact refitted consumer weights.

    o_weight: [d, |kept_q|·d_h], down_weight: [d, |kept_neurons|] (Linear orientation); None
    when the block's own o_proj / down_proj already hold them, masked (zero columns for the
    removed units): a lazy model's pruned block keeps them on disk, not in the plan.
    """

    heads: HeadLayout
    kept_neurons: tuple[int, ...]
    o_weight: Tensor | None
    down_weight: Tensor | None

    def consumers(self, o: Tensor, down: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
        """The compact o_proj and down_proj weights, from the plan or from the masked `o`, `down`."""
        return (
            self.o_weight if self.o_weight is not None else compact_cols(o, self.heads.kept_q, head_dim),
            self.down_weight if self.down_weight is not None else compact_cols(down, self.kept_neurons, 1),
        )


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(1, 1, bias=bias is not None, device="meta")  # shapes set below; no init
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return lin


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
        copy.deepcopy(dense.q_norm),  # tiny; a module shared with `dense` would move with it
        copy.deepcopy(dense.k_norm),
        spec.attention_names,
        **attention_extras(dense.module),
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


def apply_plans(
    model: nn.Module,
    plans: list[LayerPlan | None],
    spec: ArchSpec,
    shape: Shape,
    lazy: LazyModel | None = None,
) -> nn.Module:
    """Replace each planned block's projections by physically smaller ones (in place; a block
    of a lazy model is read, changed and spilled)."""
    for idx, (layer, plan) in enumerate(zip(arch.layers(model, spec), plans, strict=True)):
        if plan is None:
            continue
        with editing(layer, lazy):
            a, m = arch.attention_parts(layer, spec), arch.mlp_parts(layer, spec)
            o, down = plan.consumers(a.o.weight.data, m.down.weight.data, shape.head_dim)
            set_attention(layer, spec, shape, idx, a, plan.heads, o)
            set_mlp(layer, spec, m, plan.kept_neurons, down)
    return model


def mask_plans(model: nn.Module, plans: list[LayerPlan | None], spec: ArchSpec, shape: Shape) -> nn.Module:
    """The full-size equivalent: refitted o_proj/down_proj with zero columns for removed units."""
    for layer, plan in zip(arch.layers(model, spec), plans, strict=True):
        if plan is None:
            continue
        a, m = arch.attention_parts(layer, spec), arch.mlp_parts(layer, spec)
        assert plan.o_weight is not None and plan.down_weight is not None, "a plan without its weights"
        a.o.weight.data.copy_(expand_cols(plan.o_weight, plan.heads.kept_q, shape.head_dim, shape.n_q))
        m.down.weight.data.copy_(expand_cols(plan.down_weight, plan.kept_neurons, 1, shape.intermediate))
    return model


def plans_metadata(plans: list[LayerPlan | None], shape: Shape) -> list[dict]:
    """Per-layer widths as stored with a pruned checkpoint (docs/algorithm.md §2.5)."""
    out = []
    for plan in plans:
        if plan is None:
            heads = layout(range(shape.n_q), shape.n_q, shape.n_kv)
            neurons = shape.intermediate
        else:
            heads, neurons = plan.heads, len(plan.kept_neurons)
        out.append({**{k: list(v) for k, v in asdict(heads).items()}, "intermediate": neurons})
    return out


def unfuse(model: nn.Module, spec: ArchSpec) -> nn.Module:
    """Split a family's fused projections (Phi-3's qkv_proj and gate_up_proj) into the separate
    q/k/v and gate/up Linears named by `spec`, in place; the model computes the same function.
    A no-op for families without fused projections."""
    if spec.qkv is None and spec.gate_up is None:
        return model
    cfg: Any = model.config
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    for idx, layer in enumerate(arch.layers(model, spec)):
        attn, mlp = getattr(layer, spec.attn), getattr(layer, spec.mlp)
        if spec.qkv is not None and isinstance(getattr(attn, spec.qkv, None), nn.Linear):
            w, b = _pair(getattr(attn, spec.qkv))
            cuts = [0, n_q * head_dim, (n_q + n_kv) * head_dim, (n_q + 2 * n_kv) * head_dim]
            q, k, v = (
                _linear(w[lo:hi], b[lo:hi] if b is not None else None)
                for lo, hi in zip(cuts, cuts[1:], strict=False)
            )
            new = TyrAttention(
                q,
                k,
                v,
                getattr(attn, spec.o),
                [h // (n_q // n_kv) for h in range(n_q)],
                head_dim,
                idx,
                names=spec.attention_names,
                **attention_extras(attn),
            )
            setattr(layer, spec.attn, new)
        if spec.gate_up is not None and isinstance(getattr(mlp, spec.gate_up, None), nn.Linear):
            w, b = _pair(getattr(mlp, spec.gate_up))
            ff = w.shape[0] // 2
            gate = _linear(w[:ff], b[:ff] if b is not None else None)
            up = _linear(w[ff:], b[ff:] if b is not None else None)
            names = (spec.gate, spec.up, spec.down)
            setattr(layer, spec.mlp, TyrMLP(gate, up, getattr(mlp, spec.down), activation(mlp), names))
    return model
