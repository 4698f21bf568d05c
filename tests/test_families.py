"""Every supported family through the whole pipeline: a short search at 50 %, export, and a reload
in a process without tyr; and clear refusals for the families tyr cannot prune."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, calib_ids, load_without_tyr, tiny_config, tiny_model

from tyr import arch
from tyr.errors import UserError
from tyr.export import save_pruned
from tyr.methods import SearchOptions, search_prune
from tyr.modeling import apply_plans
from tyr.stream import capture, run_blocks

# At least 8 query heads and 4 blocks, so that 50 % is reachable within ±0.01 in real parameters.
SIZE = dict(layers=4, n_q=8, n_kv=2, hidden=40, head_dim=12, intermediate=45)
SEARCH = SearchOptions(
    iterations=2, generations=3, offspring=6, stage_tokens=(96, 384), survivors=(2, 1), levels=5, kl_topk=16
)


def test_every_family_searches_exports_and_reloads_without_tyr(tmp_path):
    calib = calib_ids(seed=1, n=16, T=24)  # longer than the Gemma test window of 8
    models, outs, achieved = {}, [], {}
    for family in FAMILIES:
        model = tiny_model(family, **SIZE)
        spec, shape = arch.spec_for(model), arch.shape_of(model)
        dense_block = arch.count_block_params(model, spec)
        plans, log = search_prune(
            model, spec, shape, 0.5, calib, SEARCH, tmp_path / f"w-{family}", {"family": family}
        )
        assert len(log) == 2 and all(len(it["parent_fitness"]) == 3 for it in log), family
        apply_plans(model, plans, spec, shape)
        achieved[family] = 1 - arch.count_block_params(model, spec) / dense_block
        out = tmp_path / f"out-{family}"
        save_pruned(model, None, plans, shape, out)
        models[out], outs = model, [*outs, out]
    assert all(abs(s - 0.5) <= 0.01 for s in achieved.values()), achieved

    ids = calib_ids(seed=5, n=2, T=20)
    remote = load_without_tyr(tmp_path, outs, ids)
    for out in outs:
        with torch.no_grad():
            ref = models[out](ids).logits
        diff = float((remote[f"{out}:logits"] - ref).abs().max())
        family = out.name.removeprefix("out-")
        print(f"{family}: sparsity {achieved[family]:.4f}, max |Δlogits| after reload {diff:.2e}")
        assert diff <= 1e-4, out
        assert int(remote[f"{out}:params"]) == arch.count_total_params(models[out]), out


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2"])
def test_streaming_feeds_each_block_its_attention_type(family):
    """Sliding-window and global blocks get their own masks (and, in Gemma 3, rotary tables):
    block-by-block propagation equals the model's own forward, logits soft-capped as it does."""
    from tyr.eval import perplexity

    model = _qwen2_sliding() if family == "qwen2" else tiny_model(family)
    spec = arch.spec_for(model)
    ids = calib_ids(seed=2, n=4, T=24)
    inputs = run_blocks(model, spec, capture(model, spec, list(ids.split(2))))
    with torch.inference_mode():
        full = arch.get_module(model, spec.layers.rpartition(".")[0])(ids).last_hidden_state
        streamed = torch.cat([inputs.hidden[i] for i in range(len(inputs))])
        assert torch.allclose(arch.get_module(model, spec.final_norm)(streamed), full, atol=1e-5)
        logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert perplexity(model, spec, ids, batch_size=3) == pytest.approx(float(nll.exp()), rel=1e-5)


def _qwen2_sliding():
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window = True, 8
    config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "mixture-of-experts"),
        ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}, "mixture-of-experts"),
        ({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}, "latent attention"),
        ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "text model"),
        ({"model_type": "newmoe", "num_local_experts": 8}, "mixture-of-experts"),
        ({"model_type": "newmla", "kv_lora_rank": 512}, "latent attention"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "tyr supports"),
    ],
)
def test_unsupported_families_say_what_is_missing(config, needle):
    class Config:
        pass

    c = Config()
    c.__dict__.update(config)
    with pytest.raises(UserError, match=needle) as err:
        arch.spec_for_config(c)
    assert "unsupported architecture" in str(err.value) and "llama" in str(err.value)
