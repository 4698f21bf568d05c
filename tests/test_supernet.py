"""Supernet build: expectation accumulation acts, storage is compact and verified, builds resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import VOCAB, tiny_model

import tyr.supernet.builder as sn
from tyr import arch
from tyr.budget import Gene, SubLayer, level_range
from tyr.modeling import expand_cols
from tyr.stream import capture


class Crash(Exception):
    pass


def _calib(n=6, T=20, seed=0):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def _sublayers(shape, centre_attn=3, centre_mlp=18, step_attn=1, step_mlp=5):
    subs = {}
    for b in range(shape.n_layers):
        for kind, n, c, u in (
            ("attn", shape.n_q, centre_attn, step_attn),
            ("mlp", shape.intermediate, centre_mlp, step_mlp),
        ):
            lo, hi = level_range(c, u, n)
            subs[Gene(b, kind)] = SubLayer(Gene(b, kind), n, c, u, lo, hi)
    return subs


def _build(tmp_path, accumulation="expectation", model=None, identity=None):
    model = model or tiny_model("llama")
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    store = sn.Store(tmp_path / "supernet", 1, identity or {"test": 1})
    inputs = capture(model, spec, list(_calib().split(3)))
    cands = sn.build(
        model, spec, shape, inputs, _sublayers(shape), store, sn.SupernetOptions(accumulation=accumulation)
    )
    inputs.close()
    return model, shape, store, cands


def test_expectation_weight_is_the_alpha_weighted_average_of_candidates(tmp_path):
    _, shape, store, cands = _build(tmp_path)
    c = cands[Gene(1, "mlp")]
    dense = torch.randn(shape.hidden, shape.intermediate)
    total = shape.mlp_params(shape.intermediate)
    w_bar = sn.propagation_weight(c, store, dense, 1, shape.intermediate, total, "expectation")
    X = torch.randn(50, shape.intermediate)
    alphas = torch.tensor([1 - x.removed_params / total for x in c])
    alphas = alphas / alphas.sum()
    per_candidate = [X @ expand_cols(store.weight(x), x.kept, 1, shape.intermediate).T for x in c]
    expect = sum(a * y for a, y in zip(alphas, per_candidate, strict=True))
    assert torch.allclose(X @ w_bar.T, expect, atol=1e-4)
    assert not torch.allclose(X @ w_bar.T, X @ dense.T, atol=1e-2)
    assert alphas[-1] == min(alphas)  # denser candidates weigh more; s = 1 weighs 0
    full = [x for x in c if len(x.kept) == 0]
    assert all(1 - x.removed_params / total == 0 for x in full)


def test_block1_statistics_differ_between_expectation_and_none(tmp_path, monkeypatch):
    seen: dict[str, torch.Tensor] = {}
    real = sn._attn_candidates

    def spy(o, H, shape, sub, opt):
        if sub.gene.block == 1:
            seen[opt.accumulation] = H.clone()
        return real(o, H, shape, sub, opt)

    monkeypatch.setattr(sn, "_attn_candidates", spy)
    _build(tmp_path / "e", "expectation")
    _build(tmp_path / "n", "none")
    assert (seen["expectation"] - seen["none"]).norm() > 1e-3 * seen["none"].norm()


def test_candidates_are_compact_and_levels_match_units(tmp_path):
    _, shape, store, cands = _build(tmp_path)
    for gene, cs in cands.items():
        size = shape.head_dim if gene.kind == "attn" else 1
        for c in cs:
            w = store.weight(c)
            assert w.shape == (shape.hidden, len(c.kept) * size)
            if gene.kind == "mlp":
                assert len(c.kept) == shape.intermediate - c.units
        assert [c.level for c in cs] == sorted(c.level for c in cs)
    manifest = json.loads((tmp_path / "supernet" / "iter1" / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and len(manifest["sublayers"]) == 2 * shape.n_layers


def test_interrupted_build_resumes_and_corrupt_files_are_recomputed(tmp_path, monkeypatch, caplog):
    calls: list[tuple[int, str]] = []
    real_a, real_m = sn._attn_candidates, sn._mlp_candidates

    def spy_a(o, H, shape, sub, opt):
        calls.append((sub.gene.block, "attn"))
        return real_a(o, H, shape, sub, opt)

    crashed: list[bool] = []

    def spy_m(down, H, shape, sub, opt, low_memory):
        if sub.gene.block == 2 and not crashed:
            crashed.append(True)
            calls.append((2, "mlp-fail"))
            raise Crash  # the build dies in the last block
        calls.append((sub.gene.block, "mlp"))
        return real_m(down, H, shape, sub, opt, low_memory)

    monkeypatch.setattr(sn, "_attn_candidates", spy_a)
    monkeypatch.setattr(sn, "_mlp_candidates", spy_m)
    with pytest.raises(Crash):
        _build(tmp_path)
    done = list(calls)
    assert done == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp"), (2, "attn"), (2, "mlp-fail")]
    calls.clear()
    _, _, store, first = _build(tmp_path)
    assert calls == [(2, "mlp")]  # finished sub-layers are loaded, not re-solved

    # Corrupt one stored candidate: detected by its checksum, recomputed with a warning.
    victim = first[Gene(1, "attn")][0]
    path = store.dir / victim.path
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    calls.clear()
    with caplog.at_level(logging.WARNING):
        _, _, store2, again = _build(tmp_path)
    assert calls == [(1, "attn")]
    assert "corrupt" in caplog.text
    redo = again[Gene(1, "attn")][0]
    assert redo.sha256 == victim.sha256 and redo.kept == victim.kept  # same solve, same bytes


def test_a_store_of_another_configuration_is_refused(tmp_path):
    sn.Store(tmp_path, 1, {"a": 1})
    from tyr.errors import UserError

    with pytest.raises(UserError, match="different configuration"):
        sn.Store(tmp_path, 1, {"a": 2})


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@torch.inference_mode()
def test_recomputed_intermediates_give_the_same_bytes_as_stored_ones(tmp_path, monkeypatch, family):
    """The MLP's d_ff-wide activations kept in memory, in files or not at all (the block runs a
    second time): the same block outputs, byte for byte, and nothing d_ff wide is stored."""
    from tyr.stream import ActivationStore, forward_block, propagate_mlp

    model = tiny_model(family)
    spec = arch.spec_for(model)
    layer = arch.layers(model, spec)[0]
    down = arch.mlp_parts(layer, spec).down
    dense = down.weight.detach().clone()
    new = dense + 0.05 * torch.randn(dense.shape, generator=torch.Generator().manual_seed(1))
    siblings: list[str] = []
    real = ActivationStore.sibling

    def spy(self, offload=None):
        siblings.append(offload or self.offload)
        return real(self, offload)

    monkeypatch.setattr(ActivationStore, "sibling", spy)
    outs, grams = {}, {}
    for where in ("cpu", "disk", "recompute"):
        down.weight.data.copy_(dense)
        inputs = capture(model, spec, list(_calib().split(3)), offload_root=tmp_path)
        before = [inputs.hidden[i].clone() for i in range(len(inputs))]

        def choose(H, where=where):
            grams[where] = H.clone()
            return new

        propagate_mlp(layer, down, inputs, choose, residual=spec.mlp_output_is_residual, z_offload=where)
        assert torch.equal(down.weight, new)
        outs[where] = [inputs.hidden[i] for i in range(len(inputs))]
        kw = [inputs.kwargs_for(layer, i) for i in range(len(inputs))]
        inputs.close()
    for where in ("disk", "recompute"):
        assert torch.equal(grams[where], grams["cpu"])
        assert all(torch.equal(a, b) for a, b in zip(outs[where], outs["cpu"], strict=True))
    expect = [forward_block(layer, x, k) for x, k in zip(before, kw, strict=True)]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(outs["cpu"], expect, strict=True))
    if spec.mlp_output_is_residual:
        assert siblings == ["cpu", "disk"]  # recompute stores no intermediate activations


def test_intermediates_are_recomputed_on_a_gpu_when_the_activations_are_on_disk():
    from tyr.stream import intermediate_placement as place

    assert place("cpu", "cpu") == "cpu" and place("disk", "cpu") == "disk"
    assert place("cpu", "cuda") == "cpu" and place("disk", "cuda:1") == "recompute"
    assert place("cpu", "cpu", streamed=True) == "disk" and place("cpu", "cuda", streamed=True) == "recompute"
