"""`tyr plan` estimates from configs alone: counts, bytes, speedups, the run-time calibration."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import calib_ids, tiny_config, tiny_model

from tyr.config import PRESETS, PruneConfig, offload_mode, resolve_preset, teacher_cache_mode
from tyr.errors import UserError
from tyr.report import plan


def _saved(tmp_path: Path, config, name: str = "m") -> Path:
    d = tmp_path / name
    config.save_pretrained(d)
    return d


def _bare_json(tmp_path: Path, config, name: str = "bare.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(config.to_dict()))
    return p


def _smollm2_config():
    """The embedded model's shape (SmolLM2-135M), without its weights."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    )


def _llama8b_config(**kw):
    """Llama-3.1-8B's shapes (or, with `kw`, another Llama-3.1's), without weights."""
    from transformers import LlamaConfig

    shape = {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    }
    return LlamaConfig(**{**shape, **kw})


def _llama70b_config():
    return _llama8b_config(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    )


@pytest.mark.parametrize("family", ["llama", "llama-bias", "qwen2", "qwen3"])
def test_counts_and_disk(tmp_path: Path, family: str) -> None:
    d = _saved(tmp_path, tiny_config(family))
    est = plan.estimate(str(d), 0.4, method="uniform")
    p = est["params"]
    assert p["pruned_block"] == pytest.approx(0.6 * p["dense_block"], rel=0.01)
    assert p["pruned_total"] == p["dense_total"] - (p["dense_block"] - p["pruned_block"])
    assert est["disk_bytes"] == {"dense": 4 * p["dense_total"], "pruned": 4 * p["pruned_total"]}
    half = plan.estimate(str(d), 0.4, method="uniform", dtype="bfloat16")
    assert half["params"] == p
    assert {k: 2 * v for k, v in half["disk_bytes"].items()} == est["disk_bytes"]
    json.dumps(est)  # JSON-serialisable as it is


def test_bare_config_json_matches_directory(tmp_path: Path) -> None:
    config = tiny_config("qwen2")
    from_dir = plan.estimate(str(_saved(tmp_path, config)), 0.5)
    from_file = plan.estimate(str(_bare_json(tmp_path, config)), 0.5)
    for key in ("params", "disk_bytes", "ideal_speedup", "supernet_bytes", "runtime_s", "shape"):
        assert from_file[key] == from_dir[key]
    assert from_dir["shape"]["tied"] is True and from_dir["family"] == "qwen2"


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8])
def test_ideal_speedups_between_one_and_block_bound(tmp_path: Path, sparsity: float) -> None:
    est = plan.estimate(str(_saved(tmp_path, tiny_config("llama"))), sparsity)
    for value in est["ideal_speedup"].values():
        assert 1.0 < value < 1.0 / (1.0 - sparsity)


def test_supernet_and_teacher_only_for_tyr(tmp_path: Path) -> None:
    d = str(_saved(tmp_path, tiny_config("mistral")))
    tyr, uniform = plan.estimate(d, 0.5, method="tyr"), plan.estimate(d, 0.5, method="uniform")
    assert tyr["supernet_bytes"] > 0 and tyr["teacher_cache_bytes"] > 0
    assert tyr["workdir_bytes"] >= tyr["supernet_bytes"] + tyr["teacher_cache_bytes"]
    assert uniform["supernet_bytes"] == uniform["teacher_cache_bytes"] == 0
    # uniform reads the blocks from disk: each pruned block and the MLP intermediates go there
    st, shape = uniform["settings"], uniform["shape"]
    blocks = uniform["params"]["dense_block"] * 4
    assert uniform["workdir_bytes"] == blocks + st["calib_tokens"] * shape["intermediate"] * 4
    assert tyr["runtime_s"]["supernet"] > 0 and tyr["runtime_s"]["search"] > 0
    assert uniform["runtime_s"]["prune"] > 0 and uniform["runtime_s"]["search"] == 0


def test_preset_numbers_come_from_config(tmp_path: Path) -> None:
    d = str(_saved(tmp_path, tiny_config("llama")))
    auto = plan.estimate(d, 0.5)  # tiny, on the CPU: quick
    assert auto["preset"] == "quick"
    smoke = plan.estimate(d, 0.5, preset="smoke")
    for est, name in ((auto, "quick"), (smoke, "smoke")):
        for key in ("calib_tokens", "seq_len", "eval_tokens", "iterations", "generations", "kl_topk"):
            assert est["settings"][key] == PRESETS[name][key]
    assert smoke["runtime_s"]["total"] < auto["runtime_s"]["total"]


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(UserError, match="unsupported architecture"):
        plan.estimate(str(_saved(tmp_path, config)), 0.5)
    with pytest.raises(UserError, match="unsupported architecture"):
        plan.estimate(str(_bare_json(tmp_path, config)), 0.5)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.2, 1.5])
def test_sparsity_outside_open_interval(tmp_path: Path, sparsity: float) -> None:
    with pytest.raises(UserError, match="sparsity"):
        plan.estimate(str(_saved(tmp_path, tiny_config("llama"))), sparsity)


def test_bad_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="config.json"):
        plan.estimate(str(empty), 0.5)
    no_type = tmp_path / "config.json"
    no_type.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError, match="model_type"):
        plan.estimate(str(no_type), 0.5)
    with pytest.raises(UserError):
        plan.estimate(str(_saved(tmp_path, tiny_config("llama"))), 0.5, method="magic")


def test_default_model_is_the_embedded_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import tyr.loader

    monkeypatch.setattr(tyr.loader, "open_model", lambda name: SimpleNamespace(config=tiny_config("llama")))
    est = plan.estimate(None, 0.5)
    assert est["model"] == tyr.loader.DEFAULT_MODEL and est["family"] == "llama"


def test_format_plan_mentions_each_quantity(tmp_path: Path) -> None:
    d = str(_saved(tmp_path, tiny_config("llama")))
    text = plan.format_plan(plan.estimate(d, 0.5))
    for word in (
        "parameters",
        "disk",
        "prefill",
        "decode",
        "supernet",
        "teacher cache",
        "work directory",
        "peak RAM",
        "search",
        "eval",
        "total",
        "GPU",
    ):
        assert word in text, word
    assert any(unit in text for unit in ("k |", "M |")) and any(u in text for u in ("kB", "MB"))
    uniform = plan.format_plan(plan.estimate(d, 0.5, method="uniform"))
    assert "run time: prune" in uniform and "supernet on disk" not in uniform


def test_llama_8b_from_config_alone(tmp_path: Path) -> None:
    est = plan.estimate(str(_saved(tmp_path, _llama8b_config())), 0.5)
    assert est["params"]["dense_total"] == pytest.approx(8.03e9, rel=0.01)
    assert est["preset"] == "paper" and est["shape"]["tied"] is False
    assert est["disk_bytes"]["dense"] == pytest.approx(32.1e9, rel=0.01)
    assert 1.0 < est["ideal_speedup"]["decode"] < 2.0
    assert "B |" in plan.format_plan(est) and "GB" in plan.format_plan(est)
    json.dumps(est)


def test_a_teacher_cache_too_large_for_the_disk_is_recomputed(tmp_path: Path) -> None:
    """8B at the paper's budget: 275 GB of teacher top-k; auto recomputes it per minibatch,
    which costs the stages' teacher tokens of every generation instead of the calibration set."""
    d = str(_saved(tmp_path, _llama8b_config()))
    auto, disk = plan.estimate(d, 0.5, dtype="bfloat16"), plan.estimate(d, 0.5, teacher_cache="disk")
    assert auto["teacher_cache"] == "none" and auto["teacher_cache_bytes"] == 0
    assert disk["teacher_cache"] == "disk" and disk["teacher_cache_bytes"] == 4_194_304 * 8192 * 8
    assert auto["workdir_bytes"] < disk["workdir_bytes"] - disk["teacher_cache_bytes"] / 2
    sizes = resolve_preset(PruneConfig(sparsity=0.5, out="", preset="paper"), 8_000_000_000)[2]
    assert plan.teacher_tokens(sizes, "none") == 4 * 50 * (2048 + 16384 + 131072)
    assert plan.teacher_tokens(sizes, "disk") == 4_194_304
    assert disk["runtime_s"]["search"] < plan.estimate(d, 0.5, teacher_cache="none")["runtime_s"]["search"]
    assert "recomputed per minibatch" in plan.format_plan(auto)
    assert teacher_cache_mode("auto", 32768, 256) == "disk"  # quick: 67 MB
    assert teacher_cache_mode("auto", 4_194_304, 8192) == "none"
    assert teacher_cache_mode("disk", 4_194_304, 8192) == "disk"


def test_activations_over_the_memory_budget_go_to_disk(tmp_path: Path) -> None:
    """8B at the paper's budget: 155 GB of calibration activations in bfloat16 (hidden states and
    MLP intermediates). Over the budget they go to the work directory: host memory falls by
    them, the disk grows by them; on a GPU the intermediates are recomputed instead."""
    d = str(_saved(tmp_path, _llama8b_config()))
    mem = plan.estimate(d, 0.5, dtype="bfloat16", offload="cpu")
    auto = plan.estimate(d, 0.5, dtype="bfloat16", memory_budget=64)
    assert auto["activation_bytes"] == 4_194_304 * (4096 + 14336) * 2
    assert mem["offload"] == "cpu" and auto["offload"] == "disk"
    assert auto["peak_ram_bytes"] < mem["peak_ram_bytes"] - auto["activation_bytes"] / 2
    assert auto["workdir_bytes"] == mem["workdir_bytes"] + auto["activation_bytes"]
    gpu = plan.estimate(d, 0.5, dtype="bfloat16", memory_budget=64, device="cuda")
    assert gpu["workdir_bytes"] == mem["workdir_bytes"] + 4_194_304 * 4096 * 2
    assert "activations on disk" in plan.format_plan(auto)
    assert plan.estimate(d, 0.5, dtype="bfloat16", memory_budget=200)["offload"] == "cpu"
    assert offload_mode("auto", 10, 9) == "disk" and offload_mode("auto", 9, 9) == "cpu"
    assert offload_mode("cpu", 10, 9) == "cpu"


def test_runtime_calibration_reproduces_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    d = str(_saved(tmp_path, _smollm2_config()))
    est = plan.estimate(d, 0.5, preset="quick")
    assert est["params"]["dense_total"] == pytest.approx(134.5e6, rel=0.001)
    assert est["runtime_s"]["supernet"] == pytest.approx(783, rel=0.15)
    assert est["runtime_s"]["search"] == pytest.approx(740, rel=0.15)
    # README: 0.6 GB of candidates per iteration, 65 MB of teacher logits, 2.5 GB in all.
    assert est["supernet_bytes"] == pytest.approx(0.62 * 2**30, rel=0.1)
    assert est["teacher_cache_bytes"] == 32768 * 256 * 8
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # twice the cores: half the time
    faster = plan.estimate(d, 0.5, preset="quick")
    assert faster["runtime_s"]["total"] == pytest.approx(est["runtime_s"]["total"] / 2, rel=0.01)


class _Built(Exception):
    """Stops the search once the supernet build was handed its sub-layers."""


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.37])
def test_plan_candidate_units_equal_the_supernets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sparsity):
    """`tyr plan` sizes the supernet from the same units the search asks the build for
    (GQA 9 q / 3 KV heads, an odd d_ff, 5 blocks)."""
    import tyr.methods.tyr as driver
    from tyr import arch, budget
    from tyr.methods import SearchOptions, search_prune

    model = tiny_model("llama", layers=5, n_q=9, n_kv=3, hidden=36, head_dim=8, intermediate=53)
    spec, shape = arch.spec_for(model), arch.shape_of(model)
    seen: dict = {}

    def spy(model, spec, shape, inputs, subs, *args, **kwargs):
        seen.update(subs)
        raise _Built

    monkeypatch.setattr(driver, "build", spy)
    opt = SearchOptions(
        iterations=1, generations=1, offspring=2, stage_tokens=(24,), survivors=(1,), levels=9
    )
    with pytest.raises(_Built):
        search_prune(model, spec, shape, sparsity, calib_ids(n=2), opt, tmp_path, {"t": 1})
    order = sorted(seen, key=lambda g: (budget.KINDS.index(g.kind), g.block))
    from_search = [(g.kind, [seen[g].units(k) for k in seen[g].levels]) for g in order]
    assert len(from_search) == 2 * shape.n_layers
    assert plan.candidate_units(shape, sparsity, 1, 9) == from_search


def test_weights_over_the_memory_budget_stay_on_disk(tmp_path: Path) -> None:
    """8B in bfloat16 (16 GB of weights, 24 GB with the pruned student): under a 12 GB budget
    `--weights auto` reads the blocks from disk, and the search holds its pruned student, one
    dense block and the LM head instead of the model and the student."""
    from tyr.config import weights_mode
    from tyr.search import fitness

    d = str(_saved(tmp_path, _llama8b_config()))
    whole = plan.estimate(d, 0.5, dtype="bfloat16", weights="memory", memory_budget=12)
    auto = plan.estimate(d, 0.5, dtype="bfloat16", memory_budget=12)
    assert whole["weights"] == "memory" and auto["weights"] == "disk"
    assert plan.estimate(d, 0.5, dtype="bfloat16", memory_budget=20)["weights"] == "disk"
    assert plan.estimate(d, 0.5, dtype="bfloat16", memory_budget=25)["weights"] == "memory"
    assert plan.estimate(d, 0.5, method="uniform", memory_budget=200)["weights"] == "disk"
    # the search phase saves the dense blocks but one (not the embedding or the LM head)
    saved = whole["peak_ram_bytes"] - auto["peak_ram_bytes"]
    assert whole["peak_ram_phase"] == "search"
    assert 0.8 * whole["disk_bytes"]["dense"] < saved < 0.9 * whole["disk_bytes"]["dense"]
    assert "weights block by block" in plan.format_plan(auto)
    assert (
        weights_mode("auto", "tyr", 6, 9, 0.5) == "memory"
        and weights_mode("auto", "tyr", 7, 9, 0.5) == "disk"
    )
    assert weights_mode("auto", "uniform", 1, 9, 0.5) == "disk"
    assert weights_mode("memory", "uniform", 10, 9, 0.5) == "memory"
    assert fitness.HEAD_ROWS == plan.HEAD_ROWS


def test_sizes_given_replace_the_presets(tmp_path: Path) -> None:
    """`tyr plan --set calib_tokens=...` plans the run `tyr prune --calib-tokens ...` makes."""
    d = str(_saved(tmp_path, _llama8b_config()))
    base = plan.estimate(d, 0.5, dtype="bfloat16")
    small = plan.estimate(d, 0.5, dtype="bfloat16", sizes={"calib_tokens": 4096, "levels": 3}, no_eval=True)
    assert small["settings"]["calib_tokens"] == 4096 and small["settings"]["levels"] == 3
    assert small["settings"]["eval_tokens"] == 0 and small["runtime_s"]["eval"] == 0
    assert (
        small["activation_bytes"] < base["activation_bytes"]
        and small["supernet_bytes"] < base["supernet_bytes"]
    )
    with pytest.raises(UserError, match="cannot take"):
        plan.estimate(d, 0.5, sizes={"damp": 0.1})


def test_8b_at_the_papers_budget_fits_one_gpu_host(tmp_path: Path) -> None:
    """Llama-3.1-8B shapes, bfloat16, 50 %, preset paper on one H100 and 64 GB of budget: host
    RAM ≤ 64 GB, work directory ≤ 100 GB (one supernet at a time, activations offloaded, the
    MLP intermediates recomputed), GPU memory ≤ 40 GB; 8 processes with the weights on disk
    fit a 128 GB host."""
    d = str(_saved(tmp_path, _llama8b_config()))
    est = plan.estimate(d, 0.5, dtype="bfloat16", memory_budget=64, device="cuda", gpu="h100")
    assert est["preset"] == "paper" and est["offload"] == "disk" and est["weights"] == "memory"
    assert est["peak_ram_bytes"] <= 64e9 and est["workdir_bytes"] <= 100e9
    g = est["gpu"]
    assert g["student_on_gpu"] and g["memory_bytes"] <= 40e9
    assert est["workdir_bytes"] == est["supernet_bytes"] + 4_194_304 * 4096 * 2  # the held-out states too
    # the student on the GPU: the embedding, the LM head and its pruned blocks, no dense copy
    assert est["disk_bytes"]["pruned"] < g["memory_bytes"] < est["disk_bytes"]["dense"]
    text = plan.format_plan(est)
    assert "GPU memory per process" in text and "Not calibrated" in text
    # with 8 processes the calibration forwards, solves, offspring and (recomputed per
    # minibatch) the teacher's sequences divide; the disk of the offloaded activations does not
    eight = plan.estimate(d, 0.5, dtype="bfloat16", memory_budget=64, device="cuda", nproc=8)
    one, many = est["runtime_s"], eight["runtime_s"]
    assert one["supernet"] / 8 < many["supernet"] < one["supernet"]
    assert many["search"] == pytest.approx(one["search"] / 8, rel=0.001)
    assert eight["host_ram_bytes"] > 7 * eight["peak_ram_bytes"] / 2
    on_disk = plan.estimate(
        d, 0.5, dtype="bfloat16", memory_budget=64, device="cuda", nproc=8, weights="disk"
    )
    assert on_disk["gpu"]["student_on_gpu"] and on_disk["host_ram_bytes"] <= 128e9
    # 70B: the student does not fit an 80 GB GPU and streams its blocks through it
    big = plan.estimate(
        str(_saved(tmp_path, _llama70b_config(), "70b")),
        0.5,
        dtype="bfloat16",
        memory_budget=64,
        device="cuda",
    )
    assert not big["gpu"]["student_on_gpu"] and big["gpu"]["memory_bytes"] <= 40e9
    with pytest.raises(UserError, match="unknown GPU"):
        plan.estimate(d, 0.5, device="cuda", gpu="tpu")


def test_plan_command_takes_the_gpu_and_the_process_count(tmp_path: Path, capsys) -> None:
    from tyr.cli import main

    d, out = str(_saved(tmp_path, _llama8b_config())), tmp_path / "plan.json"
    argv = ["plan", d, "--sparsity", "0.5", "--dtype", "bfloat16", "--device", "cuda", "--gpu", "a100"]
    assert main([*argv, "--nproc", "2", "--json", str(out)]) == 0
    est = json.loads(out.read_text())
    assert est["device"] == "cuda" and est["nproc"] == 2 and est["gpu"]["name"] == "a100"
    text = capsys.readouterr().out
    assert "host RAM, 2 processes on one host" in text and "NVIDIA A100" in text
    assert main([*argv, "--nproc", "0"]) == 2
    assert "not a process count" in capsys.readouterr().err
