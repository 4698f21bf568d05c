"""The uniform pipeline: exact budgets, chosen-path propagation, streaming equivalence."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from conftest import VOCAB, tiny_model, tiny_text, tiny_tokenizer

import tyr
from tyr import arch
from tyr.budget import attn_removed, initial_centres, structures
from tyr.eval import perplexity
from tyr.methods import SolverOptions, prune_uniform
from tyr.modeling import apply_plans
from tyr.stream import capture, run_blocks


def _calib(n=8, T=20, seed=0):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def test_every_block_gets_the_even_split_and_the_searchs_level_zero():
    """n_q = 9, n_kv = 3: 50 % is 6 of 12 attention units in every block ((4q, 2kv) or (3q, 3kv)),
    the allocation that the search starts from."""
    model = tiny_model("llama", n_q=9, n_kv=3, layers=4, hidden=27, head_dim=4, intermediate=30)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    centres = initial_centres(shape, 0.5)
    assert centres == {"attn": [6] * 4, "mlp": [15] * 4}
    inputs = capture(model, spec, list(_calib().split(4)))
    plans = prune_uniform(model, spec, shape, inputs, 0.5, SolverOptions())
    for p in plans:
        assert p is not None
        q, v = len(p.heads.kept_q), len(p.heads.kept_kv)
        assert (q, v) in [(4, 2), (3, 3)] and len(p.kept_neurons) == 15
    removed = sum(attn_removed(shape, p.heads.kept_q) for p in plans if p is not None)
    assert removed == 4 * 6 * 2 * shape.hidden * shape.head_dim


def test_streaming_matches_the_full_forward():
    model = tiny_model("mistral")
    spec = arch.spec_for(model)
    ids = _calib(n=4)
    inputs = run_blocks(model, spec, capture(model, spec, list(ids.split(2))))
    with torch.inference_mode():
        full = model.model(ids).last_hidden_state
        streamed = torch.cat([inputs.hidden[i] for i in range(len(inputs))])
        norm = arch.get_module(model, spec.final_norm)
        assert torch.allclose(norm(streamed), full, atol=1e-5)
        logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert perplexity(model, spec, ids, batch_size=3) == pytest.approx(float(nll.exp()), rel=1e-5)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_propagated_inputs_are_the_pruned_models_activations(offload, tmp_path):
    """Block b is calibrated on the outputs of the already pruned blocks < b: the z·ΔWᵀ shortcut
    leaves exactly the activations that the pruned (masked) model produces."""
    model = tiny_model("llama")
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    ids = _calib()
    inputs = capture(model, spec, list(ids.split(4)), offload=offload, offload_root=tmp_path)
    prune_uniform(model, spec, shape, inputs, 0.4, SolverOptions())
    again = run_blocks(model, spec, capture(model, spec, list(ids.split(4))))
    for i in range(len(inputs)):
        assert torch.allclose(inputs.hidden[i], again.hidden[i], atol=1e-5)
    inputs.close()


def test_later_blocks_see_pruned_not_dense_activations():
    """Error propagation acts: block 1's calibration differs from the dense model's."""
    torch.manual_seed(0)
    ids = _calib()
    grams = {}
    for mode in ("chosen", "dense"):
        model = tiny_model("llama")
        spec, shape = arch.spec_for(model), arch.shape_of(model)
        layers = arch.layers(model, spec)
        seen: list[torch.Tensor] = []

        def keep(module, args, seen=seen):
            seen.append(args[0].reshape(-1, args[0].shape[-1]).clone())

        hook = arch.attention_parts(layers[1], spec).o.register_forward_pre_hook(keep)
        if mode == "chosen":
            inputs = capture(model, spec, list(ids.split(4)))
            prune_uniform(model, spec, shape, inputs, 0.5, SolverOptions())
        else:
            run_blocks(model, spec, capture(model, spec, list(ids.split(4))))
        hook.remove()
        X = torch.cat(seen[: len(ids.split(4))])  # first pass over block 1 = its calibration pass
        grams[mode] = X.T @ X
    assert (grams["chosen"] - grams["dense"]).norm() > 1e-3 * grams["dense"].norm()


@pytest.mark.parametrize("family", ["qwen2", "llama-bias"])
@pytest.mark.parametrize("gqa", ["free", "uniform"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_achieved_sparsity_is_near_the_target(family, gqa, sparsity):
    model = tiny_model(family, layers=6)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    dense = arch.count_block_params(model, spec)
    inputs = capture(model, spec, list(_calib().split(4)))
    plans = prune_uniform(model, spec, shape, inputs, sparsity, SolverOptions(gqa=gqa))
    removed = sum(attn_removed(shape, p.heads.kept_q) for p in plans if p is not None)
    removed += sum(
        shape.mlp_params(shape.intermediate) - shape.mlp_params(len(p.kept_neurons))
        for p in plans
        if p is not None
    )
    block = shape.attn_params(shape.n_q, shape.n_kv)
    # Within the widest gap between removable attention counts (tiny models have coarse ones).
    counts = sorted(structures(shape, gqa))
    step = block / (shape.n_q + shape.n_kv) * max(b - a for a, b in itertools.pairwise(counts))
    assert abs(removed - sparsity * dense) <= step + shape.mlp_params(1)
    sliced = arch.count_block_params(apply_plans(copy.deepcopy(model), plans, spec, shape))
    assert sliced == dense - removed


def test_magnitude_baseline_runs_and_keeps_dense_weights():
    model = tiny_model("llama")
    dense_o = arch.attention_parts(arch.layers(model)[0], arch.spec_for(model)).o.weight.clone()
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    inputs = capture(model, spec, list(_calib().split(4)))
    plans = prune_uniform(model, spec, shape, inputs, 0.5, SolverOptions(solver="magnitude"))
    p0 = plans[0]
    assert p0 is not None
    kept_cols = torch.cat(
        [torch.arange(h * shape.head_dim, (h + 1) * shape.head_dim) for h in p0.heads.kept_q]
    )
    assert torch.equal(p0.o_weight, dense_o[:, kept_cols])  # no refit


def test_rerunning_the_block_equals_the_residual_shortcut():
    """For a family whose MLP output is not a plain residual the block is re-run instead."""
    ids = _calib()
    runs = []
    for residual in (True, False):
        model = tiny_model("llama")
        spec = dataclasses.replace(arch.spec_for(model), mlp_output_is_residual=residual)
        inputs = capture(model, spec, list(ids.split(4)))
        plans = prune_uniform(model, spec, arch.shape_of(model), inputs, 0.5, SolverOptions())
        runs.append((plans, torch.cat([inputs.hidden[i] for i in range(len(inputs))])))
    (p1, h1), (p2, h2) = runs
    assert (h1 - h2).abs().max() <= 1e-4 * h1.abs().max(), (h1 - h2).abs().max()
    assert all(a is not None and b is not None and a.heads == b.heads for a, b in zip(p1, p2, strict=True))


@pytest.mark.parametrize("method", ["uniform", "tyr"])
def test_ffn_unit_gives_ffn_widths_in_its_multiples(tmp_path, method):
    d = tmp_path / "ckpt"
    tiny_model("llama", intermediate=48).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(3000))
    common = dict(calib=str(text), calib_tokens=384, seq_len=24, no_eval=True, batch_size=4)
    common.update(method=method)
    if method == "tyr":
        common.update(iterations=2, generations=2, offspring=4, stage_tokens="48,96", survivors="2,1")
    res = tyr.prune(
        str(d), sparsity=0.4, out=tmp_path / "o", ffn_unit=8, levels=3, workdir=str(tmp_path / "w"), **common
    )
    widths = [row["intermediate"] for row in res.data["layers"]]
    assert all(w % 8 == 0 for w in widths) and sum(widths) == 3 * 48 - 8 * round(0.4 * 6 * 3)
    with pytest.raises(tyr.UserError, match="does not divide"):
        tyr.prune(
            str(d),
            sparsity=0.4,
            out=tmp_path / "o2",
            ffn_unit=7,
            levels=3,
            workdir=str(tmp_path / "w2"),
            **common,
        )
