"""Wall time of the supernet build and the search with 1 process and with N processes (torchrun).

Both runs use all the machine's cores: one process with every core as threads, N processes
with cores / N threads each. They prune the embedded model with the same options into separate
work directories; the speedup is the ratio of the `supernet` and `search` timings in their
result.json. Each rank runs its share of the calibration chunks through the blocks; the
counts of block forwards per rank, from result.json, show the division. (Identical genomes need
the same threads per process in both runs, which this speed comparison does not keep;
`tests/test_dist.py` checks the identity.)

    python benchmarks/dist_search.py --procs 2 --json benchmarks/results/dist_search.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Batches of 2 sequences: the smoke preset's 8 calibration sequences make 4 chunks to deal.
DEFAULT_ARGS = [
    "--sparsity", "0.5", "--preset", "smoke", "--iterations", "2", "--generations", "8",
    "--offspring", "8", "--batch-size", "2", "--no-eval", "--quiet",
]  # fmt: skip


def run(launcher: list[str], args: list[str], out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [*launcher, "-m", "tyr", "prune", *args, "--out", str(out), "--workdir", str(out) + "-work"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    res = json.loads((out / "result.json").read_text())
    iterations = res["search"]["iterations"]
    return {
        "processes": res["machine"]["processes"],
        "threads_per_process": threads,
        "supernet_s": res["timings"]["supernet"],
        "search_s": res["timings"]["search"],
        "total_s": round(wall, 1),
        "genome": [it["genome"] for it in iterations],
        # block forwards of the calibration chunks in the supernet builds, per rank
        "block_forwards": [sum(f) for f in zip(*(it["block_forwards"] for it in iterations), strict=True)],
        "sparsity_achieved": res["sparsity_achieved"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("prune_args", nargs="*", help="tyr prune options (after --)")
    ns = ap.parse_args()
    args = ns.prune_args or DEFAULT_ARGS
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="tyr-dist-"))
    one = run([sys.executable], args, root / "one", cores)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ns.procs}"]
    many = run(torchrun, args, root / "many", max(1, cores // ns.procs))
    speedup = {k: round(one[k] / many[k], 3) for k in ("supernet_s", "search_s")}
    print(f"{'':>22} {'1 process':>12} {f'{ns.procs} processes':>12} {'speedup':>8}")
    for key, name in (("supernet_s", "supernet build (s)"), ("search_s", "search (s)")):
        print(f"{name:>22} {one[key]:>12.1f} {many[key]:>12.1f} {speedup[key]:>7.2f}x")
    per_rank = ", ".join(str(f) for f in many["block_forwards"])
    print(f"{'block forwards':>22} {one['block_forwards'][0]:>12} {per_rank:>12}  (per rank)")
    print(f"same genome: {one['genome'] == many['genome']}")
    result = {
        "schema": "tyr.dist_search/1",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": cores, "platform": platform.platform()},
        "prune_args": args,
        "one": one,
        "many": many,
        "speedup": speedup,
        "same_genome": one["genome"] == many["genome"],
    }
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
