"""Tiny random models of awkward sizes (GQA, odd widths, head_dim·n_q ≠ hidden) for all families."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 101


def tiny_config(
    family: str,
    *,
    layers: int = 3,
    n_q: int = 6,
    n_kv: int = 2,
    hidden: int = 42,
    head_dim: int = 10,
    intermediate: int = 37,
):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=n_q,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=family in ("qwen2", "qwen3"),
    )
    if family == "llama":
        return LlamaConfig(**common, attention_bias=False)
    if family == "llama-bias":  # biases on every projection, o_proj and down_proj included
        return LlamaConfig(**common, attention_bias=True, mlp_bias=True)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":  # q/k/v biases
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":  # per-head q_norm / k_norm
        return Qwen3Config(**common, use_sliding_window=False)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(family, **kw), dtype=torch.float32, attn_implementation="sdpa"
    )
    with torch.no_grad():  # larger random weights so that pruning visibly changes the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def tiny_text(n_words: int, seed: int = 0) -> str:
    """Words with some structure (a random walk over the vocabulary) so that pruning has signal."""
    rng = random.Random(seed)
    w, out = 0, []
    for _ in range(n_words):
        w = (w + rng.choice((1, 2, 3, 7, -1))) % (VOCAB - 1)
        out.append(f"w{w}")
    return " ".join(out)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A local HF checkpoint (tiny random Llama with GQA) with a word-level tokenizer."""
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def calib_txt(tmp_path: Path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(tiny_text(3000))
    return p


@pytest.fixture(autouse=True)
def _isolated_home(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never touch the user's cache (slow tests use it: they need the real model) and never
    reach the hub."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("TYR_HOME", str(tmp_path_factory.mktemp("tyr-home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
