"""Decoder blocks of per-layer widths, for checkpoints pruned by tyr.

tyr copies this file into every directory it exports, where ``config.json`` maps
``AutoModelForCausalLM`` to ``modeling_tyr.Tyr<Base>ForCausalLM`` so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

works with only torch and transformers installed. It must not import tyr.

How a pruned checkpoint is described (``config.json``):
- the base family's own fields, unchanged (the dense model's global widths);
- ``per_layer_config``: transformers' per-layer overrides, here each block's ``intermediate_size``
  where it differs (head counts do not fit there: the Llama-family configs validate
  ``hidden_size % num_attention_heads`` on the global value);
- ``tyr``: the attribute names of the base family's block parts, ``head_dim``, and per block the
  kept query and KV heads with ``q_to_kv`` (for each kept query head, the index of its KV head
  among the kept ones) and the FFN width.

The model is the stock transformers class of the base family, built from the dense config,
whose attention and MLP projections are then swapped for the pruned sizes; state-dict keys stay
those of the base family.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

TRANSFORMERS_FLOOR = (5, 14)  # the first release with `per_layer_config`


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


if _version(transformers.__version__) < TRANSFORMERS_FLOOR:
    raise ImportError(
        f"this pruned checkpoint needs transformers >= {'.'.join(map(str, TRANSFORMERS_FLOOR))} "
        f"(found {transformers.__version__}); run: pip install -U transformers"
    )


def rotary_apply(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding in rotate-half form. q, k: [B, heads, T, d_h]; cos, sin: [B, T, r] with
    r ≤ d_h (partial rotary: the last d_h − r channels pass through unrotated)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]

    def rotate(x: Tensor) -> Tensor:
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
        out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)

    return rotate(q), rotate(k)


class TyrAttention(nn.Module):
    """Attention with any number of query and KV heads and an explicit query→KV map.

    `names` are the family's attribute names of (q, k, v, o, q_norm, k_norm), so that state-dict
    keys match the stock model's; a norm's name is None when the family has none.
    """

    def __init__(
        self,
        q: nn.Linear,
        k: nn.Linear,
        v: nn.Linear,
        o: nn.Linear,
        q_to_kv: tuple[int, ...] | list[int],
        head_dim: int,
        layer_idx: int,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        names: tuple[str | None, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", None, None),
        scaling: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self._names = tuple(names)
        for name, mod in zip(self._names, (q, k, v, o, q_norm, k_norm), strict=True):
            if name is not None and mod is not None:
                setattr(self, name, mod)
        # A plain tuple, not a buffer: checkpoint loading builds modules on the meta device and
        # would leave a non-persistent buffer uninitialised. The index tensor is made per device.
        self.q_to_kv = tuple(int(i) for i in q_to_kv)
        self._index: Tensor | None = None
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scaling = head_dim**-0.5 if scaling is None else float(scaling)
        self.softcap = softcap  # Gemma 2: scores → c·tanh(scores / c) before the mask
        self.is_causal = True

    def _kv_index(self, device: torch.device) -> Tensor:
        if self._index is None or self._index.device != device:
            # A normal tensor even when first made under inference mode (an evaluation): a
            # cached inference tensor could not be saved for a later backward (training).
            with torch.inference_mode(False):
                self._index = torch.tensor(self.q_to_kv, dtype=torch.long, device=device)
        return self._index

    def _part(self, i: int) -> Any:
        name = self._names[i]
        return getattr(self, name, None) if name is not None else None

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        q_lin, k_lin, v_lin, o_lin, q_norm, k_norm = (self._part(i) for i in range(6))
        B, T, _ = hidden_states.shape
        cache = cache if cache is not None else past_key_values
        if not self.q_to_kv:  # the whole attention sub-layer was removed
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
        assert position_embeddings is not None, "the base model passes rotary position embeddings"
        q, k = rotary_apply(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        index = self._kv_index(k.device)
        k = k.index_select(1, index)  # [B, q, S, d_h]
        v = v.index_select(1, index)
        mask = attention_mask[:, :, :, : k.shape[-2]] if attention_mask is not None else None
        if self.softcap is not None:
            out = self._capped(q, k, v, mask)
        elif mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scaling)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return o_lin(out), None

    def _capped(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention with soft-capped scores (no fused kernel has it), softmax in fp32."""
        assert self.softcap is not None
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        scores = torch.tanh(scores / self.softcap) * self.softcap
        T, S = q.shape[-2], k.shape[-2]
        if mask is None:  # causal, queries at the last T of S positions
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class TyrMLP(nn.Module):
    """down(act(gate(x)) · up(x)) with separate gate and up projections: the MLP of families
    whose stock class fuses them (Phi-3's gate_up_proj), under the names in `names`."""

    def __init__(
        self,
        gate: nn.Linear,
        up: nn.Linear,
        down: nn.Linear,
        act: nn.Module,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        super().__init__()
        self._names = names
        for name, mod in zip(names, (gate, up, down), strict=True):
            setattr(self, name, mod)
        self.act_fn = act

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        return down(self.act_fn(gate(x)) * up(x))


def activation(mlp: nn.Module) -> nn.Module:
    """The activation module of a stock MLP (families name it differently)."""
    for name in ("act_fn", "activation_fn"):
        if isinstance(getattr(mlp, name, None), nn.Module):
            return getattr(mlp, name)
    raise AttributeError(f"{type(mlp).__name__} has no activation module")


def attention_extras(attn: nn.Module) -> dict[str, Any]:
    """What an attention module scales and caps its scores by, for :class:`TyrAttention`."""
    if isinstance(attn, TyrAttention):
        return {"scaling": attn.scaling, "softcap": attn.softcap}
    cap = getattr(attn, "attn_logit_softcapping", None)
    return {"scaling": getattr(attn, "scaling", None), "softcap": float(cap) if cap else None}


def _module(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _resized(lin: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear of the new size on `lin`'s device and dtype (meta stays meta)."""
    w = lin.weight
    with warnings.catch_warnings():  # a removed sub-layer has zero-size weights; nothing to init
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        return nn.Linear(in_features, out_features, bias=lin.bias is not None, device=w.device, dtype=w.dtype)


def narrow(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """Give each block of a stock model the widths of ``config.tyr`` (in place; weights are to be
    loaded afterwards)."""
    names, head_dim = meta["names"], int(meta["head_dim"])
    attn_names = tuple(names.get(p) for p in ("q", "k", "v", "o", "q_norm", "k_norm"))
    blocks = _module(model, names["layers"])
    if len(blocks) != len(meta["layers"]):
        raise ValueError(f"config.tyr describes {len(meta['layers'])} blocks, the model has {len(blocks)}")
    for idx, (layer, row) in enumerate(zip(blocks, meta["layers"], strict=True)):
        attn = getattr(layer, names["attn"])
        o = getattr(attn, names["o"])
        if names.get("qkv"):  # a fused stock projection: the split ones take its input and bias
            q = k = v = getattr(attn, names["qkv"])
        else:
            q, k, v = (getattr(attn, names[p]) for p in ("q", "k", "v"))
        n_q, n_kv = len(row["q_to_kv"]), len(row["kept_kv"])
        norms = [getattr(attn, n) if n else None for n in attn_names[4:]]
        new = TyrAttention(
            _resized(q, q.in_features, n_q * head_dim),
            _resized(k, k.in_features, n_kv * head_dim),
            _resized(v, v.in_features, n_kv * head_dim),
            _resized(o, n_q * head_dim, o.out_features),
            row["q_to_kv"],
            head_dim,
            idx,
            norms[0],
            norms[1],
            attn_names,
            **attention_extras(attn),
        )
        setattr(layer, names["attn"], new)
        mlp, width = getattr(layer, names["mlp"]), int(row["intermediate"])
        down = getattr(mlp, names["down"])
        if names.get("gate_up"):
            fused = getattr(mlp, names["gate_up"])
            new_mlp = TyrMLP(
                _resized(fused, fused.in_features, width),
                _resized(fused, fused.in_features, width),
                _resized(down, width, down.out_features),
                activation(mlp),
                (names["gate"], names["up"], names["down"]),
            )
            setattr(layer, names["mlp"], new_mlp)
            continue
        gate, up = (getattr(mlp, names[p]) for p in ("gate", "up"))
        setattr(mlp, names["gate"], _resized(gate, gate.in_features, width))
        setattr(mlp, names["up"], _resized(up, up.in_features, width))
        setattr(mlp, names["down"], _resized(down, width, down.out_features))
    return model


def dense_config(config: Any) -> Any:
    """A copy of `config` without per-layer overrides: the stock class builds the dense shapes
    from it, which :func:`narrow` then resizes."""
    config = copy.deepcopy(config)
    if getattr(config, "is_heterogeneous", False):
        config.per_layer_config = None
    return config


def pruned_class(base: type) -> type:
    """The subclass of a stock ``*ForCausalLM`` class that builds per-layer widths."""

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        config = dense_config(config)
        base.__init__(self, config, *args, **kwargs)  # type: ignore[misc]
        narrow(self, config.tyr)

    name = f"Tyr{base.__name__}"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


def __getattr__(name: str) -> type:
    """``Tyr<Base>ForCausalLM`` for any stock ``<Base>ForCausalLM`` of transformers."""
    base = name[3:] if name.startswith("Tyr") and name.endswith("ForCausalLM") else None
    if base is None or not hasattr(transformers, base):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = pruned_class(getattr(transformers, base))
    globals()[name] = cls
    return cls
