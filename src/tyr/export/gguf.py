"""GGUF for llama.cpp: a model of per-layer widths as llama.cpp's ``deci`` architecture.

llama.cpp's ``llama`` architecture sizes every layer's tensors from layer 0; ``deci`` (the
Nemotron-NAS port) is the same pre-norm Llama block with per-layer query heads, KV heads and FFN
widths read from arrays, and with attention-free layers. What it cannot say is encoded exactly
with zero weights (docs/serving.md §1.2):

- uneven GQA groups: ggml gives query head h the KV head h // (n_head / n_head_kv), so each
  layer's groups are padded to its largest with zero query heads (zero ``attn_q`` rows and
  ``attn_output`` columns, which contribute nothing);
- layer 0 without query heads (the head size is read from layer 0), and a head-less layer with
  an ``attn_output`` bias: one zero query head and one zero KV head;
- a layer without FFN but with attention or a ``ffn_down`` bias (``n_ff = 0`` skips the whole
  layer, its attention too): 32 zero FFN channels.

Q and K rows are reordered per head from the rotate-half rotary layout of Hugging Face to the
interleaved pairs that llama.cpp's ``deci`` rotates. Weights whose input width is not a multiple
of the quantization block stay in F16 (F32 for an F32 file) and the file lists them under
``tyr.gguf.unquantized``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tyr import arch
from tyr.errors import UserError

__all__ = ["ARCH", "QUANTS", "GGUFSummary", "encode_layer", "write_gguf"]

log = logging.getLogger(__name__)

ARCH = "deci"
FFN_PAD = 32  # zero channels for an FFN-less layer that must keep its attention: one quant block
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


@dataclass
class GGUFLayer:
    """One block as llama.cpp reads it: widths and named tensors (torch Linear orientation)."""

    n_head: int
    n_head_kv: int
    n_ff: int
    padded: int  # zero query heads added
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class GGUFSummary:
    path: str
    quant: str
    bytes: int
    tensors: int
    unquantized: list[str]
    padded_heads: int  # zero query heads added over all layers
    vocab: str  # where the tokenizer came from: gguf, bpe, spm or none

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _interleave(rows: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """Rotate-half row order → interleaved pairs, per head: new row 2i ← i, 2i+1 ← i + d_h/2."""
    if n_heads == 0:
        return rows
    shaped = rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:])
    return shaped.transpose(1, 2).reshape(rows.shape)


def _head_rows(t: Tensor | None, heads: list[int | None], head_dim: int) -> Tensor | None:
    """Rows of the listed heads of a [n·d_h, …] tensor (a bias too); None in `heads` = zero head."""
    if t is None:
        return None
    zero = torch.zeros((head_dim, *t.shape[1:]), dtype=t.dtype)
    parts = [zero if h is None else t[h * head_dim : (h + 1) * head_dim] for h in heads]
    return torch.cat(parts) if parts else t[:0]


def _q_to_kv(attn: nn.Module, n_q: int, n_kv: int) -> list[int]:
    """For each query head, its KV head: the pruned block's map, else the stock GQA one."""
    mapping = getattr(attn, "q_to_kv", None)
    if mapping is not None:
        return [int(j) for j in mapping]
    return [h // (n_q // n_kv) for h in range(n_q)] if n_kv else []


def encode_layer(layer: nn.Module, spec: arch.ArchSpec, head_dim: int, index: int) -> GGUFLayer:
    """The tensors of one block as ``deci`` wants them (see the module docs for the padding)."""
    a, m = arch.attention_parts(layer, spec), arch.mlp_parts(layer, spec)
    n_q, n_kv = a.q.weight.shape[0] // head_dim, a.k.weight.shape[0] // head_dim
    q_to_kv = _q_to_kv(a.module, n_q, n_kv)
    groups = [[h for h in range(n_q) if q_to_kv[h] == j] for j in range(n_kv)]
    width = max((len(g) for g in groups), default=0)
    q_heads: list[int | None] = [g[s] if s < len(g) else None for g in groups for s in range(width)]
    kv_heads: list[int | None] = list(range(n_kv))
    if not q_heads and (index == 0 or a.o.bias is not None):
        q_heads, kv_heads = [None], [None]
    n_head, n_head_kv = len(q_heads), len(kv_heads)
    out = GGUFLayer(n_head, n_head_kv, m.gate.weight.shape[0], n_head - n_q)
    t = out.tensors
    t["attn_norm.weight"] = arch.get_module(layer, spec.attn_norm).weight.detach()
    t["ffn_norm.weight"] = arch.get_module(layer, spec.ffn_norm).weight.detach()
    if n_head:
        o = a.o.weight.detach().T.contiguous()  # [n_q·d_h, d]: heads as rows
        for name, lin, heads, rope in (
            ("attn_q", a.q, q_heads, True),
            ("attn_k", a.k, kv_heads, True),
            ("attn_v", a.v, kv_heads, False),
        ):
            w = _head_rows(lin.weight.detach(), heads, head_dim)
            b = _head_rows(lin.bias.detach() if lin.bias is not None else None, heads, head_dim)
            assert w is not None
            t[f"{name}.weight"] = _interleave(w, len(heads), head_dim) if rope else w
            if b is not None:
                t[f"{name}.bias"] = _interleave(b, len(heads), head_dim) if rope else b
        o_rows = _head_rows(o, q_heads, head_dim)
        assert o_rows is not None
        t["attn_output.weight"] = o_rows.T.contiguous()
    if a.o.bias is not None:
        t["attn_output.bias"] = a.o.bias.detach()
    ffn = [m.gate, m.up, m.down]
    if out.n_ff == 0 and (n_head or m.down.bias is not None):
        out.n_ff = FFN_PAD
        hidden = m.down.weight.shape[0]
        zeros = torch.zeros((FFN_PAD, hidden), dtype=m.down.weight.dtype)
        t["ffn_gate.weight"], t["ffn_up.weight"], t["ffn_down.weight"] = zeros, zeros, zeros.T.contiguous()
    elif out.n_ff:
        for name, lin in zip(("ffn_gate", "ffn_up", "ffn_down"), ffn, strict=True):
            t[f"{name}.weight"] = lin.weight.detach()
    for name, lin in zip(("ffn_gate", "ffn_up", "ffn_down"), ffn, strict=True):
        if lin.bias is not None and out.n_ff:
            bias = lin.bias.detach()
            if name != "ffn_down" and bias.shape[0] < out.n_ff:  # the zero channels' biases
                bias = torch.cat([bias, torch.zeros(out.n_ff - bias.shape[0], dtype=bias.dtype)])
            t[f"{name}.bias"] = bias
    if not out.n_ff:
        t.pop("ffn_norm.weight")
    if not n_head:
        t.pop("attn_norm.weight")
    return out


def gguf_refusal(cfg: Any) -> str | None:
    """Why a model of this config (dense or pruned) cannot be written as ``deci`` GGUF, or None
    when it can; a config alone decides, so `tyr prune --gguf` refuses before any work."""
    spec = arch.spec_for_config(cfg)
    if spec.gguf_unsupported is not None:
        return spec.gguf_unsupported
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        return f"rope type {kind!r}: llama.cpp's deci rotates with per-frequency factors only"
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings: deci rotates the whole head"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention layers: deci attends to the whole context"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}: deci's FFN is SiLU-gated"
    return None


def _rope_factors(cfg: Any) -> Tensor | None:
    """llama.cpp's ``rope_freqs`` (it divides each frequency by its factor): the default inverse
    frequencies over the configured ones, from transformers' own rope functions; None for the
    default rope."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, scale = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    if float(scale) != 1.0:
        raise UserError(f"rope type {kind!r} scales attention by {scale}", "deci has no such scale")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = _theta(cfg)
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (base / scaled.double()).float()


def _qtype(quant: str, name: str, t: Tensor, unquantized: list[str]) -> Any:
    """The GGML type of one tensor: 1-D tensors F32; weights at `quant` when their input width
    takes its block, else F16 (F32 for an F32 file), listed in `unquantized`."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if t.dim() == 1 or quant == "f32":
        return Q.F32
    kind = Q[quant.upper()]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if t.shape[-1] % block:
        unquantized.append(name)
        return Q.F16
    return kind


def _tokenizer(writer: Any, tokenizer_dir: Path | None, source_gguf: Path | None, n_vocab: int) -> str:
    """Carry the tokenizer over: from the GGUF the model came from (exact), else from the HF
    tokenizer files (BPE or SentencePiece, through gguf's vocab readers), else none (token ids
    only, a warning)."""
    import gguf

    if source_gguf is not None and source_gguf.is_file():
        reader = gguf.GGUFReader(str(source_gguf))
        for name, f in reader.fields.items():
            if name.startswith("tokenizer."):
                vtype = gguf.GGUFValueType(f.types[0])
                sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(name, f.contents(), vtype, sub)
        return "gguf"
    kind = _hf_vocab_kind(tokenizer_dir)
    if kind is None:
        log.warning(
            "the GGUF carries no tokenizer (the model's tokenizer is neither BPE nor SentencePiece);"
            " llama.cpp will run it on token ids only"
        )
        writer.add_tokenizer_model("none")  # llama.cpp sizes the vocabulary from {arch}.vocab_size
        return "none"
    assert tokenizer_dir is not None
    vocab: Any = (
        gguf.vocab.BpeVocab(tokenizer_dir) if kind == "bpe" else gguf.vocab.SentencePieceVocab(tokenizer_dir)
    )
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), n_vocab)]
    scores += [-1000.0] * (n_vocab - len(scores))
    types += [gguf.TokenType.UNUSED] * (n_vocab - len(types))
    writer.add_tokenizer_model("gpt2" if kind == "bpe" else "llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=kind == "bpe", n_vocab=n_vocab).add_to_gguf(writer)
    log.warning(
        "the GGUF's tokenizer was rebuilt from %s with llama.cpp's default pre-tokenizer; check its"
        " tokenization of your text before serving",
        tokenizer_dir,
    )
    return kind


def _hf_vocab_kind(tokenizer_dir: Path | None) -> str | None:
    if tokenizer_dir is None:
        return None
    path = tokenizer_dir / "tokenizer.json"
    if path.is_file():
        model = json.loads(path.read_text()).get("model", {})
        if model.get("type") == "BPE":
            return "bpe"
    return "spm" if (tokenizer_dir / "tokenizer.model").is_file() else None


@torch.inference_mode()
def write_gguf(
    model: nn.Module,
    dest: Path,
    *,
    quant: str = "f16",
    tokenizer_dir: Path | None = None,
    source_gguf: Path | None = None,
    name: str = "",
) -> GGUFSummary:
    """Write `model` (dense or pruned by tyr, of a family llama.cpp's ``deci`` can express) to
    `dest` as GGUF with weights at `quant`."""
    import gguf

    if quant not in QUANTS:
        raise UserError(f"unknown quantization {quant!r}", f"choose one of {', '.join(QUANTS)}")
    why = gguf_refusal(model.config)
    if why is not None:
        raise UserError(f"this model cannot be written as GGUF: {why}", "serve it with transformers")
    spec = arch.spec_for(model)
    cfg: Any = model.config
    shape = arch.shape_of(model, spec)
    blocks = [
        encode_layer(layer, spec, shape.head_dim, i) for i, layer in enumerate(arch.layers(model, spec))
    ]
    embed = arch.get_module(model, spec.embed).weight.detach()
    n_vocab = embed.shape[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it opens
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_name(name or getattr(cfg, "_name_or_path", "") or "tyr")
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]
    )
    writer.add_block_count(len(blocks))
    writer.add_context_length(_context(cfg))
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length([b.n_ff for b in blocks])
    writer.add_head_count([b.n_head for b in blocks])
    writer.add_head_count_kv([b.n_head_kv for b in blocks])
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    vocab = _tokenizer(writer, tokenizer_dir, source_gguf, n_vocab)
    tensors: dict[str, Tensor] = {"token_embd.weight": embed}
    lm_head = arch.get_module(model, spec.lm_head).weight
    if lm_head.data_ptr() != embed.data_ptr():
        tensors["output.weight"] = lm_head.detach()
    tensors["output_norm.weight"] = arch.get_module(model, spec.final_norm).weight.detach()
    factors = _rope_factors(cfg)
    if factors is not None:
        tensors["rope_freqs.weight"] = factors
    for i, b in enumerate(blocks):
        tensors.update({f"blk.{i}.{k}": v for k, v in b.tensors.items()})
    unquantized: list[str] = []
    for key, t in tensors.items():
        qtype = _qtype(quant, key, t, unquantized)
        data = t.float().cpu().numpy()
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(key, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(key, data.astype(np.float16))
        else:
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.add_string("tyr.gguf.unquantized", ",".join(unquantized))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dest)
    padded = sum(b.padded for b in blocks)
    if unquantized:
        log.info("%d tensors kept in %s (input width not a multiple of the block)", len(unquantized), "F16")
    return GGUFSummary(str(dest), quant, dest.stat().st_size, len(tensors), unquantized, padded, vocab)


def _theta(cfg: Any) -> float:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _context(cfg: Any) -> int:
    """The context llama.cpp may use: the trained one, capped by a sliding window (Mistral's
    window over the whole model), within which full attention equals windowed attention."""
    n = int(getattr(cfg, "max_position_embeddings", 4096))
    window = getattr(cfg, "sliding_window", None)
    return min(n, int(window)) if window else n
