"""Search fitness: sparse top-k KL, the on-disk teacher cache, the physically sliced live model."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_supernet import _sublayers

from tyr import arch, budget
from tyr.budget import KINDS, Gene, layout
from tyr.modeling import LayerPlan, mask_plans
from tyr.search.fitness import KLFitness, LiveModel, TeacherCache, _reference, head_logits, topk_kl
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


def test_head_logits_equal_the_full_head():
    model = tiny_model("qwen2")  # tied embeddings
    spec = arch.spec_for(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    idx = torch.randint(0, VOCAB, (2, 9, 5))
    with torch.inference_mode():
        full = model(ids).logits.float().gather(-1, idx)
        h = model.model(input_ids=ids).last_hidden_state
        assert torch.allclose(head_logits(model, spec, h, idx, chunk=4), full, atol=1e-5)


def test_head_logits_gradient_repeats_bit_for_bit():
    """Healing trains through head_logits and must give the same bytes run after run. The
    backward of an advanced index (W[idx]) accumulates with atomic adds on the CPU, whose order
    follows the threads' timing; index_select's backward (index_add) does not. A race shows only
    now and then, so the graph is checked for the node, and the gradient for repeatability."""
    model = tiny_model("qwen2")  # tied embeddings, a bias-free head
    spec = arch.spec_for(model)
    head = arch.get_module(model, spec.lm_head)
    h = torch.randn(4, 256, head.weight.shape[1])
    idx = torch.randint(0, VOCAB, (4, 256, 64))  # every row is picked many times

    def graph(fn) -> set[str]:
        seen, todo = set(), [fn]
        while todo:
            node = todo.pop()
            if node is not None and node.name() not in seen:
                seen.add(node.name())
                todo += [n for n, _ in node.next_functions]
        return seen

    def grad() -> torch.Tensor:
        head.weight.grad = None
        z = head_logits(model, spec, h, idx)
        assert not any(name.startswith("IndexBackward") for name in graph(z.grad_fn))
        z.square().sum().backward()
        return head.weight.grad.clone()

    first = grad()
    assert all(torch.equal(first, grad()) for _ in range(8))


def test_reference_is_the_parent_of_offspring():
    parent = (1, 0, -1, 2, 0, 0)
    kids = [(2, -1, -1, 2, 0, 0), (1, 0, 0, 1, 0, 0), (1, 0, -1, 2, 1, -1)]
    assert _reference(kids) == parent
    assert _reference([parent, *kids]) == parent
    assert _reference([(0, 1), (1, 0)]) == (0, 0)  # ties: the lowest level


def test_teacher_cache_fills_lazily_and_persists(tmp_path):
    logits = torch.randn(5, 6, 30)
    asked: list[list[int]] = []

    def teacher(row, k):
        asked.append([row])
        top = logits[row].topk(k, -1)
        return top.values, top.indices

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


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: soft-capped logits
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_genome_of_dense_candidates_scores_zero_kl(tmp_path, family, dtype):
    """The teacher's logits take the student's path (blocks in the model dtype, the LM head in
    fp32), so the dense genome scores 0 in bf16 too, not the teacher's rounding."""
    model = tiny_model(family).to(dtype)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    genes = [Gene(b, k) for b in range(shape.n_layers) for k in KINDS]
    subs = budget.sublayers(shape, dict.fromkeys(genes, 0), budget.steps(shape, 1), 1)  # level 0: dense
    store = Store(tmp_path, 1, {"t": 1})
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    cands = build(
        model, spec, shape, capture(model, spec, list(calib.split(2))), subs, store, SupernetOptions()
    )
    live = LiveModel(model, spec, shape, genes, cands, store)
    fitness = KLFitness(live, calib, TeacherCache(tmp_path / "t", 4, 16, 16), (64,), random.Random(0))
    assert fitness(0, [(0,) * len(genes)])[0] < 1e-7
    assert fitness(0, [(1,) * len(genes)])[0] > 1e-3  # a pruned genome does not


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding and global layers
@pytest.mark.parametrize("stream", [False, True])
def test_reused_parent_activations_change_no_score(tmp_path, family, stream):
    """Genomes scored together branch from the reference genome's hidden states at their first
    own block: each score is the one the genome gets alone (same bits), and the one a plain
    forward of the sliced model gives."""
    model = tiny_model(family)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    store = Store(tmp_path, 1, {"t": 1})
    calib = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(2))
    subs = _sublayers(shape)
    inputs = capture(model, spec, list(calib.split(3)))
    cands = build(model, spec, shape, inputs, subs, store, SupernetOptions())
    genes = [Gene(b, k) for b in range(shape.n_layers) for k in KINDS]
    live = LiveModel(model, spec, shape, genes, cands, store, stream=stream)
    parent = [0] * len(genes)
    parent[0], parent[1] = 1, -1
    parent = tuple(parent)
    kids = []
    for i in (len(genes) - 2, 2, 0):  # first own blocks: the last, the second, the first
        kid = list(parent)
        kid[i] -= 1
        kid[i + (2 if i + 2 < len(genes) else -2)] += 1
        kids.append(tuple(kid))
    genomes = [parent, *kids]
    teacher = TeacherCache(tmp_path / "t", 5, 16, 8)

    def fitness() -> KLFitness:
        return KLFitness(live, calib, teacher, (50,), random.Random(3), batch_size=2)

    together = fitness()(0, genomes)
    alone = [fitness()(0, [g])[0] for g in genomes]
    assert together == alone
    assert len(set(together)) == len(genomes)

    rows, last = fitness().minibatch(50)
    vals, idx = teacher.get(rows, None)
    for genome, score in zip(genomes, together, strict=True):
        sliced = live.apply(genome)
        total, count = 0.0, 0
        with torch.inference_mode():
            for r, n in zip(range(len(rows)), [16] * (len(rows) - 1) + [last], strict=True):
                logits = sliced(calib[rows[r : r + 1], :n]).logits
                kl, c = topk_kl(logits, vals[r : r + 1, :n], idx[r : r + 1, :n])
                total, count = total + kl, count + c
        assert abs(score - total / count) < 1e-5 * max(1.0, score)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: soft-capped logits
def test_teacher_topk_of_a_bf16_head_merges_slices_of_the_vocabulary(monkeypatch, family):
    """A bfloat16 LM head is converted a slice of rows at a time and each slice's top-k merged:
    the top-k of the whole fp32 logits, with slices that do not divide the vocabulary."""
    from tyr.search import fitness as fit

    model = tiny_model(family).to(torch.bfloat16)
    spec = arch.spec_for(model)
    h = torch.randn(2, 5, model.config.hidden_size)
    head = arch.get_module(model, spec.lm_head)
    full = fit._softcap(model, h @ head.weight.float().T)
    want = full.topk(6, dim=-1)
    monkeypatch.setattr(fit, "HEAD_ROWS", 7)  # VOCAB is not a multiple of 7
    vals, idx = fit._topk_logits(model, spec, h, 6)
    assert torch.equal(idx, want.indices)
    assert torch.allclose(vals, want.values, rtol=0, atol=1e-5)


def _student_parts(tmp_path, family="qwen2"):
    """A tiny model (qwen2: tied embeddings) with a one-iteration supernet, and a genome."""
    model = tiny_model(family)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    store = Store(tmp_path, 1, {"t": 1})
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(4))
    cands = build(
        model,
        spec,
        shape,
        capture(model, spec, list(calib.split(2))),
        _sublayers(shape),
        store,
        SupernetOptions(),
    )
    genes = [Gene(b, k) for b in range(shape.n_layers) for k in KINDS]
    genome = tuple((-1) ** i for i in range(len(genes)))
    return model, spec, shape, genes, cands, store, genome


def test_a_student_on_a_device_is_built_block_by_block(tmp_path):
    """On an accelerator the student copies the tensors outside the blocks there (a tied pair
    stays one tensor) and each block goes there once sliced: the host never holds a second dense
    model. The meta device stands in for the accelerator here; tests/test_cuda.py runs a GPU."""
    model, spec, shape, genes, cands, store, genome = _student_parts(tmp_path)
    host = LiveModel(model, spec, shape, genes, cands, store)
    device = LiveModel(model, spec, shape, genes, cands, store, device="meta", stream=False)
    embed = arch.get_module(device.model, spec.embed).weight
    assert embed.is_meta and embed is arch.get_module(device.model, spec.lm_head).weight
    assert arch.get_module(host.model, spec.embed).weight is arch.get_module(model, spec.embed).weight
    assert all(t.is_meta for layer in arch.layers(device.model, spec) for t in layer.state_dict().values())
    on_host, on_device = host.apply(genome).state_dict(), device.apply(genome).state_dict()
    assert on_host.keys() == on_device.keys()
    for name, t in on_device.items():
        assert t.is_meta and t.shape == on_host[name].shape, name
    assert sum(t.numel() for t in on_host.values()) < sum(p.numel() for p in model.parameters())
    assert not any(t.is_meta for t in model.state_dict().values())  # the dense model is untouched
