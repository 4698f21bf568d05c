"""`tyr report` and the speed helpers on a tiny pruned model: offline, seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, pruned_pair, tiny_model

from tyr import arch
from tyr.export import save_pruned
from tyr.modeling import plans_metadata
from tyr.report import (
    PLOTS,
    above_chance_retention,
    build_report,
    cost_per_million,
    measure,
    measure_in_subprocess,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEYS = {"prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s", "peak_rss_bytes", "threads"}
SMALL = {"prompt_tokens": 16, "decode_prompt": 8, "new_tokens": 4, "repeats": 1}

DENSE_ACC = {
    "arc_easy": 0.60,
    "arc_challenge": 0.28,  # 3 points above chance: left out of above-chance retention
    "boolq": 0.62,
    "hellaswag": 0.40,
    "openbookqa": 0.27,
    "rte": 0.53,
    "winogrande": 0.56,
}
PRUNED_ACC = {
    "arc_easy": 0.45,
    "arc_challenge": 0.26,
    "boolq": 0.60,
    "hellaswag": 0.33,
    "openbookqa": 0.26,
    "rte": 0.52,
    "winogrande": 0.53,
}


def _speed(prefill: float, decode: float, rss_mb: float) -> dict:
    return {
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
        "prefill_s": 512 / prefill,
        "decode_s": 128 / decode,
        "peak_rss_bytes": int(rss_mb * 1e6),
        "threads": 2,
        "device": "cpu",
        "prompt_tokens": 512,
        "decode_prompt": 128,
        "new_tokens": 128,
        "repeats": 3,
    }


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A saved tiny pruned model and a result.json consistent with its tensors."""
    masked, sliced, plans, shape = pruned_pair("llama", "free")
    out = tmp_path_factory.mktemp("run") / "out"
    save_pruned(sliced, None, plans, shape, out)
    dense_a, dense_f = shape.attn_params(shape.n_q, shape.n_kv), shape.mlp_params(shape.intermediate)
    layers = [
        {
            "index": i,
            "q_heads": len(m["kept_q"]),
            "kv_heads": len(m["kept_kv"]),
            "q_to_kv": m["q_to_kv"],
            "intermediate": m["intermediate"],
            "attn_sparsity": 1 - shape.attn_params(len(m["kept_q"]), len(m["kept_kv"])) / dense_a,
            "mlp_sparsity": 1 - shape.mlp_params(m["intermediate"]) / dense_f,
        }
        for i, m in enumerate(plans_metadata(plans, shape))
    ]
    dense_block, pruned_block = arch.count_block_params(masked), arch.count_block_params(sliced)
    result = {
        "schema": "tyr.result/1",
        "tyr_version": "0.1.0",
        "model": "tiny-llama",
        "method": "tyr",
        "sparsity_target": 0.5,
        "sparsity_achieved": 1 - pruned_block / dense_block,
        "params": {
            "dense_block": dense_block,
            "pruned_block": pruned_block,
            "dense_total": arch.count_total_params(masked),
            "pruned_total": arch.count_total_params(sliced),
        },
        "layers": layers,
        "ppl": {"source": "wiki:heldout", "tokens": 4096, "seq_len": 512, "dense": 13.971, "pruned": 71.634},
        "search": {
            "iterations": [
                {"step_attn": 2, "step_mlp": 8, "parent_fitness": [0.9, 0.7, 0.6], "seconds": 75.0},
                {"step_attn": 1, "step_mlp": 4, "parent_fitness": [0.5, 0.45, 0.44], "seconds": 65.5},
            ]
        },
        "timings": {"load": 1.5, "calibration": 2.0, "supernet": 783.0, "search": 740.0, "total": 1575.0},
        "machine": {"cpus": 2, "device": "cpu (2 threads)"},
    }
    (out / "result.json").write_text(json.dumps(result))
    return out, result


def _eval(model: str, accs: dict[str, float], ppl: float) -> dict:
    tasks = {
        t: {"acc": a, "acc_norm": a, "n": 300, "split": "validation", "shots": 0} for t, a in accs.items()
    }
    mean = sum(accs.values()) / len(accs)
    return {
        "schema": "tyr.eval/1",
        "model": model,
        "tasks": tasks,
        "mean_acc_paper7": mean,
        "mean_acc": mean,
        "ppl": {"source": "wiki:heldout", "tokens": 2048, "seq_len": 512, "value": ppl},
    }


def _copy_run(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    data = {**json.loads((dest / "result.json").read_text()), **changes}
    (dest / "result.json").write_text(json.dumps(data))
    return dest


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_report_with_evals_speed_and_price(pruned_run, tmp_path):
    out = _copy_run(pruned_run[0], tmp_path / "out")
    (out / "eval.json").write_text(json.dumps(_eval(str(out), PRUNED_ACC, 70.5)))
    (out / "eval_dense.json").write_text(json.dumps(_eval("tiny-llama", DENSE_ACC, 14.25)))
    speed = {"dense": _speed(1000.0, 50.0, 900.0), "pruned": _speed(1500.0, 80.0, 600.0)}

    path = build_report(out, usd_per_hour=3.6, speed=speed)

    assert path == out / "report" / "report.md"
    md = path.read_text()
    assert md.startswith("# tyr report: tiny-llama")
    assert "target 50.0%" in md and "## Dense vs pruned" in md
    assert "| total parameters |" in md and "| decoder-block parameters |" in md
    assert "weights on disk" in md and "(est.)" in md  # no dense_dir: estimated from the totals
    assert "| 13.97 | 71.63 | 5.13× |" in md  # held-out PPL of result.json
    assert "| 14.25 | 70.50 |" in md  # the evaluations' PPL
    assert "| ARC-Easy acc (n=300, 0-shot) | 60.0% | 45.0% | 75.0% |" in md
    assert "paper7" in md and "**90.5%** retention" in md  # 2.95 / 3.26
    # Above chance over ARC-E, BoolQ, HellaSwag, WinoGrande: 0.41 / 0.68.
    assert "above-chance retention (4 tasks)" in md and "**60.3%**" in md
    assert "| prefill tokens/s | 1,000.0 | 1,500.0 | 1.50× speedup |" in md
    assert "| decode tokens/s | 50.0 | 80.0 | 1.60× speedup |" in md
    assert "900.0 MB" in md and "600.0 MB" in md
    # $3.6/h: 1000 tokens/s → $1 per 1M tokens; 50 tokens/s → $20.
    assert "| prefill USD per 1M tokens at $3.6/h | $1.00 | $0.667 | 66.7% |" in md
    assert "| decode USD per 1M tokens at $3.6/h | $20.00 | $12.50 | 62.5% |" in md
    assert "## Timings of the run" in md and "13 min 03 s" in md and "26 min 15 s" in md
    assert "first parent KL" in md and "0.4400" in md
    for name in (v for k, v in PLOTS.items() if k != "heal"):  # heal: a healed run's (test_heal)
        assert f"]({name})" in md  # relative link beside report.md
        assert _is_png(out / "report" / name), name


def test_report_without_evals_dense_or_price(pruned_run, tmp_path):
    out = _copy_run(pruned_run[0], tmp_path / "out", method="uniform", search=None)
    md = build_report(out, speed={"pruned": _speed(1500.0, 80.0, 600.0)}).read_text()

    assert "No zero-shot evaluation was run" in md and f"tyr eval {out} --json {out}/eval.json" in md
    assert "dense model was not measured" in md
    assert "No price given" in md and "USD per 1M" not in md
    assert "| prefill tokens/s | — | 1,500.0 | — |" in md
    assert "No search (method `uniform`)" in md
    assert _is_png(out / "report" / PLOTS["sparsity"])
    assert not (out / "report" / PLOTS["fitness"]).exists()
    assert not (out / "report" / PLOTS["accuracy"]).exists()


def test_report_measures_each_model(pruned_run, tmp_path, monkeypatch):
    """Without `speed`, the pruned directory and the dense one are measured (each in its own
    process); the dense disk size is then read from the dense checkpoint, not estimated."""
    out = _copy_run(pruned_run[0], tmp_path / "out")
    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    calls = []

    def fake(path, **kw):
        calls.append(str(path))
        return _speed(1000.0, 50.0, 900.0) if str(path) == str(dense) else _speed(1200.0, 60.0, 700.0)

    monkeypatch.setattr("tyr.report.document.measure_in_subprocess", fake)
    md = build_report(out, dense_dir=str(dense)).read_text()
    assert sorted(calls) == sorted([str(out), str(dense)])
    assert "| prefill tokens/s | 1,000.0 | 1,200.0 | 1.20× speedup |" in md
    assert "Each model measured in a fresh process." in md
    assert "weights on disk" in md and "(est.)" not in md


def test_above_chance_retention():
    ret, used, d, p = above_chance_retention(DENSE_ACC, PRUNED_ACC)
    assert used == ["arc_easy", "boolq", "hellaswag", "winogrande"]
    assert d == pytest.approx(0.68) and p == pytest.approx(0.41) and ret == pytest.approx(0.41 / 0.68)
    assert above_chance_retention({"rte": 0.52}, {"rte": 0.5})[0] is None


def test_cost_per_million():
    assert cost_per_million(1000.0, 3.6) == pytest.approx(1.0)  # 3.6 M tokens per hour for $3.6
    assert cost_per_million(100.0, 0.36) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cost_per_million(0.0, 1.0)


def test_measure_tiny_model():
    model = tiny_model("llama")
    # Half of the vocabulary counts as EOS: greedy decoding would stop early if EOS were honoured.
    model.generation_config.eos_token_id = list(range(VOCAB // 2))
    m = measure(model, **SMALL)
    assert set(m) >= KEYS and m["new_tokens"] == 4 and m["device"] == "cpu"
    assert all(m[k] > 0 for k in KEYS)
    assert m["threads"] == torch.get_num_threads()
    assert m["prefill_tokens_per_s"] == pytest.approx(16 / m["prefill_s"])
    assert m["decode_tokens_per_s"] == pytest.approx(4 / m["decode_s"])


def test_measure_in_subprocess(pruned_run):
    # 3 GB resident here: the child's peak is its own (ru_maxrss would carry this process's
    # peak across exec).
    ballast = torch.ones(3 << 30, dtype=torch.uint8)
    try:
        m = measure_in_subprocess(pruned_run[0], timeout=300, **SMALL)
    finally:
        del ballast
    assert set(m) >= KEYS and m["new_tokens"] == 4
    assert all(m[k] > 0 for k in KEYS)
    assert m["peak_rss_bytes"] < 2 << 30
    with pytest.raises(RuntimeError, match="failed"):
        measure_in_subprocess(pruned_run[0] / "missing", timeout=300, **SMALL)


def test_report_cli_from_a_tiny_run(tiny_dir, calib_txt, task_wheel, tmp_path):
    """`tyr prune` (search) then `tyr report`: a quick eval of both models is run because DIR has
    none, both models' speed is measured, and the report names its plots."""
    from tyr.cli import main

    out = tmp_path / "run"
    fast = ["--calib-tokens", "512", "--seq-len", "32", "--eval-tokens", "256", "--kl-topk", "16"]
    search = ["--iterations", "1", "--generations", "2", "--offspring", "4"]
    args = ["prune", str(tiny_dir), "--sparsity", "0.4", "--out", str(out), "--calib", str(calib_txt)]
    assert main([*args, *fast, *search, "--stage-tokens", "64,256", "--survivors", "2,1"]) == 0
    report = ["report", str(out), "--dense", str(tiny_dir), "--eval-limit", "1", "--usd-per-hour", "2"]
    assert main(report) == 0
    assert json.loads((out / "eval.json").read_text())["limit"] == 1
    assert json.loads((out / "eval_dense.json").read_text())["schema"] == "tyr.eval/1"
    md = (out / "report" / "report.md").read_text()
    for png in ("sparsity_per_block.png", "fitness.png", "accuracy.png"):
        assert f"]({png})" in md and (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "A quick evaluation (1 questions per task" in md and "per 1M tokens" in md


def test_report_lists_gguf_exports_and_llama_cpp_numbers(pruned_run, tmp_path):
    from tyr import record
    from tyr.api import export_gguf

    out = _copy_run(pruned_run[0], tmp_path / "out", config={"model": "tiny-llama"})
    summary = export_gguf(out, tmp_path / "m.gguf", quant="q8_0")
    assert record.read_gguf(out)["exports"]["m.gguf"]["bytes"] == (tmp_path / "m.gguf").stat().st_size
    speed = {"pruned": _speed(1500.0, 80.0, 600.0)}
    md = build_report(out, speed=speed).read_text()
    row = f"| m.gguf | q8_0 | {summary.bytes / 1e6:.1f} MB | {len(summary.unquantized)} | 0 |"
    assert "## llama.cpp (GGUF)" in md and row in md
    assert "Not run in llama.cpp yet" in md
    row = {"file": "pruned q8_0", "bytes": 2_500_000, "prefill_tok_s": 900.0, "decode_tok_s": 41.25}
    bench = {
        "runtime": "llama-cpp-python==0.3.36",
        "machine": {"cpus": 2},
        "date": "2026-12-03",
        "ppl_tokens": 65536,
        "tyr_ppl": 60.0,
        "rows": [{**row, "peak_rss": 3e8, "ppl": 60.5}],
    }
    record.add_gguf(out, llama_cpp=bench)
    md = build_report(out, speed=speed).read_text()
    assert "| pruned q8_0 | 2.5 MB | 900 | 41.2 | 0.30 GB | 60.50 |" in md and "tyr's own model: 60.00" in md
