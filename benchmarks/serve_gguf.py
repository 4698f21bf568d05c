"""llama.cpp on tyr's GGUF export: fidelity against `tyr.load`, held-out perplexity, and what a
user serving it sees on this CPU (schema `tyr.bench.gguf/1`).

    python benchmarks/serve_gguf.py --build                       # llama-cpp-python from its sdist, cached
    python benchmarks/serve_gguf.py --pruned OUT --work /tmp/tyr-gguf --json benchmarks/results/gguf_50.json

`--build` compiles the pinned llama-cpp-python sdist (it vendors llama.cpp) CPU-only into a wheel
under $TYR_HOME/llama_cpp and installs it; the tests marked `llama_cpp` need it. The table: the
embedded dense model and the pruned one (`--pruned`, the --out of tyr prune) written as GGUF at
each of `--quants`; per file its size, prefill tokens/s of a 512-token prompt, decode tokens/s of
128 greedy tokens (batch 1, best of `--rounds`, each file in a fresh process for its peak RSS) and
the perplexity of `--ppl-tokens` held-out tokens computed from llama.cpp's logits. Fidelity: the
pruned F16 and Q8_0 files against tyr's own model on 4 × 128 held-out tokens (max |Δ logit|, argmax
agreement), and tyr's perplexity of the same windows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def build() -> None:
    """Compile and install the pinned binding (minutes on 2 cores), reusing a cached wheel."""
    from tyr.infra import assets

    cache = assets.tyr_home() / "llama_cpp"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llama_cpp_python-0.3.36-*.whl"))
    if not wheels:
        env = {
            **os.environ,
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
            "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
            " -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF",
        }
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", ":all:", "-w", str(cache)]
        subprocess.run([*cmd, LLAMA_CPP_PYTHON], check=True, env=env)
        wheels = sorted(cache.glob("llama_cpp_python-0.3.36-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", str(wheels[-1])], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "diskcache", "jinja2"], check=True)


def open_gguf(path: Path, n_ctx: int, logits_all: bool) -> Any:
    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def gguf_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of one sequence, [T, vocab] float32."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def nll_sum(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    x = torch.from_numpy(logits[:-1]).double()
    target = torch.tensor(ids[1:])
    return float(torch.nn.functional.cross_entropy(x, target, reduction="sum")), len(ids) - 1


def worker(path: Path, prompt: list[int], new: int, rounds: int) -> dict[str, Any]:
    """Prefill and decode speed of one file (this process is fresh: its peak RSS is the file's)."""
    llm = open_gguf(path, len(prompt) + new + 8, logits_all=False)
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(rounds):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        best_prefill = min(best_prefill, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(new):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        best_decode = min(best_decode, time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"prefill_tok_s": len(prompt) / best_prefill, "decode_tok_s": new / best_decode, "peak_rss": rss}


def _held_out(tokens: int, seq_len: int) -> torch.Tensor:
    from tyr.data import windows
    from tyr.loader import open_model

    tokenizer = open_model(None).tokenizer
    return windows("wiki:heldout", "heldout", tokenizer, tokens, seq_len, True, None)


def _ppl(path: Path, ids: torch.Tensor) -> float:
    llm = open_gguf(path, ids.shape[1], logits_all=True)
    total, count = 0.0, 0
    for row in ids.tolist():
        s, n = nll_sum(gguf_logits(llm, row), row)
        total, count = total + s, count + n
    return float(np.exp(total / count))


def _fidelity(path: Path, model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    llm = open_gguf(path, ids.shape[1], logits_all=True)
    worst, agree, total = 0.0, 0, 0
    for row in ids:
        with torch.inference_mode():
            ref = model(row[None]).logits[0].float().numpy()
        got = gguf_logits(llm, row.tolist())
        worst = max(worst, float(np.abs(got - ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += row.numel()
    return {
        "max_abs_diff": worst,
        "argmax_agreement": agree / total,
        "ref_logit_absmax": float(np.abs(ref).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="build and install the llama.cpp binding, then exit")
    ap.add_argument("--pruned", help="the --out directory of tyr prune")
    ap.add_argument("--work", default="/tmp/tyr-gguf", help="where the GGUF files are written")
    ap.add_argument("--quants", default="f16,q8_0,q4_0", help="for the pruned model (dense: all but q4_0)")
    ap.add_argument("--ppl-tokens", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument(
        "--worker", nargs=4, metavar=("FILE", "PROMPT_JSON", "NEW", "ROUNDS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.build:
        build()
        return
    if args.worker:
        path, prompt, new, rounds = args.worker
        print(json.dumps(worker(Path(path), json.loads(prompt), int(new), int(rounds))))
        return
    if not args.pruned:
        ap.error("--pruned is required")
    import tyr
    from tyr import record
    from tyr.api import export_gguf
    from tyr.eval import perplexity
    from tyr.loader import load

    work = Path(args.work)
    quants = args.quants.split(",")
    files: dict[str, Path] = {}
    for which, source in (("dense", None), ("pruned", args.pruned)):
        for q in quants:
            if which == "dense" and q == "q4_0":
                continue
            path = work / f"{which}-{q}.gguf"
            if not path.is_file():
                export_gguf(source, path, quant=q)
            files[f"{which} {q}"] = path
    ids = _held_out(args.ppl_tokens, 512)
    model = load(args.pruned)
    from tyr import arch

    fidelity = {
        q: _fidelity(files[f"pruned {q}"], model, ids[:4, :128])
        for q in ("f16", "q8_0")
        if f"pruned {q}" in files
    }
    tyr_ppl = perplexity(model, arch.spec_for(model), ids)
    rows = []
    prompt = ids[0].tolist()
    for name, path in files.items():
        out = subprocess.run(
            [sys.executable, __file__, "--worker", str(path), json.dumps(prompt), "128", str(args.rounds)],
            check=True,
            capture_output=True,
            text=True,
        )
        speed = json.loads(out.stdout.strip().splitlines()[-1])
        row = {"file": name, "bytes": path.stat().st_size, **speed, "ppl": _ppl(path, ids)}
        rows.append(row)
        print(
            f"{name:>12}: {row['bytes'] / 1e6:7.1f} MB, prefill {row['prefill_tok_s']:7.1f} tok/s,"
            f" decode {row['decode_tok_s']:6.1f} tok/s, RSS {row['peak_rss'] / 1e9:.2f} GB,"
            f" PPL {row['ppl']:.3f}"
        )
    by = {r["file"]: r for r in rows}
    for q in ("f16", "q8_0"):
        if f"dense {q}" in by and f"pruned {q}" in by:
            d, p = by[f"dense {q}"], by[f"pruned {q}"]
            ideal = d["bytes"] / p["bytes"]
            speedup = p["decode_tok_s"] / d["decode_tok_s"]
            print(
                f"{q}: decode speedup {speedup:.2f}× against the bytes ratio {ideal:.2f}×"
                f" ({speedup / ideal:.2f} of it)"
            )
    report = {
        "schema": "tyr.bench.gguf/1",
        "runtime": LLAMA_CPP_PYTHON,
        "pruned": str(args.pruned),
        "ppl_tokens": int(ids.numel()),
        "tyr_ppl": tyr_ppl,
        "fidelity": fidelity,
        "rows": rows,
        "machine": {"cpus": os.cpu_count()},
        "tyr_version": tyr.__version__,
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps({"tyr_ppl": tyr_ppl, "fidelity": fidelity}, indent=2))
    record.add_gguf(Path(args.pruned), llama_cpp=report)  # for tyr report
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
