"""Exported directories: a self-contained HF checkpoint that loads without tyr."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, calib_ids, load_without_tyr, pruned_pair

import tyr
from tyr import arch
from tyr.cli import main
from tyr.export import MODELING, modeling_sha256, save_pruned
from tyr.modeling import modeling_tyr

FAST = ["--calib-tokens", "512", "--seq-len", "32", "--eval-tokens", "256"]


def _prune(src: Path, calib: Path, out: Path, *extra: str) -> dict:
    args = ["prune", str(src), "--sparsity", "0.4", "--out", str(out), "--calib", str(calib), *FAST]
    assert main([*args, *extra]) == 0
    return json.loads((out / "result.json").read_text())


def _greedy(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by full forwards, no cache: what cached generation must reproduce."""
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("gqa", ["free", "uniform"])
def test_exportsload_without_tyr(tmp_path, calib_txt, tiny_dir, gqa):
    """Every family, pruned and exported, loads through `trust_remote_code` in a process that
    cannot import tyr: its logits equal the in-memory pruned model's and tyr.load's, cached
    generation equals uncached greedy decoding, and the parameter count is the pruned one."""
    models, outs = {}, []
    for family in (*FAMILIES, "llama-bias"):
        _, sliced, plans, shape = pruned_pair(family, gqa)
        out = tmp_path / f"out-{family}"
        save_pruned(sliced, None, plans, shape, out)
        models[out] = sliced
        outs.append(out)
    if gqa == "free":  # block 0 loses its whole attention and FFN; block 2 keeps one KV head
        genome = tmp_path / "genome.json"
        genome.write_text(
            json.dumps({"q_heads": [0, 6, 2], "kv_heads": [0, 2, 1], "intermediate": [0, 27, 37]})
        )
        out = tmp_path / "out-removed"
        res = _prune(tiny_dir, calib_txt, out, "--genome", str(genome), "--kl-topk", "16")
        assert res["layers"][0]["q_heads"] == 0 and res["layers"][0]["intermediate"] == 0
        models[out] = tyr.load(out)
        assert arch.count_total_params(models[out]) == res["params"]["pruned_total"]
        outs.append(out)

    ids = calib_ids(seed=3, n=2, T=12)
    remote = load_without_tyr(tmp_path, outs, ids)
    for out in outs:
        model, again = models[out], tyr.load(out)
        with torch.no_grad():
            ref = model(ids).logits
            assert float((again(ids).logits - ref).abs().max()) <= 1e-4, out
            greedy = _greedy(model, ids[:1, :5], 8)
        key = str(out)
        assert bytes(remote[key + ":class"].tolist()).decode().startswith("Tyr"), out
        assert float((remote[key + ":logits"] - ref).abs().max()) <= 1e-4, out
        assert torch.equal(remote[key + ":generated"], greedy), out
        assert int(remote[key + ":params"]) == arch.count_total_params(model), out


def test_export_directory_contents(tiny_dir, calib_txt, tmp_path):
    out = tmp_path / "out"
    res = _prune(tiny_dir, calib_txt, out)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", MODELING, "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "result.json"} <= names
    # The shipped modeling file is tyr's own, byte for byte, and its hash is on record.
    assert (out / MODELING).read_bytes() == Path(modeling_tyr.__file__).read_bytes()
    assert res["modeling_sha256"] == modeling_sha256()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_tyr.TyrLlamaForCausalLM"}
    assert config["tyr"]["modeling_sha256"] == modeling_sha256()
    # transformers reads the per-layer FFN widths as a heterogeneous config.
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(out)
    widths = [r["intermediate"] for r in res["layers"]]
    assert [hf.per_layer_config[i].intermediate_size for i in range(len(widths))] == widths
    card = (out / "README.md").read_text()
    assert "| block | query heads | KV heads | FFN width |" in card
    assert "tyr prune " in card and f"--sparsity 0.4 --out {out}" in card
    assert f"{res['params']['pruned_total']:,}" in card and tyr.__version__ in card


def test_bfloat16_export_is_half_the_size(tiny_dir, calib_txt, tmp_path):
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        res = _prune(tiny_dir, calib_txt, out, "--method", "uniform", "--dtype", dtype)
        sizes[dtype] = (out / "model.safetensors").stat().st_size
        model = tyr.load(out, dtype=getattr(torch, dtype))
        assert arch.count_total_params(model) == res["params"]["pruned_total"]
    assert 0.45 < sizes["bfloat16"] / sizes["float32"] < 0.55, sizes


def test_modeling_file_refuses_old_transformers(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.13.0")
    spec = importlib.util.spec_from_file_location("modeling_tyr_copy", modeling_tyr.__file__)
    assert spec is not None and spec.loader is not None
    with pytest.raises(ImportError, match=r"transformers >= 5\.14"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_load_rejects_a_directory_without_config(tmp_path):
    with pytest.raises(tyr.UserError, match="no config.json"):
        tyr.load(tmp_path)
