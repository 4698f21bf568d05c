"""Kill `tyr prune` with SIGKILL at random moments, resume it, and compare with an uninterrupted run.

1. A reference run (its own work directory) is watched to learn when it builds supernets and
   when it searches.
2. Each trial starts the same command in a fresh work directory and kills it (SIGKILL) at a
   random moment: a phase of the reference drawn at random (a sub-layer of a supernet build or a
   generation of a search, half of the trials each, in proportion to the time spent there) and
   a random delay within it. It checks that no output directory appeared, reruns the same
   command to completion, and compares the final genome and the sha256 of the exported weights
   with the reference.

    python benchmarks/crash_resume.py --kills 10 --json benchmarks/results/crash_resume.json

Extra `tyr prune` options go after `--` (default: the embedded model, 50 %, preset smoke with
2 iterations, 5 levels and 6 generations: about 2.5 min per run on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_ARGS = [
    "--sparsity", "0.5", "--preset", "smoke", "--iterations", "2", "--levels", "5",
    "--generations", "6", "--no-eval", "--quiet",
]  # fmt: skip


def phase(work: Path) -> str:
    """What a run in `work` is doing, read from its files: 'start', 'supernet N k/M' (finished
    sub-layers), 'search N g' (finished generations) or 'done'."""
    root = work / "supernet"
    iters = sorted(root.glob("iter*"), key=lambda p: int(p.name[4:])) if root.is_dir() else []
    if not iters:
        return "start"
    it = iters[-1]
    n = it.name[4:]
    if (it / "search.json").is_file():
        return f"searched {n}"
    ckpt = it / "search.ckpt.json"
    if ckpt.is_file():
        try:
            return f"search {n} {len(json.loads(ckpt.read_text())['parent_fitness'])}"
        except (ValueError, KeyError):
            return f"search {n} ?"
    try:
        subs = json.loads((it / "manifest.json").read_text())["sublayers"]
    except (OSError, ValueError, KeyError):
        subs = {}
    done = sum(1 for s in subs.values() if s.get("status") == "done")
    return f"supernet {n} {done}"


def kind(p: str) -> str:
    return p.split()[0]


def outcome(out: Path) -> dict[str, Any]:
    res = json.loads((out / "result.json").read_text())
    h = hashlib.sha256()
    for shard in sorted(out.glob("*.safetensors")):
        h.update(shard.read_bytes())
    return {"genome": [it["genome"] for it in res["search"]["iterations"]], "weights_sha256": h.hexdigest()}


def command(args: list[str], out: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "tyr", "prune", *args, "--out", str(out), "--workdir", str(work)]


def watch(
    cmd: list[str], work: Path, target: str | None = None, delay: float = 0.0
) -> tuple[int, list[tuple[float, str]], float]:
    """Run `cmd`, sampling its phase; with `target`, SIGKILL it `delay` seconds after it reaches
    that phase. Returns (exit code, timeline, wall seconds)."""
    start = time.monotonic()
    log = work.with_name(work.name + ".log")
    with open(log, "ab") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink)
    timeline: list[tuple[float, str]] = []
    reached: float | None = None
    while proc.poll() is None:
        now = time.monotonic() - start
        timeline.append((now, phase(work)))
        if target is not None and reached is None and timeline[-1][1] == target:
            reached = now
        # Kill `delay` seconds into the target phase, or as it ends if this run is faster.
        left = reached is not None and timeline[-1][1] != target
        if reached is not None and (now >= reached + delay or left):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.02)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"tyr prune failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return proc.returncode, timeline, time.monotonic() - start


def segments(timeline: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """(phase, seconds spent in it) for each phase of a run, in order."""
    out: list[tuple[str, float]] = []
    for (t, p), (t_next, _) in zip(timeline, [*timeline[1:], timeline[-1]], strict=True):
        if out and out[-1][0] == p:
            out[-1] = (p, out[-1][1] + t_next - t)
        else:
            out.append((p, t_next - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", help="where runs go (default: a temporary directory, removed after)")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("prune_args", nargs="*", help="tyr prune options (after --)")
    ns = ap.parse_args()
    args = ns.prune_args or DEFAULT_ARGS
    root = Path(ns.root) if ns.root else Path(tempfile.mkdtemp(prefix="tyr-crash-"))
    root.mkdir(parents=True, exist_ok=True)

    _, timeline, ref_wall = watch(command(args, root / "ref", root / "w-ref"), root / "w-ref")
    reference = outcome(root / "ref")
    print(
        f"reference: {ref_wall:.0f} s, genome {reference['genome']},"
        f" weights {reference['weights_sha256'][:16]}"
    )
    # Kill points: a phase of the reference (a supernet sub-layer or a search generation, half
    # of the trials each, drawn in proportion to the time spent there) and a moment inside it,
    # so that the kills land in the same places however fast the trial runs.
    phases = {
        k: [(p, d) for p, d in segments(timeline) if kind(p) == k and d > 0] for k in ("supernet", "search")
    }
    rng = random.Random(ns.seed)

    def draw(i: int) -> tuple[str, float]:
        pool = phases["supernet" if i % 2 == 0 else "search"] or phases["supernet"]
        p, d = rng.choices(pool, weights=[d for _, d in pool])[0]
        return p, round(rng.uniform(0, d), 2)

    trials: list[dict[str, Any]] = []
    for i in range(ns.kills):
        out, work = root / f"out{i}", root / f"w{i}"
        for _ in range(3):  # a run that ends before its kill point (it never showed that phase
            target, delay = draw(i)  # between two samples) is redrawn
            code, tl, at = watch(command(args, out, work), work, target, delay)
            if code == -signal.SIGKILL:
                break
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
        hit = tl[-1][1] if tl else "start"
        left_out = out.exists()
        t0 = time.monotonic()
        watch(command(args, out, work), work)
        resumed = time.monotonic() - t0
        got = outcome(out)
        same = got == reference
        trials.append(
            {
                "target_phase": target,
                "delay_s": delay,
                "kill_at_s": round(at, 2),
                "killed": code == -signal.SIGKILL,
                "phase_at_kill": hit,
                "output_existed_after_kill": left_out,
                "resume_s": round(resumed, 1),
                "identical": same,
                **({} if same else got),
            }
        )
        late = "" if code == -signal.SIGKILL else " (finished before the kill)"
        print(
            f"kill {i + 1:2d} at {at:6.1f} s ({hit:<14}) → resumed in {resumed:5.0f} s: "
            f"{'identical' if same else 'DIFFERENT'}{late}"
        )
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        work.with_name(work.name + ".log").unlink(missing_ok=True)

    identical = sum(t["identical"] and t["killed"] and not t["output_existed_after_kill"] for t in trials)
    print(f"{identical}/{len(trials)} killed runs resumed to the reference's genome and weights")
    result = {
        "schema": "tyr.crash_resume/1",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "prune_args": args,
        "reference": {**reference, "wall_s": round(ref_wall, 1)},
        "trials": trials,
        "identical": identical,
        "kills": len(trials),
    }
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2) + "\n")
    if not ns.root:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if identical == len(trials) else 1)


if __name__ == "__main__":
    main()
