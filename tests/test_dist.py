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


def _prune(launcher: list[str], tiny_dir: Path, calib: Path, out: Path, work: Path, *extra: str) -> None:
    # The same threads per process in both runs: GEMM results may depend on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["prune", str(tiny_dir), "--sparsity", "0.4", "--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(
        [*launcher, *args, "--calib", str(calib), *SEARCH, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_give_the_single_process_result(tiny_dir, calib_txt, tmp_path):
    _prune([sys.executable, "-m", "tyr"], tiny_dir, calib_txt, tmp_path / "one", tmp_path / "w1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # The teacher recomputed per minibatch (its sequences dealt between the ranks) gives the
    # values of the one-process run's disk cache.
    two_args = (tiny_dir, calib_txt, tmp_path / "two", tmp_path / "w2", "--teacher-cache", "none")
    _prune([*torchrun, "-m", "tyr"], *two_args)
    one, two = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert one["machine"]["processes"] == 1 and two["machine"]["processes"] == 2
    genomes = [[it["genome"] for it in r["search"]["iterations"]] for r in (one, two)]
    assert genomes[0] == genomes[1]
    # Each rank ran half of the calibration chunks through the blocks.
    for it_one, it_two in zip(one["search"]["iterations"], two["search"]["iterations"], strict=True):
        (alone,), (first, second) = it_one["block_forwards"], it_two["block_forwards"]
        assert first == second == alone // 2 > 0
        first, second = it_two["teacher_sequences"]
        assert 0 < second <= first <= 2 * second
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
    # Resumed with the weights read block by block on both ranks (each spilling on its own).
    _prune([*torchrun, "-m", "tyr"], tiny_dir, calib_txt, out, work, "--weights", "disk")
    assert not list(work.glob("stream*"))
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()


def test_single_process_helpers_are_plain():
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    assert list(dist.mine(3)) == [0, 1, 2]
    assert dist.map_ordered(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert dist.share(5) == 5


def _deal(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seen = {}
        for n in (1, 3, 4):  # fewer tasks than ranks, an uneven and an even round
            asked: list[int] = []

            def compute(k: int, n=n, asked=asked) -> torch.Tensor:
                asked.append(k)
                i = k * world + rank  # the global index of this rank's k-th task
                return torch.full((2, i + 1), float(i))  # shapes differ between tasks

            got = [t.clone() for t in dist.each_in_order(n, compute)]
            seen[n] = {"asked": asked, "got": [t.tolist() for t in got]}
        Path(out, f"{rank}.json").write_text(json.dumps(seen))
    finally:
        td.destroy_process_group()


def test_each_in_order_gives_every_rank_all_tasks_in_index_order(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_deal, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for n in ("1", "3", "4"):
        expected = [[[float(i)] * (i + 1)] * 2 for i in range(int(n))]
        assert ranks[0][n]["got"] == ranks[1][n]["got"] == expected
        # Each rank computed only its own tasks, as dist.mine deals them.
        assert ranks[0][n]["asked"] == list(range(len(range(0, int(n), 2))))
        assert ranks[1][n]["asked"] == list(range(len(range(1, int(n), 2))))
