"""The work directory at its fullest during `tyr prune`, beside `tyr plan`'s estimate of it.

A child process runs `tyr prune` while this one sums the sizes of the files under its work
directory every `--every` seconds; the largest sum is the measured peak (a file that lives for
less than the interval can be missed). By default the embedded model at 50 % with the `smoke`
preset, 2 iterations and the activations offloaded (`--offload disk`), so that the work
directory holds the calibration activations and the MLP intermediates during each build, one
supernet at a time, and the held-out activations during the perplexities:

    python benchmarks/workdir_peak.py --json benchmarks/results/workdir_peak.json

Extra `tyr prune` options go after `--` and replace the defaults; the plan is asked for the
same sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_ARGS = ["--sparsity", "0.5", "--preset", "smoke", "--iterations", "2", "--offload", "disk"]
SIZES = ("calib_tokens", "seq_len", "eval_tokens", "batch_size", "iterations", "levels")


def tree_bytes(root: Path) -> int:
    total = 0
    for p in root.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:  # removed while walking
            pass
    return total


def watch(args: list[str], out: Path, work: Path, every: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tyr", "prune", *args, "--out", str(out), "--workdir", str(work), "-q"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, samples, at = 0, 0, 0.0
    while proc.poll() is None:
        size = tree_bytes(work) if work.is_dir() else 0
        samples += 1
        if size > peak:
            peak, at = size, time.perf_counter() - start
        time.sleep(every)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {
        "peak_bytes": peak,
        "peak_at_s": round(at, 1),
        "final_bytes": tree_bytes(work),
        "samples": samples,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("prune_args", nargs="*", help="tyr prune options (after --)")
    ns = ap.parse_args()
    args = ns.prune_args or DEFAULT_ARGS
    from tyr.report import estimate

    with tempfile.TemporaryDirectory(prefix="tyr-wd-") as tmp:
        out, work = Path(tmp) / "out", Path(tmp) / "work"
        measured = watch(args, out, work, ns.every)
        result = json.loads((out / "result.json").read_text())
    cfg = result["config"]
    est = estimate(
        cfg.get("model"),
        cfg["sparsity"],
        method=cfg["method"],
        dtype=cfg["dtype"],
        teacher_cache=cfg["teacher_cache"],
        offload=cfg["offload"],
        weights=cfg["weights"],
        preset=cfg["preset"],
        sizes={k: cfg[k] for k in SIZES if cfg.get(k) is not None},
        no_eval=cfg.get("no_eval", False),
    )
    report = {
        "args": args,
        **measured,
        "plan_workdir_bytes": est["workdir_bytes"],
        "plan_ratio": est["workdir_bytes"] / measured["peak_bytes"],
        "plan_supernet_bytes": est["supernet_bytes"],
        "plan_activation_bytes": est["activation_bytes"],
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=2))
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
