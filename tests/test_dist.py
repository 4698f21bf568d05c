"""Several processes (torchrun, gloo on CPUs) give the single-process result, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tyr.infra import dist

SEARCH = [
    "--iterations", "2", "--generations", "3", "--offspring", "6", "--stage-tokens", "64,256",
    "--survivors", "2,1", "--kl-topk", "16", "--calib-tokens", "512", "--seq-len", "32", "--no-eval",
]  # fmt: skip


def _prune(launcher: list[str], tiny_dir: Path, calib: Path, out: Path, work: Path) -> None:
    # The same threads per process in both runs: GEMM results may depend on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["prune", str(tiny_dir), "--sparsity", "0.4", "--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(
        [*launcher, *args, "--calib", str(calib), *SEARCH],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_give_the_single_process_result(tiny_dir, calib_txt, tmp_path):
    _prune([sys.executable, "-m", "tyr"], tiny_dir, calib_txt, tmp_path / "one", tmp_path / "w1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _prune([*torchrun, "-m", "tyr"], tiny_dir, calib_txt, tmp_path / "two", tmp_path / "w2")
    one, two = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert one["machine"]["processes"] == 1 and two["machine"]["processes"] == 2
    genomes = [[it["genome"] for it in r["search"]["iterations"]] for r in (one, two)]
    assert genomes[0] == genomes[1]
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes()
    # Rank 0 alone wrote the work files, none left half-written.
    assert sorted(p.name for p in (tmp_path / "w2" / "supernet").iterdir()) == ["iter1", "iter2"]
    assert not list((tmp_path / "w2").rglob("*.tmp*"))

    # Both ranks resume a killed two-process run to the same bytes.
    work, out = tmp_path / "w3", tmp_path / "three"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["prune", str(tiny_dir), "--sparsity", "0.4", "--out", str(out), "--workdir", str(work)]
    proc = subprocess.Popen(
        [*torchrun, "-m", "tyr", *args, "--calib", str(calib_txt), *SEARCH],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    trigger, deadline = work / "supernet" / "iter1" / "search.ckpt.json", time.monotonic() + 300
    while proc.poll() is None and not trigger.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    assert not out.exists()
    _prune([*torchrun, "-m", "tyr"], tiny_dir, calib_txt, out, work)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()


def test_single_process_helpers_are_plain():
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    assert list(dist.mine(3)) == [0, 1, 2]
    assert dist.map_ordered(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert dist.share(5) == 5
