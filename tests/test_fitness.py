"""Search fitness: sparse top-k KL, the on-disk teacher cache, the physically sliced live model."""

from __future__ import annotations

import copy
import random

import torch
from conftest import VOCAB, tiny_model
from test_supernet import _sublayers

from tyr import arch
from tyr.gqa import layout
from tyr.modeling import LayerPlan, mask_plans
from tyr.search.fitness import KLFitness, LiveModel, TeacherCache, _gathered_logits, topk_kl
from tyr.search.space import KINDS, Gene
from tyr.stream import capture
from tyr.supernet import Store, SupernetOptions, build


def test_topk_kl_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 7, 50, generator=g), torch.randn(2, 7, 50, generator=g)
    vals, idx = teacher.topk(10, dim=-1)
    total, count = topk_kl(student, vals, idx)
    assert count == 2 * 6  # the last position of each sequence is dropped
    expect = 0.0
    for b in range(2):
        for t in range(6):
            p = torch.softmax(vals[b, t], -1)
            q = torch.softmax(student[b, t, idx[b, t]], -1)
            expect += float((p * (p.log() - q.log())).sum())
    assert abs(total - expect) < 1e-4
    assert topk_kl(teacher, vals, idx)[0] < 1e-6  # the teacher against itself


def test_gathered_logits_equal_the_full_head():
    model = tiny_model("qwen2")  # tied embeddings
    spec = arch.spec_for(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    idx = torch.randint(0, VOCAB, (2, 9, 5))
    with torch.inference_mode():
        full = model(ids).logits.float().gather(-1, idx)
        assert torch.allclose(_gathered_logits(model, spec, ids, idx, chunk=4), full, atol=1e-5)


def test_streamed_student_equals_the_resident_one():
    """A student too large for the device stays in host memory and visits it block by block
    (here the 'device' is the CPU): the logits are those of the ordinary forward."""
    model = tiny_model("gemma3")  # sliding and global layers, their own rotary tables
    spec = arch.spec_for(model)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    idx = torch.randint(0, VOCAB, (2, 20, 5), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        resident = _gathered_logits(model, spec, ids, idx)
        streamed = _gathered_logits(model, spec, ids, idx, stream_to="cpu")
    assert torch.allclose(streamed, resident, atol=1e-5)


def test_teacher_cache_fills_lazily_and_persists(tmp_path):
    logits = torch.randn(5, 6, 30)
    asked: list[list[int]] = []

    def teacher(rows):
        asked.append(list(rows))
        return logits[rows]

    cache = TeacherCache(tmp_path, 5, 6, 4)
    v, i = cache.get([3, 1], teacher)
    assert asked == [[3], [1]] and torch.equal(v, logits[[3, 1]].topk(4, -1).values)
    cache.get([1, 4], teacher)
    assert asked[-1] == [4]
    again = TeacherCache(tmp_path, 5, 6, 4)  # a restart reuses what was filled
    v2, i2 = again.get([3], teacher)
    assert asked[-1] == [4] and torch.equal(v2, v[:1]) and torch.equal(i2, i[:1])


def test_live_model_equals_the_masked_genome_and_reloads_only_changes(tmp_path):
    model = tiny_model("llama")
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    subs = _sublayers(shape)
    store = Store(tmp_path, 1, {"t": 1})
    calib = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture(model, spec, list(calib.split(3)))
    cands = build(model, spec, shape, inputs, subs, store, SupernetOptions())
    genes = [Gene(b, k) for b in range(shape.n_layers) for k in KINDS]
    live = LiveModel(model, spec, shape, genes, cands, store)
    genome = (1, -1, -1, 0, 0, 1)
    sliced = live.apply(genome)
    assert live.reloads == 6
    # The masked full-size equivalent of the same genome.
    plans = []
    for b in range(shape.n_layers):
        a = next(c for c in cands[Gene(b, "attn")] if c.level == genome[2 * b])
        m = next(c for c in cands[Gene(b, "mlp")] if c.level == genome[2 * b + 1])
        plans.append(LayerPlan(layout(a.kept, 6, 2), m.kept, store.weight(a), store.weight(m)))
    masked = mask_plans(copy.deepcopy(model), plans, spec, shape)
    with torch.inference_mode():
        assert (sliced(calib).logits - masked(calib).logits).abs().max() <= 1e-4
    live.apply((1, -1, -1, 0, 0, 0))
    assert live.reloads == 7  # only the changed sub-layer

    fitness = KLFitness(live, calib, TeacherCache(tmp_path / "t", 6, 16, 8), (20, 40), random.Random(0))
    dense_kl = fitness(0, [(0,) * 6])
    scores = fitness(1, [(0,) * 6, genome])
    assert dense_kl[0] > 0 and all(s > 0 for s in scores)
    assert fitness.tokens_evaluated == 20 + 2 * 40
    # The same scores with the student streamed block by block.
    streamed = LiveModel(model, spec, shape, genes, cands, store, stream=True)
    again = KLFitness(streamed, calib, TeacherCache(tmp_path / "t", 6, 16, 8), (20, 40), random.Random(0))
    assert again(0, [(0,) * 6]) == dense_kl
    assert all(abs(x - y) < 1e-5 for x, y in zip(again(1, [(0,) * 6, genome]), scores, strict=True))
