"""All model-family knowledge: one declarative spec per family and a registry.

Nothing outside this package spells a module name such as ``q_proj``; the rest of tyr asks
for the parts of a block through :func:`attention_parts` and :func:`mlp_parts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from tyr.budget import Shape
from tyr.errors import UserError

__all__ = [
    "ArchSpec",
    "AttentionParts",
    "MLPParts",
    "Shape",
    "REGISTRY",
    "spec_for",
    "spec_for_config",
    "logit_softcap",
    "attn_implementation",
    "shape_of",
    "layers",
    "attention_parts",
    "mlp_parts",
    "get_module",
    "set_module",
]


@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of a Llama-like decoder live, as attribute paths."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # Per-head RMSNorm weights of size head_dim, shared by all heads: never sliced.
    q_norm: str | None = None
    k_norm: str | None = None
    # Fused projections in the stock class (Phi-3): tyr splits them into q/k/v and gate/up
    # Linears at load time (see tyr.modeling.unfuse) and exports them split.
    qkv: str | None = None
    gate_up: str | None = None
    # True when a block's output is `h + down_proj(...)` with nothing after down_proj, so a
    # change of down_proj's weight changes the block output by exactly Z·ΔWᵀ (used to avoid a
    # third forward pass per block during calibration).
    mlp_output_is_residual: bool = True
    attn_norm: str = "input_layernorm"
    ffn_norm: str = "post_attention_layernorm"
    # Why llama.cpp's per-layer-width architecture (deci: a pre-norm Llama block, SiLU-gated
    # FFN, optional q/k/v/o and FFN biases) cannot express the block; None when it can.
    gguf_unsupported: str | None = None

    @property
    def attention_names(self) -> tuple[str | None, ...]:
        """(q, k, v, o, q_norm, k_norm) attribute names, as :class:`TyrAttention` takes them."""
        return (self.q, self.k, self.v, self.o, self.q_norm, self.k_norm)

    def names(self) -> dict[str, str | None]:
        """Where a block's parts live, as exported checkpoints record it for their modeling code."""
        keys = [
            "layers",
            "attn",
            "q",
            "k",
            "v",
            "o",
            "q_norm",
            "k_norm",
            "mlp",
            "gate",
            "up",
            "down",
            "qkv",
            "gate_up",
        ]
        return {k: getattr(self, k) for k in keys}


REGISTRY: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), ("LlamaForCausalLM",)),
    ArchSpec("mistral", ("mistral",), ("MistralForCausalLM",)),
    ArchSpec("qwen2", ("qwen2",), ("Qwen2ForCausalLM",)),
    ArchSpec(
        "qwen3",
        ("qwen3",),
        ("Qwen3ForCausalLM",),
        q_norm="q_norm",
        k_norm="k_norm",
        gguf_unsupported="per-head q/k RMSNorm",
    ),
    # Gemma: a norm after o_proj and after down_proj (four per block), scaled embeddings,
    # query_pre_attn_scalar, sliding-window and global layers; Gemma 2 soft-caps attention
    # scores and final logits, Gemma 3 normalises queries and keys per head.
    ArchSpec(
        "gemma2",
        ("gemma2",),
        ("Gemma2ForCausalLM",),
        mlp_output_is_residual=False,
        gguf_unsupported="four norms per block, scaled embeddings and soft-capping",
    ),
    # Phi-3: one qkv_proj and one gate_up_proj per block, split on load.
    ArchSpec(
        "phi3",
        ("phi3",),
        ("Phi3ForCausalLM",),
        qkv="qkv_proj",
        gate_up="gate_up_proj",
        gguf_unsupported="not yet checked against llama.cpp (partial rotary and long-rope variants)",
    ),
    ArchSpec(
        "gemma3",
        ("gemma3_text",),
        ("Gemma3ForCausalLM",),
        q_norm="q_norm",
        k_norm="k_norm",
        mlp_output_is_residual=False,
        gguf_unsupported="four norms per block, per-head q/k RMSNorm and scaled embeddings",
    ),
)

# Families tyr recognises but cannot prune, with what is missing.
UNSUPPORTED: dict[str, str] = {
    "gemma3": "the multimodal Gemma 3 (vision tower); prune its text model (Gemma3ForCausalLM)",
    "mixtral": "mixture-of-experts FFNs (expert routing) are not supported",
    "qwen2_moe": "mixture-of-experts FFNs (expert routing) are not supported",
    "qwen3_moe": "mixture-of-experts FFNs (expert routing) are not supported",
    "deepseek_v2": "multi-head latent attention (MLA) and mixture-of-experts FFNs are not supported",
    "deepseek_v3": "multi-head latent attention (MLA) and mixture-of-experts FFNs are not supported",
}


def supported() -> str:
    return ", ".join(f"{s.name} ({'/'.join(s.architectures)})" for s in REGISTRY)


def spec_for_config(config: Any) -> ArchSpec:
    """Look a family up by ``config.architectures`` first, then ``model_type``; never by hub name."""
    archs = tuple(getattr(config, "architectures", None) or ())
    for spec in REGISTRY:
        if any(a in spec.architectures for a in archs):
            return spec
    model_type = getattr(config, "model_type", None)
    for spec in REGISTRY:
        if model_type in spec.model_types:
            return spec
    found = "/".join(archs) or str(model_type)
    why = UNSUPPORTED.get(str(model_type))
    if why is None and any(
        getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts")
    ):
        why = "mixture-of-experts FFNs (expert routing) are not supported"
    if why is None and getattr(config, "kv_lora_rank", None):
        why = "multi-head latent attention (MLA) is not supported"
    raise UserError(
        f"unsupported architecture {found!r}" + (f": {why}" if why else ""),
        f"tyr supports: {supported()}",
    )


def attn_implementation(config: Any) -> str:
    """SDPA, except for soft-capped attention scores (Gemma 2), which only eager computes."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def logit_softcap(model: nn.Module) -> float | None:
    """Gemma 2/3's final logit soft-capping c (logits → c·tanh(logits / c)), or None."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def spec_for(model: nn.Module) -> ArchSpec:
    return spec_for_config(model.config)


def get_module(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    return get_module(model, (spec or spec_for(model)).layers)


@dataclass
class AttentionParts:
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None


@dataclass
class MLPParts:
    module: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def attention_parts(layer: nn.Module, spec: ArchSpec) -> AttentionParts:
    attn = getattr(layer, spec.attn)
    return AttentionParts(
        module=attn,
        q=getattr(attn, spec.q),
        k=getattr(attn, spec.k),
        v=getattr(attn, spec.v),
        o=getattr(attn, spec.o),
        q_norm=getattr(attn, spec.q_norm) if spec.q_norm else None,
        k_norm=getattr(attn, spec.k_norm) if spec.k_norm else None,
    )


def mlp_parts(layer: nn.Module, spec: ArchSpec) -> MLPParts:
    mlp = getattr(layer, spec.mlp)
    return MLPParts(
        module=mlp, gate=getattr(mlp, spec.gate), up=getattr(mlp, spec.up), down=getattr(mlp, spec.down)
    )


def shape_of(model: nn.Module, spec: ArchSpec | None = None) -> Shape:
    """Dimensions of the dense model, read from its first block's tensors and its config."""
    spec = spec or spec_for(model)
    cfg: Any = model.config
    first = layers(model, spec)[0]
    a, m = attention_parts(first, spec), mlp_parts(first, spec)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Shape(
        hidden=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_q=cfg.num_attention_heads,
        n_kv=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        intermediate=m.gate.out_features,
        q_bias=a.q.bias is not None,
        kv_bias=a.k.bias is not None,
        o_bias=a.o.bias is not None,
        mlp_bias=m.gate.bias is not None,
        down_bias=m.down.bias is not None,
    )


def block_linears(layer: nn.Module, spec: ArchSpec) -> list[nn.Linear]:
    """The seven prunable projections of a block, whose tensors P_blk counts (§2.2)."""
    a, m = attention_parts(layer, spec), mlp_parts(layer, spec)
    return [a.q, a.k, a.v, a.o, m.gate, m.up, m.down]


def count_block_params(model: nn.Module, spec: ArchSpec | None = None) -> int:
    """P_blk counted on the tensors (weights and biases of q,k,v,o,gate,up,down)."""
    spec = spec or spec_for(model)
    total = 0
    for layer in layers(model, spec):
        for lin in block_linears(layer, spec):
            total += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
    return total


def count_total_params(model: nn.Module) -> int:
    """All distinct parameters (a tied lm_head counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
