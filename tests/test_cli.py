"""The command line and the Python API end to end on a tiny local model, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tyr
from tyr import arch
from tyr.cli import main
from tyr.config import PruneConfig, load_config_file, parse_set
from tyr.errors import UserError

FAST = ["--calib-tokens", "512", "--seq-len", "32", "--eval-tokens", "256"]


def _args(tiny_dir: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prune",
        str(tiny_dir),
        "--sparsity",
        "0.4",
        "--out",
        str(out),
        "--calib",
        str(calib),
        *FAST,
        *extra,
    ]


def test_prune_end_to_end(tiny_dir, calib_txt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, calib_txt, out, "--gqa", "uniform", "--method", "uniform")) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["schema"] == "tyr.result/1" and res["method"] == "uniform"
    assert abs(res["sparsity_achieved"] - 0.4) < 0.05
    assert res["params"]["pruned_block"] < res["params"]["dense_block"]
    assert res["ppl"]["tokens"] == 256 and res["ppl"]["seq_len"] == 32
    assert res["ppl"]["dense"] > 1 and res["ppl"]["pruned"] > 1
    assert len(res["layers"]) == 3 and {"q_heads", "kv_heads", "q_to_kv", "intermediate"} <= set(
        res["layers"][0]
    )
    assert set(res["timings"]) >= {"load", "calibration", "supernet", "search", "export", "eval", "total"}
    model = tyr.load(out)
    assert arch.count_block_params(model) == res["params"]["pruned_block"]
    assert not list(tmp_path.glob(".out.tmp-*"))
    # The same command again finds the finished result and does nothing.
    stamp = (out / "result.json").stat().st_mtime_ns
    assert main(_args(tiny_dir, calib_txt, out, "--gqa", "uniform", "--method", "uniform")) == 0
    assert (out / "result.json").stat().st_mtime_ns == stamp
    # A different configuration into the same directory needs --overwrite.
    assert main(_args(tiny_dir, calib_txt, out, "--seed", "3", "--method", "uniform")) == 2
    assert main(_args(tiny_dir, calib_txt, out, "--seed", "3", "--method", "uniform", "--overwrite")) == 0


SEARCH = [
    "--iterations",
    "2",
    "--generations",
    "3",
    "--offspring",
    "6",
    "--stage-tokens",
    "64,256",
    "--survivors",
    "2,1",
    "--kl-topk",
    "16",
]


def test_a_uniform_result_reapplied_as_a_genome_gives_the_same_widths(tiny_dir, calib_txt, tmp_path):
    out, again = tmp_path / "uniform", tmp_path / "again"
    assert main(_args(tiny_dir, calib_txt, out, "--method", "uniform")) == 0
    assert main(_args(tiny_dir, calib_txt, again, *SEARCH, "--genome", str(out / "result.json"))) == 0
    res, res2 = (json.loads((d / "result.json").read_text()) for d in (out, again))
    widths = [[(r["q_heads"], r["kv_heads"], r["intermediate"]) for r in x["layers"]] for x in (res, res2)]
    assert widths[0] == widths[1] and res2["sparsity_achieved"] == res["sparsity_achieved"]


def test_a_joint_budget_search_keeps_the_sparsity(tiny_dir, calib_txt, tmp_path):
    out = tmp_path / "joint"
    assert main(_args(tiny_dir, calib_txt, out, *SEARCH, "--budget", "joint")) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["config"]["budget"] == "joint"
    # Within the guard (0.005 of the block parameters) of the start, which is within an attention
    # unit (2·d·d_h) and a neuron (3·d) of the target on this tiny model (d = 42, d_h = 10).
    dense = res["params"]["dense_block"]
    assert abs(res["sparsity_achieved"] - 0.4) <= 0.005 + (2 * 42 * 10 + 3 * 42) / dense
    assert sum(len(it["genome"]) for it in res["search"]["iterations"]) == 12


def test_a_final_pass_reprunes_at_the_searched_widths(tiny_dir, calib_txt, tmp_path):
    plain, again = tmp_path / "plain", tmp_path / "again"
    assert main(_args(tiny_dir, calib_txt, plain, *SEARCH)) == 0
    assert main(_args(tiny_dir, calib_txt, again, *SEARCH, "--final-pass", "reprune")) == 0
    res, res2 = (json.loads((d / "result.json").read_text()) for d in (plain, again))
    widths = [[(r["q_heads"], r["kv_heads"], r["intermediate"]) for r in x["layers"]] for x in (res, res2)]
    assert widths[0] == widths[1] and res2["sparsity_achieved"] == res["sparsity_achieved"]
    searches = [[(it["centres"], it["genome"]) for it in x["search"]["iterations"]] for x in (res, res2)]
    assert searches[0] == searches[1]  # the same search
    assert res2["ppl"]["pruned"] != res["ppl"]["pruned"]  # other weights: calibrated along the chosen path


def test_search_end_to_end(tiny_dir, calib_txt, tmp_path):
    out = tmp_path / "searched"
    assert main(_args(tiny_dir, calib_txt, out, *SEARCH)) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == "tyr" and abs(res["sparsity_achieved"] - 0.4) < 0.05
    its = res["search"]["iterations"]
    assert len(its) == 2 and its[0]["step_attn"] == 1 and its[1]["step_mlp"] < its[0]["step_mlp"]
    assert len(its[0]["genome"]) == 6 and sum(its[0]["genome"][1::2]) == 0  # Σ k = 0 over FFN genes
    assert len(its[0]["parent_fitness"]) == 3
    assert res["timings"]["supernet"] > 0 and res["timings"]["search"] > 0
    assert arch.count_block_params(tyr.load(out)) == res["params"]["pruned_block"]

    # --genome applies a searched result without searching: every block's (q, kv) heads and FFN
    # width, and so the sparsity, exactly.
    again = tmp_path / "applied"
    assert main(_args(tiny_dir, calib_txt, again, *SEARCH, "--genome", str(out / "result.json"))) == 0
    res2 = json.loads((again / "result.json").read_text())
    assert len(res2["search"]["iterations"]) == 1 and set(res2["search"]["iterations"][0]["genome"]) == {0}
    widths = [[(r["q_heads"], r["kv_heads"], r["intermediate"]) for r in x["layers"]] for x in (res, res2)]
    assert widths[0] == widths[1] and res2["sparsity_achieved"] == res["sparsity_achieved"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"attn": [1, 2], "mlp": [3, 4]}))
    assert main(_args(tiny_dir, calib_txt, tmp_path / "x", *SEARCH, "--genome", str(bad))) == 2


def test_search_is_deterministic(tiny_dir, calib_txt, tmp_path):
    """The same seed gives the same genome and bytes, whether the teacher's top-k logits are
    cached on disk (auto, for a small calibration set) or recomputed for every minibatch."""
    genomes, fitness = [], []
    for run, extra in (("a", []), ("b", ["--teacher-cache", "none"])):
        out = tmp_path / run
        args = [
            *_args(tiny_dir, calib_txt, out, *SEARCH, *extra),
            "--workdir",
            str(tmp_path / f"w{run}"),
            "--no-eval",
        ]
        assert main(args) == 0
        res = json.loads((out / "result.json").read_text())
        genomes.append([it["genome"] for it in res["search"]["iterations"]])
        fitness.append([it["parent_fitness"] for it in res["search"]["iterations"]])
        assert (out / "model.safetensors").is_file()
    assert genomes[0] == genomes[1] and fitness[0] == fitness[1]
    a, b = ((tmp_path / r / "model.safetensors").read_bytes() for r in ("a", "b"))
    assert a == b  # the same seed gives the same exported bytes
    assert (tmp_path / "wa" / "teacher" / "values.f32").is_file()
    assert not (tmp_path / "wb" / "teacher").exists()


def test_activations_over_the_memory_budget_go_to_disk(tiny_dir, calib_txt, tmp_path, caplog):
    """--offload auto with a budget smaller than the activations keeps them in the work
    directory; the model is the same, byte for byte, and the identity too (a finished output
    is found again whatever the placement)."""
    caplog.set_level("INFO", logger="tyr")
    runs = {"auto": ["--memory-budget", "1e-6"], "cpu": ["--offload", "cpu"]}  # auto fills the cache
    for name, extra in runs.items():
        args = [*_args(tiny_dir, calib_txt, tmp_path / name, "--method", "uniform", *extra)]
        args += ["--workdir", str(tmp_path / f"w-{name}")]
        assert main(args) == 0
    assert "calibration activations (0.00 GB) in the work directory; budget 0.00 GB" in caplog.text
    assert "held-out activations (0.00 GB) in the work directory" in caplog.text
    a, b = ((tmp_path / r / "model.safetensors").read_bytes() for r in runs)
    assert a == b
    res = [json.loads((tmp_path / r / "result.json").read_text()) for r in runs]
    assert res[0]["config_identity"] == res[1]["config_identity"]
    assert res[0]["ppl"] == res[1]["ppl"]  # dense (computed once, then cached) and pruned


def test_python_api(tiny_dir, calib_txt, tmp_path):
    r = tyr.prune(
        str(tiny_dir),
        sparsity=0.3,
        out=tmp_path / "api",
        calib=str(calib_txt),
        calib_tokens=256,
        seq_len=32,
        no_eval=True,
    )
    assert r.ppl is None and abs(r.sparsity_achieved - 0.3) < 0.06
    with pytest.raises(UserError, match="unknown key"):
        tyr.prune(str(tiny_dir), sparsity=0.3, out=tmp_path / "x", not_an_option=1)


def test_dense_perplexity_is_computed_once(tiny_dir, calib_txt, tmp_path, monkeypatch):
    import tyr.api

    calls: list[str] = []
    real = tyr.api.perplexity

    def counting(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tyr.api, "perplexity", counting)
    opts = dict(calib=str(calib_txt), calib_tokens=256, seq_len=32, eval_tokens=128)
    a = tyr.prune(str(tiny_dir), sparsity=0.3, out=tmp_path / "a", **opts)
    b = tyr.prune(str(tiny_dir), sparsity=0.5, out=tmp_path / "b", **opts)
    assert calls == ["dense perplexity", "pruned perplexity", "pruned perplexity"]
    assert a.ppl is not None and b.ppl is not None and a.ppl["dense"] == b.ppl["dense"]


def _bad(capsys, argv: list[str], needle: str, out: Path | None = None) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tyr: error:") and needle in err, err
    assert "Traceback" not in err
    if out is not None:
        assert not (out / "result.json").exists()


def test_bad_input_gives_one_line_and_exit_2(tiny_dir, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    _bad(
        capsys,
        ["prune", str(tmp_path / "nope"), "--sparsity", "0.5", "--out", str(out)],
        "does not exist",
        out,
    )
    _bad(
        capsys,
        ["prune", str(tmp_path / "nope.gguf"), "--sparsity", "0.5", "--out", str(out)],
        "does not exist",
    )
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    _bad(capsys, ["prune", str(gpt2), "--sparsity", "0.5", "--out", str(out)], "llama", out)
    for s in ("0", "1", "1.5", "-0.1"):
        _bad(capsys, ["prune", str(tiny_dir), "--sparsity", s, "--out", str(out)], "outside (0, 1)", out)
    _bad(
        capsys,
        _args(tiny_dir, calib_txt, out)[:-6] + ["--calib-tokens", "100000", "--seq-len", "32"],
        "fewer than",
        out,
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _bad(capsys, _args(tiny_dir, calib_txt, blocker / "sub"), "cannot write --out", blocker / "sub")
    _bad(capsys, _args(tiny_dir, calib_txt, out, "--set", "nope=1"), "unknown key", out)
    _bad(capsys, _args(tiny_dir, calib_txt, out, "--gqa", "sideways"), "not valid", out)
    _bad(capsys, ["prune", "--sparsity", "0.5"], "--out")
    broken = tmp_path / "broken.yaml"
    broken.write_text("damp: [0.1\n")
    _bad(capsys, _args(tiny_dir, calib_txt, out, "--config", str(broken)), "cannot parse", out)
    broken.write_text("1: x\n")
    _bad(capsys, _args(tiny_dir, calib_txt, out, "--config", str(broken)), "not a mapping", out)
    broken.write_bytes(b"\xff\xfe damp: 1")
    _bad(capsys, _args(tiny_dir, calib_txt, out, "--config", str(broken)), "cannot parse", out)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in tiny_dir.iterdir():
        if "token" not in f.name:
            (no_tok / f.name).write_bytes(f.read_bytes())
    _bad(capsys, _args(no_tok, calib_txt, out), "tokenizer", out)
    # The tiny model has 256 positions: an explicit longer --seq-len is refused.
    _bad(capsys, [*_args(tiny_dir, calib_txt, out), "--seq-len", "512"], "context of 256 positions", out)
    genome = tmp_path / "genome.json"
    genome.write_text(json.dumps({"attn": [0, 9, 1], "mlp": [0, 0, 0]}))
    _bad(
        capsys,
        [*_args(tiny_dir, calib_txt, out), "--genome", str(genome)],
        "attn[1] = 9 is outside 0..6",
        out,
    )
    genome.write_text(json.dumps({"attn": [0, 0, 0], "mlp": [0, -1, 0]}))
    _bad(capsys, [*_args(tiny_dir, calib_txt, out), "--genome", str(genome)], "mlp[1] = -1 is outside", out)
    genome.write_text(json.dumps({"q_heads": [1, 6, 5], "kv_heads": [2, 2, 2], "intermediate": [37] * 3}))
    _bad(
        capsys,
        [*_args(tiny_dir, calib_txt, out), "--genome", str(genome)],
        "block 0 keeps 1 query heads",
        out,
    )
    genome.write_text(json.dumps({"q_heads": [6, 6, 5], "intermediate": [37] * 3}))  # 5 heads: 3 + 2
    _bad(
        capsys,
        [*_args(tiny_dir, calib_txt, out), "--gqa", "uniform", "--genome", str(genome)],
        "block 2",
        out,
    )
    genome.write_text("{")
    _bad(capsys, [*_args(tiny_dir, calib_txt, out), "--genome", str(genome)], "cannot read --genome", out)
    _bad(
        capsys,
        [*_args(tiny_dir, calib_txt, out), "--method", "uniform", "--budget", "joint"],
        "only for",
        out,
    )
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "result.json").write_text("{truncated")
    _bad(capsys, _args(tiny_dir, calib_txt, junk), "--overwrite")
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_out(tiny_dir, calib_txt, tmp_path, capsys):
    """A directory the process may not write into (root may write anywhere but /sys)."""
    if os.geteuid() == 0:
        target = Path("/sys/tyr-test-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    _bad(capsys, _args(tiny_dir, calib_txt, target), "cannot write --out")


def test_config_file_and_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("damp: 0.02\nno-eval: true\ncalib_tokens: 128\n")
    assert load_config_file(str(f)) == {"damp": 0.02, "no_eval": True, "calib_tokens": 128}
    assert parse_set(["seed=4", "seq-len=64", "workdir=none"]) == {"seed": 4, "seq_len": 64, "workdir": None}
    with pytest.raises(UserError):
        parse_set(["seed"])
    with pytest.raises(UserError):
        parse_set(["no_eval=maybe"])
    a = PruneConfig(sparsity=0.5, out="a")
    assert a.identity() == PruneConfig(sparsity=0.5, out="b", overwrite=True).identity()
    assert a.identity() != PruneConfig(sparsity=0.5, out="a", seed=1).identity()


def test_module_entry_point_version():
    proc = subprocess.run([sys.executable, "-m", "tyr", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("tyr ")


def test_dtype_bfloat16_runs(tiny_dir, calib_txt, tmp_path):
    r = tyr.prune(
        str(tiny_dir),
        sparsity=0.5,
        out=tmp_path / "bf",
        calib=str(calib_txt),
        calib_tokens=256,
        seq_len=32,
        eval_tokens=128,
        dtype="bfloat16",
    )
    assert r.ppl is not None and torch.isfinite(torch.tensor(r.ppl["pruned"]))
