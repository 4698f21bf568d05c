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
