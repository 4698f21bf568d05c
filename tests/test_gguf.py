"""GGUF export: the written file, read back and run by a reference of llama.cpp's `deci` graph
(pure torch, here), gives the pruned model's logits; `llama_cpp` marks the same check against the
real llama.cpp (built from the llama-cpp-python sdist, see benchmarks/serve_gguf.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import calib_ids, tiny_model, tiny_tokenizer

from tyr import arch
from tyr.budget import layout
from tyr.errors import UserError
from tyr.export.gguf import FFN_PAD, write_gguf
from tyr.modeling import LayerPlan, apply_plans

FAMILIES = ["llama", "llama-bias", "mistral", "qwen2"]


def awkward(family: str) -> torch.nn.Module:
    """A tiny model with block 0 emptied (no heads, no FFN), uneven GQA groups in block 1, an
    FFN-less block 2 that keeps one query head, and a dense block 3."""
    model = tiny_model(family, layers=4)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    g = torch.Generator().manual_seed(3)

    def plan(kept_q: list[int], kept_neurons: list[int]) -> LayerPlan:
        o = torch.randn(shape.hidden, len(kept_q) * shape.head_dim, generator=g) * 0.2
        down = torch.randn(shape.hidden, len(kept_neurons), generator=g) * 0.2
        return LayerPlan(layout(kept_q, shape.n_q, shape.n_kv), tuple(kept_neurons), o, down)

    plans = [plan([], []), plan([0, 1, 2, 5], [0, 3, 36]), plan([4], []), None]
    return apply_plans(copy.deepcopy(model), plans, spec, shape).eval()


def _tensors(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32"))
        tensors[t.name] = data.reshape(tuple(int(n) for n in reversed(t.shape.tolist())))
    return fields, tensors


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def deci_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's deci graph (src/models/deci.cpp) on the file's tensors, in float64: interleaved
    rotary pairs, query head h on KV head h // (n_head / n_head_kv), n_head = 0 skips attention,
    n_ff = 0 skips the whole layer."""
    f, t = _tensors(path)
    t = {k: v.double() for k, v in t.items()}
    eps, theta = f["deci.attention.layer_norm_rms_epsilon"], f["deci.rope.freq_base"]
    d_h = f["deci.attention.key_length"]
    n_head, n_kv, n_ff = (
        f[f"deci.{k}"] for k in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
    )
    T = ids.shape[1]
    freqs = theta ** (-torch.arange(0, d_h, 2, dtype=torch.float64) / d_h)
    if "rope_freqs.weight" in t:
        freqs = freqs / t["rope_freqs.weight"]
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]  # [T, d_h/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # [B, T, H, d_h], pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)

    def lin(x, name, i):
        y = x @ t[f"blk.{i}.{name}.weight"].T
        bias = t.get(f"blk.{i}.{name}.bias")
        return y if bias is None else y + bias

    x = t["token_embd.weight"][ids]
    mask = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    for i in range(len(n_head)):
        if n_head[i]:
            h = _rms(x, t[f"blk.{i}.attn_norm.weight"], eps)
            B = x.shape[0]
            q = rope(lin(h, "attn_q", i).view(B, T, n_head[i], d_h))
            k = rope(lin(h, "attn_k", i).view(B, T, n_kv[i], d_h))
            v = lin(h, "attn_v", i).view(B, T, n_kv[i], d_h)
            group = n_head[i] // n_kv[i]
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d_h) + mask
            ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, -1)
            cur = lin(ctx, "attn_output", i)
        else:
            cur = x
        if n_ff[i] == 0:
            continue
        ffn_inp = cur + x if n_head[i] else cur
        h = _rms(ffn_inp, t[f"blk.{i}.ffn_norm.weight"], eps)
        z = torch.nn.functional.silu(lin(h, "ffn_gate", i)) * lin(h, "ffn_up", i)
        x = lin(z, "ffn_down", i) + ffn_inp
    x = _rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_runs_as_the_pruned_model(tmp_path, family):
    model = awkward(family)
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, path, quant="f32")
    fields, tensors = _tensors(path)
    shape = arch.shape_of(model)
    # Block 0: one zero head pair and FFN_PAD zero channels; block 1: groups (3, 1) padded to 3 + 3.
    assert fields["deci.attention.head_count"] == [1, 6, 1, shape.n_q]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 1, shape.n_kv]
    assert fields["deci.feed_forward_length"] == [FFN_PAD, 3, FFN_PAD, model.config.intermediate_size]
    assert summary.padded_heads == 1 + 2 + 0 and summary.vocab == "none"
    assert float(tensors["blk.0.attn_output.weight"].abs().max()) == 0.0
    ids = calib_ids(seed=4, n=2, T=11)
    with torch.inference_mode():
        ref = model(ids).logits.double()
    got = deci_logits(path, ids)
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_quantized_gguf_keeps_narrow_tensors_wider(tmp_path):
    model = awkward("llama")  # hidden 42: no weight's input width is a multiple of 32
    summary = write_gguf(model, tmp_path / "q.gguf", quant="q8_0")
    fields, _ = _tensors(tmp_path / "q.gguf")
    names = fields["tyr.gguf.unquantized"].split(",")
    assert names == summary.unquantized and "blk.1.attn_q.weight" in names
    assert "blk.0.ffn_down.weight" not in names  # its input width is FFN_PAD = one block
    with torch.inference_mode():
        ref = model(calib_ids(seed=4, n=1, T=7)).logits.double()
    got = deci_logits(tmp_path / "q.gguf", calib_ids(seed=4, n=1, T=7))
    assert (got - ref).abs().max() <= 0.05 * float(ref.abs().max())  # F16 and Q8_0 rounding


def test_llama3_rope_becomes_rope_freqs(tmp_path):
    model = tiny_model("llama")
    model.config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    from tyr.loader import load

    model.save_pretrained(tmp_path / "d")
    model = load(tmp_path / "d")  # rotary tables built from the llama3 parameters
    write_gguf(model, tmp_path / "r.gguf", quant="f32")
    _, tensors = _tensors(tmp_path / "r.gguf")
    assert "rope_freqs.weight" in tensors and float(tensors["rope_freqs.weight"].max()) > 1.0
    ids = calib_ids(seed=5, n=1, T=13)
    with torch.inference_mode():
        ref = model(ids).logits.double()
    assert (deci_logits(tmp_path / "r.gguf", ids) - ref).abs().max() <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3"])
def test_families_deci_cannot_express_are_refused(tmp_path, family):
    with pytest.raises(UserError, match="cannot be written as GGUF"):
        write_gguf(tiny_model(family), tmp_path / "x.gguf")


@pytest.mark.llama_cpp
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_the_awkward_gguf(tmp_path, family):
    """The real llama.cpp (the llama-cpp-python binding) loads the file and gives the model's
    logits: padded groups, a head-less layer 0, FFN-less layers, biases, token ids only."""
    import numpy as np

    try:
        from llama_cpp import Llama
    except ImportError:
        pytest.fail("the llama.cpp binding is not installed: python benchmarks/serve_gguf.py --build")

    model = awkward(family)
    path = tmp_path / "m.gguf"
    write_gguf(model, path, quant="f32")
    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False)
    ids = calib_ids(seed=6, n=1, T=17)
    llm.eval(ids[0].tolist())
    got = np.array(llm.scores[: ids.shape[1]])
    with torch.inference_mode():
        ref = model(ids).logits[0].numpy()
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_prune_writes_the_gguf_in_the_same_command(tiny_dir, calib_txt, tmp_path, capsys):
    """`tyr prune --gguf` writes what `tyr export --gguf` writes from the finished result, and
    refuses a bad quantization or an inexpressible family before any work."""
    import json

    from tyr.cli import main

    out, gguf_file = tmp_path / "pruned", tmp_path / "pruned.gguf"
    argv = [
        "prune", str(tiny_dir), "--sparsity", "0.5", "--method", "uniform", "--out", str(out),
        "--calib", str(calib_txt), "--calib-tokens", "512", "--seq-len", "32", "--no-eval",
        "--gguf", str(gguf_file), "--gguf-quant", "q8_0",
    ]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["gguf"] == str(gguf_file.resolve())
    assert main(["export", str(out), "--gguf", str(tmp_path / "again.gguf"), "--quant", "q8_0"]) == 0
    assert gguf_file.read_bytes() == (tmp_path / "again.gguf").read_bytes()
    ids = calib_ids(2, n=1, T=9)
    from tyr import load

    with torch.inference_mode():
        ref = load(out)(ids).logits.double()
    assert (deci_logits(gguf_file, ids) - ref).abs().max() <= 0.05 * float(ref.abs().max())  # q8_0

    gemma = tmp_path / "tiny-gemma2"
    tiny_model("gemma2").save_pretrained(gemma)
    for bad in (
        [*argv[:-1], "q3_k"],  # no such quantization here
        [*argv[:-3], str(tmp_path / "no-dir" / "m.gguf")],
        ["prune", str(gemma), *argv[2:]],  # deci cannot express Gemma 2
    ):
        bad[bad.index("--out") + 1] = str(tmp_path / "o")
        assert main(bad) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tyr: error")]
    assert len(errors) == 3 and "cannot be written as GGUF" in errors[2]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("unit", [1, 32])
def test_an_ffn_unit_of_32_quantizes_every_ffn_tensor(tmp_path, calib_txt, unit):
    """Widths of 32·k keep every ffn_down (input width: the kept FFN) in Q8_0; the default grain
    leaves widths that Q8_0's 32-wide blocks do not divide in F16."""
    from tyr.cli import main

    d = tmp_path / "ckpt"
    tiny_model("llama", hidden=64, head_dim=32, n_q=4, n_kv=2, intermediate=128).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    out = tmp_path / "pruned"
    argv = [
        "prune", str(d), "--sparsity", "0.4", "--method", "uniform", "--out", str(out), "--no-eval",
        "--calib", str(calib_txt), "--calib-tokens", "512", "--seq-len", "32", "--ffn-unit", str(unit),
        "--gguf", str(tmp_path / "q.gguf"), "--gguf-quant", "q8_0",
    ]  # fmt: skip
    assert main(argv) == 0
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    kinds = {t.name: t.tensor_type for t in reader.tensors if "ffn_down" in t.name}
    quantized = [kind == gguf.GGMLQuantizationType.Q8_0 for kind in kinds.values()]
    assert len(kinds) == 3 and all(quantized) == (unit == 32) and any(quantized) == (unit == 32)
    listed = reader.fields.get("tyr.gguf.unquantized")  # absent when every tensor quantizes
    assert (listed is None or "ffn_down" not in listed.contents()) == (unit == 32)
