"""Lazy models: weights read from the checkpoint one block at a time give the same numbers, the
same export and the same fingerprint as the model loaded whole, with at most one block in memory."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, calib_ids, tiny_config, tiny_model, tiny_text, tiny_tokenizer
from safetensors.torch import load_file

import tyr
import tyr.api
from tyr import arch, budget
from tyr.eval import perplexity
from tyr.loader import fingerprint
from tyr.stream import lazy


def _checkpoint(tmp_path, family="llama", dtype=torch.bfloat16):
    d = tmp_path / f"ckpt-{family}"
    tiny_model(family).to(dtype).save_pretrained(d)
    return d


def _lazy(d, tmp_path, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(d)
    attn = arch.attn_implementation(config)
    return lazy.load(d, config, AutoModelForCausalLM, dtype, tmp_path / "spill", attn_implementation=attn)


def _eager(d, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_model_computes_what_the_loaded_one_does(tmp_path, family):
    d = _checkpoint(tmp_path, family)
    state = _lazy(d, tmp_path)
    if family == "phi3":  # fused checkpoint names: tyr loads it whole (tyr.loader.load_lazy)
        assert state is None or arch.spec_for(state.module).qkv is not None
        return
    assert state is not None, family
    model, eager = state.module, _eager(d)
    spec = arch.spec_for(model)
    assert all(p.is_meta for layer in arch.layers(model, spec) for p in layer.parameters())
    assert not any(name.startswith("_tyr") for m in model.modules() for name in vars(m))  # no hidden state
    ids = calib_ids(seed=2, n=4, T=20)
    got = perplexity(model, spec, ids, batch_size=2, lazy=state)
    assert got == perplexity(eager, spec, ids, batch_size=2)  # bf16 → fp32 is exact: same bits
    assert fingerprint(model, state) == fingerprint(eager)
    assert all(p.is_meta for layer in arch.layers(model, spec) for p in layer.parameters())


def test_at_most_one_block_is_in_memory(tmp_path, monkeypatch):
    d = _checkpoint(tmp_path)
    state = _lazy(d, tmp_path)
    model = state.module
    blocks = arch.layers(model)
    most = []
    real = lazy._materialize

    def counting(layer, src):
        real(layer, src)
        most.append(sum(not next(b.parameters()).is_meta for b in blocks))

    monkeypatch.setattr(lazy, "_materialize", counting)
    perplexity(model, arch.spec_for(model), calib_ids(n=4), batch_size=2, lazy=state)
    assert len(most) == len(blocks) and max(most) == 1


def test_lazy_uniform_prune_exports_the_same_model(tmp_path, monkeypatch):
    d = _checkpoint(tmp_path)
    tiny_tokenizer().save_pretrained(d)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(3000))
    common = dict(method="uniform", calib=str(text), calib_tokens=480, seq_len=24, eval_data=str(text))
    common.update(eval_tokens=480, batch_size=4)
    used = []
    real = tyr.api.load_lazy
    monkeypatch.setattr(tyr.api, "load_lazy", lambda *a: used.append(real(*a)) or used[-1])
    streamed = tyr.prune(str(d), sparsity=0.5, out=tmp_path / "lazy", workdir=str(tmp_path / "w1"), **common)
    assert used and isinstance(used[0], lazy.LazyModel)
    monkeypatch.setattr(tyr.api, "load_lazy", lambda *a: None)
    whole = tyr.prune(str(d), sparsity=0.5, out=tmp_path / "whole", workdir=str(tmp_path / "w2"), **common)

    a, b = load_file(tmp_path / "lazy/model.safetensors"), load_file(tmp_path / "whole/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.data["ppl"] == whole.data["ppl"]
    assert streamed.data["params"] == whole.data["params"]
    assert not (tmp_path / "w1" / "stream").exists()  # spilled blocks are removed at the end
    ids = calib_ids(seed=3, n=2, T=16)
    with torch.no_grad():
        assert torch.equal(tyr.load(tmp_path / "lazy")(ids).logits, tyr.load(tmp_path / "whole")(ids).logits)


def test_sharded_save_loads_like_one_file(tmp_path):
    d = _checkpoint(tmp_path, dtype=torch.float32)
    state = _lazy(d, tmp_path)
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir(), many.mkdir()
    state.save(one)
    state.save(many, max_shard_bytes=20_000)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    whole = load_file(one / "model.safetensors")
    assert set(index["weight_map"]) == set(whole)
    for shard in set(index["weight_map"].values()):
        for k, v in load_file(many / shard).items():
            assert torch.equal(v, whole[k])
    source = load_file(d / "model.safetensors")  # fp32 in, fp32 out: the very tensors
    assert set(whole) == set(source) and all(torch.equal(whole[k], source[k]) for k in source)


def test_lazy_search_exports_the_same_model_holding_one_dense_block(tmp_path, monkeypatch):
    """--method tyr with --weights disk: the same genomes, bytes and perplexities as the model
    loaded whole, and never more than one dense block read from disk at a time."""
    d = _checkpoint(tmp_path, dtype=torch.float32)
    tiny_tokenizer().save_pretrained(d)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(3000))
    common = dict(calib=str(text), calib_tokens=480, seq_len=24, eval_data=str(text), eval_tokens=480)
    common.update(batch_size=4, iterations=2, generations=3, offspring=6, stage_tokens="48,192")
    common.update(survivors="2,1", levels=5, kl_topk=16)
    used, most = [], []
    real_load, real_read = tyr.api.load_lazy, lazy._materialize
    monkeypatch.setattr(tyr.api, "load_lazy", lambda *a: used.append(real_load(*a)) or used[-1])

    def counting(layer, src):
        real_read(layer, src)
        most.append(sum(not next(b.parameters()).is_meta for b in arch.layers(used[-1].module)))

    monkeypatch.setattr(lazy, "_materialize", counting)
    streamed = tyr.prune(
        str(d), sparsity=0.5, out=tmp_path / "lazy", workdir=str(tmp_path / "w1"), weights="disk", **common
    )
    assert len(used) == 1 and isinstance(used[0], lazy.LazyModel)
    whole = tyr.prune(
        str(d), sparsity=0.5, out=tmp_path / "whole", workdir=str(tmp_path / "w2"), weights="memory", **common
    )
    assert len(used) == 1  # --weights memory loads the model whole
    assert most and max(most) == 1  # supernet build, teacher, student blocks and export alike
    a, b = load_file(tmp_path / "lazy/model.safetensors"), load_file(tmp_path / "whole/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    genomes = [[it["genome"] for it in r.data["search"]["iterations"]] for r in (streamed, whole)]
    assert genomes[0] == genomes[1] and len(genomes[0]) == 2
    assert streamed.data["ppl"] == whole.data["ppl"] and streamed.data["layers"] == whole.data["layers"]
    assert streamed.data["config_identity"] == whole.data["config_identity"]  # --weights: not in it
    assert not (tmp_path / "w1" / "stream").exists()  # spilled blocks are removed at the end


def test_lazy_student_shares_the_embedding_and_holds_only_sliced_blocks(tmp_path):
    """The search's student over a lazy model: the same tensors as over the model loaded whole,
    the dense blocks left on disk, the embedding shared rather than copied."""
    from tyr.budget import KINDS, Gene
    from tyr.search import LiveModel
    from tyr.stream import capture
    from tyr.supernet import Store, SupernetOptions, build

    d = _checkpoint(tmp_path, dtype=torch.float32)
    state, eager = _lazy(d, tmp_path), _eager(d)
    spec, shape = arch.spec_for(eager), arch.shape_of(eager)
    genes = [Gene(b, k) for b in range(shape.n_layers) for k in KINDS]
    centres = budget.initial_centres(shape, 0.5)
    subs = budget.sublayers(shape, {g: centres[g.kind][g.block] for g in genes}, budget.steps(shape, 1), 1)
    calib = calib_ids(n=4)
    students = []
    for model, lz, root in ((eager, None, "a"), (state.module, state, "b")):
        store = Store(tmp_path / root, 1, {"t": 1})
        inputs = capture(model, spec, list(calib.split(2)), lazy=lz)
        cands = build(model, spec, shape, inputs, subs, store, SupernetOptions(), lazy=lz)
        live = LiveModel(model, spec, shape, genes, cands, store, lazy=lz)
        students.append(live.apply((1, -1) * shape.n_layers))
    whole, streamed = (s.state_dict() for s in students)
    assert sorted(whole) == sorted(streamed) and all(torch.equal(whole[k], streamed[k]) for k in whole)
    assert all(p.is_meta for layer in arch.layers(state.module) for p in layer.parameters())
    embed = arch.get_module(students[1], spec.embed).weight
    assert embed.data_ptr() == arch.get_module(state.module, spec.embed).weight.data_ptr()
    assert sum(p.numel() for p in arch.layers(students[1]).parameters()) < arch.count_block_params(
        eager, spec
    )


def test_weights_disk_a_checkpoint_cannot_stream_is_a_clear_error(tmp_path):
    """Phi-3's fused projections are split on loading, so its blocks load whole."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "phi3"
    AutoModelForCausalLM.from_config(tiny_config("phi3")).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(2000))
    with pytest.raises(tyr.UserError, match="cannot be read block by block"):
        tyr.prune(
            str(d), sparsity=0.5, out=tmp_path / "o", calib=str(text), calib_tokens=96, seq_len=24,
            no_eval=True, weights="disk", workdir=str(tmp_path / "w"),
        )  # fmt: skip
    assert not (tmp_path / "o").exists()
