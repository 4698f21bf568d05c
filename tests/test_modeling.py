"""Surgery and the heterogeneous-width model: the sliced model equals the masked full-size one."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, calib_ids, pruned_pair, tiny_model

from tyr import arch
from tyr.budget import layout
from tyr.export import save_pruned
from tyr.loader import load
from tyr.modeling import (
    LayerPlan,
    apply_plans,
    compact_cols,
    expand_cols,
    mask_plans,
    slice_qkv,
    take_cols,
    take_rows,
    unit_index,
)


def test_unit_index_and_paired_slices():
    assert unit_index([0, 2], 3).tolist() == [0, 1, 2, 6, 7, 8]
    W, b = torch.arange(12.0).view(4, 3), torch.arange(4.0)
    w2, b2 = take_rows(W, b, torch.tensor([1, 3]))
    assert w2.tolist() == [[3, 4, 5], [9, 10, 11]] and b2 is not None and b2.tolist() == [1, 3]
    assert take_cols(W, torch.tensor([2])).tolist() == [[2], [5], [8], [11]]
    q = (torch.randn(6 * 2, 5), None)
    kv = (torch.randn(2 * 2, 5), torch.randn(4))
    (qw, _), (kw, kb), _ = slice_qkv(q, kv, kv, [4, 5], [1], 2)
    assert qw.shape == (4, 5) and kw.shape == (2, 5) and kb is not None and kb.shape == (2,)
    assert torch.equal(kw, kv[0][2:4]) and torch.equal(qw, q[0][8:12])
    full = torch.randn(5, 12)
    small = compact_cols(full, [1, 4], 2)
    assert torch.equal(small, full[:, [2, 3, 8, 9]])
    back = expand_cols(small, [1, 4], 2, 6)
    assert torch.equal(back[:, [2, 3, 8, 9]], small) and back[:, [0, 1, 4, 5, 6, 7, 10, 11]].abs().max() == 0


@pytest.mark.parametrize("family", [*FAMILIES, "llama-bias"])
@pytest.mark.parametrize("gqa", ["free", "uniform"])
def test_sliced_logits_equal_masked_logits(family, gqa):
    masked, sliced, plans, shape = pruned_pair(family, gqa)
    ids = calib_ids(seed=1, n=2, T=17)
    with torch.inference_mode():
        ref, got = masked(ids).logits, sliced(ids).logits
    assert (ref - got).abs().max() <= 1e-4
    assert arch.count_block_params(sliced) < 0.6 * arch.count_block_params(tiny_model(family))
    if gqa == "uniform":
        for p in plans:
            assert p is not None
            sizes = {p.heads.q_to_kv.count(i) for i in range(len(p.heads.kept_kv))}
            assert len(sizes) <= 1


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_removed_sublayers_and_uneven_groups(family):
    """s = 1 attention (no heads: attention is skipped) and FFN (no neurons), uneven q_to_kv."""
    model = tiny_model(family)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    d = shape.hidden
    g = torch.Generator().manual_seed(3)

    def plan(kept_q, kept_neurons):
        o = torch.randn(d, len(kept_q) * shape.head_dim, generator=g) * 0.2
        down = torch.randn(d, len(kept_neurons), generator=g) * 0.2
        return LayerPlan(layout(kept_q, shape.n_q, shape.n_kv), tuple(kept_neurons), o, down)

    plans = [plan([], []), plan([0, 1, 2, 5], [0, 3, 36]), plan([4], list(range(37)))]
    masked = mask_plans(copy.deepcopy(model), plans, spec, shape)
    sliced = apply_plans(copy.deepcopy(model), plans, spec, shape)
    assert plans[1].heads.q_to_kv == (0, 0, 0, 1)
    ids = calib_ids(seed=2, n=2, T=9)
    with torch.inference_mode():
        assert (masked(ids).logits - sliced(ids).logits).abs().max() <= 1e-4


def test_cached_decoding_matches_the_full_forward():
    """A layer with no heads still advances the KV cache (positions of later layers stay right)."""
    model = tiny_model("llama")
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    down0 = arch.mlp_parts(arch.layers(model, spec)[0], spec).down.weight
    plans = [LayerPlan(layout([], 6, 2), tuple(range(37)), torch.zeros(42, 0), down0), None, None]
    sliced = apply_plans(model, plans, spec, shape)
    ids = calib_ids(seed=5, n=1, T=12)
    with torch.inference_mode():
        full = sliced(ids).logits[0, -1]
        first = sliced(ids[:, :-1], use_cache=True)
        assert first.cache is not None and first.cache.get_seq_length() == 11
        step = sliced(ids[:, -1:], cache=first.cache, use_cache=True).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4)


def test_save_and_load_roundtrip(tmp_path):
    _, sliced, plans, shape = pruned_pair("qwen3", "free")
    save_pruned(sliced, None, plans, shape, tmp_path / "out")
    again = load(tmp_path / "out")
    ids = calib_ids(seed=4, n=2, T=11)
    with torch.inference_mode():
        assert torch.equal(sliced(ids).logits, again(ids).logits)
    assert arch.count_block_params(again) == arch.count_block_params(sliced)
