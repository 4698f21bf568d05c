"""Crash safety: a run killed anywhere resumes to the same bytes; locks, option changes, a full
disk and untrusted checkpoint code."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from conftest import kill_when

from tyr.cli import main
from tyr.infra import locked

SEARCH = [
    "--iterations", "2", "--generations", "3", "--offspring", "6",
    "--stage-tokens", "64,256", "--survivors", "2,1", "--kl-topk", "16",
]  # fmt: skip


def _argv(tiny_dir: Path, calib: Path, out: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        "prune", str(tiny_dir), "--sparsity", "0.4", "--out", str(out), "--workdir", str(workdir),
        "--calib", str(calib), "--calib-tokens", "512", "--seq-len", "32", "--no-eval", *SEARCH, *extra,
    ]  # fmt: skip


def _outcome(out: Path) -> tuple[list[list[int]], str]:
    res = json.loads((out / "result.json").read_text())
    weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    return [it["genome"] for it in res["search"]["iterations"]], weights


def test_killed_runs_resume_to_identical_bytes(tiny_dir, calib_txt, tmp_path):
    ref = tmp_path / "ref"
    assert main(_argv(tiny_dir, calib_txt, ref, tmp_path / "w-ref")) == 0
    expected = _outcome(ref)

    out, work = tmp_path / "out", tmp_path / "w"
    argv = _argv(tiny_dir, calib_txt, out, work)
    sn = work / "supernet"
    triggers = [
        sn / "iter1" / "blk001.attn",  # during the first supernet build
        sn / "iter1" / "search.ckpt.json",  # during the first search
        sn / "iter2" / "blk000.mlp",  # during the second supernet build
        sn / "iter2" / "search.ckpt.json",  # during the second search
    ]
    for trigger in triggers:
        assert kill_when(argv, trigger), f"the run finished before {trigger.name} appeared"
        assert not out.exists()  # nothing claims to be finished
    assert main(argv) == 0
    assert _outcome(out) == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # stale temporaries gone
    # One supernet at a time: a finished iteration keeps its genome, not its candidates.
    assert not list((sn / "iter1").glob("blk*")) and (sn / "iter1" / "search.json").is_file()
    last = json.loads((sn / "iter2" / "manifest.json").read_text())["sublayers"]
    assert sorted(p.name for p in (sn / "iter2").glob("blk*")) == sorted(last) and last
    assert json.loads((sn / "iter1" / "manifest.json").read_text())["sublayers"] == {}


def test_a_locked_workdir_is_refused(tiny_dir, calib_txt, tmp_path, capsys):
    work = tmp_path / "w"
    with locked(work):
        assert main(_argv(tiny_dir, calib_txt, tmp_path / "o", work)) == 2
    err = capsys.readouterr().err
    assert "in use by another tyr prune" in err and f"pid {os.getpid()}" in err
    assert not (tmp_path / "o").exists()


def test_resuming_with_other_options_names_them(tiny_dir, calib_txt, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(_argv(tiny_dir, calib_txt, tmp_path / "a", work, "--method", "uniform")) == 0
    capsys.readouterr()
    assert main(_argv(tiny_dir, calib_txt, tmp_path / "b", work, "--seed", "5", "--set", "damp=0.02")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "started with other options" in err and "seed: 0 → 5" in err and "damp: 0.01 → 0.02" in err
    assert 'method: "uniform" → "tyr"' in err and "another --workdir" in err
    assert not (tmp_path / "b").exists()
    # Evaluation options do not shape the work files: changing them resumes.
    argv = _argv(tiny_dir, calib_txt, tmp_path / "c", work, "--method", "uniform")
    argv.remove("--no-eval")
    assert main([*argv, "--eval-tokens", "64"]) == 0
    assert json.loads((tmp_path / "c" / "result.json").read_text())["ppl"]["tokens"] == 64


def test_a_full_disk_fails_cleanly_and_the_rerun_resumes(tiny_dir, calib_txt, tmp_path, capsys, monkeypatch):
    import tyr.supernet.builder

    ref = tmp_path / "ref"
    assert main(_argv(tiny_dir, calib_txt, ref, tmp_path / "w-ref")) == 0
    real, calls = tyr.supernet.builder.atomic_write, []

    def filling(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) > 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(tyr.supernet.builder, "atomic_write", filling)
    out, work = tmp_path / "out", tmp_path / "w"
    capsys.readouterr()
    assert main(_argv(tiny_dir, calib_txt, out, work)) == 2
    err = capsys.readouterr().err.strip()  # progress bars, closed, then one error line
    last = err.splitlines()[-1]
    assert err.count("tyr: error:") == 1 and last.startswith("tyr: error: No space left on device writing")
    assert "rerun the same command" in last and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    monkeypatch.setattr(tyr.supernet.builder, "atomic_write", real)
    assert main(_argv(tiny_dir, calib_txt, out, work)) == 0
    assert _outcome(out) == _outcome(ref)


def test_checkpoint_code_runs_only_when_trusted(tiny_dir, calib_txt, tmp_path):
    """A checkpoint whose config maps to its own Python file: tyr uses transformers' class and
    never imports the file unless --trust-remote-code is given."""
    ckpt = tmp_path / "custom"
    shutil.copytree(tiny_dir, ckpt)
    marker = tmp_path / "code-ran"
    (ckpt / "custom_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "custom_code.CustomConfig",
        "AutoModelForCausalLM": "custom_code.CustomModel",
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    args = _argv(ckpt, calib_txt, tmp_path / "o", tmp_path / "w", "--method", "uniform")
    assert main(args) == 0
    assert not marker.exists()
    assert main([*_argv(ckpt, calib_txt, tmp_path / "o2", tmp_path / "w2", "--method", "uniform"),
                 "--trust-remote-code"]) == 0  # fmt: skip
    assert marker.exists()


def test_damaged_work_files_are_recomputed(tiny_dir, calib_txt, tmp_path, caplog):
    """Writes are atomic, so a torn file means outside damage: it is reported and rebuilt."""
    work = tmp_path / "w"
    assert main(_argv(tiny_dir, calib_txt, tmp_path / "ref", work)) == 0
    expected = _outcome(tmp_path / "ref")
    it1 = work / "supernet" / "iter1"
    ckpt = it1 / "search.ckpt.json"
    state = json.loads(ckpt.read_text())
    assert len(state["parent_fitness"]) == 3 and len(state["rng"][1]) == 625
    (it1 / "search.json").unlink()
    ckpt.write_text(ckpt.read_text()[:100])  # truncated
    (work / "supernet" / "iter2" / "manifest.json").write_text("{not json")
    (work / "teacher" / "filled.npy").unlink()
    with caplog.at_level("WARNING", logger="tyr"):
        assert main([*_argv(tiny_dir, calib_txt, tmp_path / "again", work)]) == 0
    assert _outcome(tmp_path / "again") == expected
    text = caplog.text
    assert "search.ckpt.json is damaged" in text and "manifest.json is damaged" in text
    assert "teacher cache" in text
