"""The performance suite (schema `tyr.bench/1`): search throughput, supernet size on disk, the
pruned model's real speed against its ideal, tyr's modeling overhead, memory and wall time.

    python benchmarks/run.py --suite small-cpu --json benchmarks/results/bench.json

Parts (each can be skipped; a key that was not measured is null and listed in `not_measured`):
- `e2e`: `tyr prune --sparsity 0.5` of the embedded model with the default settings, timed
  (`end_to_end_s`, `stages`); its search log gives `search_throughput_ratio` and its work
  directory `supernet_disk_ratio`. `--run DIR` reuses a finished run instead (then the wall
  time is the one in its result.json).
- `speed`: prefill and decode of the 50 % export against the dense model, each in a fresh
  process through tyr's loader, with the ideal ratios computed from the tensors;
  `dense_modeling_overhead` is the dense model's prefill through tyr's modeling class over
  stock transformers'.
- `1b`: a random-weight Llama of the Llama-3.2-1B shape stored as bf16 safetensors, pruned by
  50 % with `--method uniform --calib-tokens 16384` (`peak_rss_ratio`: peak RSS of that run over
  the model's fp32 size), and (part `speed_1b`) the same speed keys as `speed` with suffix `_1b`.
- `1b_tyr`: the same checkpoint pruned by 50 % with `--method tyr --dtype bfloat16 --weights
  disk` at a small budget (TYR_1B below: 1 iteration of 3 levels, 2 generations):
  `peak_rss_ratio_tyr` over the fp32 size, beside `tyr plan`'s estimates for that run
  (`plan_ram_ratio_tyr`: the plan's peak RAM over the measured peak; `plan_disk_ratio_tyr`: its
  work directory over the measured one, taken at the end of the search).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import tyr
from tyr import arch
from tyr.export import save_pruned
from tyr.loader import DEFAULT_MODEL, resolve
from tyr.report import measure_in_subprocess
from tyr.report.plan import dims_of, forward_flops

KEYS = (
    "search_throughput_ratio", "search_throughput_ideal", "supernet_disk_ratio",
    "prefill_speedup", "prefill_ideal", "decode_speedup", "decode_ideal",
    "prefill_speedup_1b", "prefill_ideal_1b", "decode_speedup_1b", "decode_ideal_1b",
    "dense_modeling_overhead", "peak_rss_ratio", "end_to_end_s",
    "peak_rss_ratio_tyr", "plan_ram_ratio_tyr", "plan_disk_ratio_tyr",
)  # fmt: skip
# The 1B search at a small budget: every phase (supernet, teacher, student, export) at its
# real width, few candidates and genomes.
TYR_1B: dict[str, Any] = {
    "calib_tokens": 1024, "seq_len": 512, "batch_size": 2, "iterations": 1, "generations": 2,
    "offspring": 4, "stage_tokens": "512,1024", "survivors": "2,1", "levels": 3, "kl_topk": 64,
}  # fmt: skip
LLAMA_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "num_hidden_layers": 16, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Ideal ratios, from the tensors of a loaded model.


def prefill_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """FLOPs per prompt token of a prefill: every block linear, attention scores over T/2 keys
    on average with each block's own query heads, the LM head at the last position only."""
    spec = arch.spec_for(model)
    head_dim = arch.shape_of(model, spec).head_dim
    total = 0.0
    for layer in arch.layers(model, spec):
        total += 2 * sum(lin.weight.numel() for lin in arch.block_linears(layer, spec))
        n_q = arch.attention_parts(layer, spec).q.out_features // head_dim
        total += 2 * 2 * n_q * head_dim * seq_len / 2
    head = arch.get_module(model, spec.lm_head)
    return total + 2 * head.weight.numel() / seq_len


def decode_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights read per generated token: every weight once, one row of the input
    embedding, and the LM head (again, when tied to the embedding)."""
    spec = arch.spec_for(model)
    embed = arch.get_module(model, spec.embed).weight
    head = arch.get_module(model, spec.lm_head).weight
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in seen.values())
    total -= embed.numel() * embed.element_size() - embed.shape[1] * embed.element_size()
    if head is embed:
        total += head.numel() * head.element_size()
    return total


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest prefill and the fastest decode of several measurements of one model."""
    out = dict(min(runs, key=lambda m: m["prefill_s"]))
    fastest = min(runs, key=lambda m: m["decode_s"])
    out.update({k: fastest[k] for k in ("decode_s", "decode_tokens_per_s")})
    out["rounds"] = len(runs)
    return out


def speed_pair(dense_dir: str, pruned_dir: str, seq_len: int = 512, rounds: int = 2) -> dict[str, Any]:
    """Measured and ideal prefill / decode ratios of a pruned export against its dense model.
    The two are measured in alternation, `rounds` times each in a fresh process, and the best
    of each kept, so that a slow spell of a shared machine does not land on one side only."""
    runs: dict[str, list[dict[str, Any]]] = {"dense": [], "pruned": []}
    for _ in range(rounds):
        for role, path in (("dense", dense_dir), ("pruned", pruned_dir)):
            runs[role].append(measure_in_subprocess(path, prompt_tokens=seq_len))
    dense, pruned = best_of(runs["dense"]), best_of(runs["pruned"])
    d_model, p_model = tyr.load(dense_dir), tyr.load(pruned_dir)
    out = {
        "prefill_speedup": pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
        "prefill_ideal": prefill_flops_per_token(d_model, seq_len)
        / prefill_flops_per_token(p_model, seq_len),
        "decode_speedup": pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
        "decode_ideal": decode_bytes_per_token(d_model) / decode_bytes_per_token(p_model),
        "dense": dense,
        "pruned": pruned,
    }
    del d_model, p_model
    return out


def modeling_overhead(dense_dir: str, root: Path, seq_len: int = 512) -> dict[str, Any]:
    """The dense model's prefill through tyr's modeling class (an export that keeps every head
    and channel) over stock transformers' class, each in a fresh process."""
    model = tyr.load(dense_dir)
    spec = arch.spec_for(model)
    shape = arch.shape_of(model, spec)
    from transformers import AutoTokenizer

    as_tyr = root / "dense-as-tyr"
    save_pruned(model, AutoTokenizer.from_pretrained(dense_dir), [None] * shape.n_layers, shape, as_tyr)
    runs: dict[str, list[dict[str, Any]]] = {"stock": [], "tyr": []}
    for _ in range(2):  # alternated, as in speed_pair
        runs["stock"].append(measure_in_subprocess(dense_dir, prompt_tokens=seq_len, repeats=5))
        runs["tyr"].append(measure_in_subprocess(str(as_tyr), prompt_tokens=seq_len, repeats=5))
    stock, mine = best_of(runs["stock"]), best_of(runs["tyr"])
    return {"dense_modeling_overhead": mine["prefill_s"] / stock["prefill_s"], "stock": stock, "tyr": mine}


# ---------------------------------------------------------------------------------------------
# Supernet size and search throughput, from a finished run.


def supernet_disk_ratio(workdir: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Bytes of the stored candidates (the last iteration's: an earlier one's are deleted once
    its search is done) over the bytes of full-size masked copies of the same candidates (every
    tensor of the sub-layer, in the model's dtype)."""
    spec = arch.spec_for(model)
    layer = arch.layers(model, spec)[0]
    a, m = arch.attention_parts(layer, spec), arch.mlp_parts(layer, spec)

    def size(mods: list[torch.nn.Linear]) -> int:
        return sum(p.numel() * p.element_size() for lin in mods for p in lin.parameters())

    full = {"attn": size([a.q, a.k, a.v, a.o]), "mlp": size([m.gate, m.up, m.down])}
    stored = masked = count = 0
    for manifest in sorted((workdir / "supernet").glob("iter*/manifest.json")):
        for key, entry in json.loads(manifest.read_text())["sublayers"].items():
            for cand in entry["candidates"]:
                stored += cand["bytes"]
                masked += full[key.split(".")[1]]
                count += 1
    return {
        "supernet_disk_ratio": stored / masked,
        "supernet_bytes": stored,
        "masked_bytes": masked,
        "candidates": count,
    }


@torch.inference_mode()
def dense_tokens_per_s(model: torch.nn.Module, batch: int, seq_len: int, repeats: int = 3) -> float:
    """The dense model's full forward (all logits) on calibration-shaped batches."""
    vocab = int(getattr(model.config, "vocab_size"))  # noqa: B009 (config is typed loosely)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    model(ids[:1, :16])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, use_cache=False)
        best = min(best, time.perf_counter() - start)
    return batch * seq_len / best


def search_throughput(result: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    its = result["search"]["iterations"]
    if any(it.get("tokens_scored") is None for it in its):
        return {"note": "the run's search log has no token counts (resumed, or an older tyr)"}
    tokens = sum(it["tokens_scored"] for it in its)
    seconds = sum(it["search_seconds"] for it in its)
    cfg = result["config"]
    dense = dense_tokens_per_s(model, cfg["batch_size"], cfg["seq_len"])
    dims = dims_of(model.config)
    kept = 1 - result["sparsity_achieved"]
    ideal = forward_flops(dims, cfg["seq_len"]) / forward_flops(
        dims, cfg["seq_len"], kept, head_rows=cfg["kl_topk"]
    )
    return {
        "search_throughput_ratio": tokens / seconds / dense,
        "search_throughput_ideal": ideal,
        "search_tokens_per_s": tokens / seconds,
        "dense_tokens_per_s": dense,
    }


# ---------------------------------------------------------------------------------------------
# Runs in child processes.


# Runs `tyr prune` and reports the peak RSS of its own process.
_PRUNE = r"""
import sys
from tyr.cli import main
from tyr.report import peak_rss_bytes
code = main(sys.argv[1:])
print("PEAK_RSS", peak_rss_bytes(), file=sys.stderr)
sys.exit(code)
"""


def prune(args: list[str], out: Path, work: Path) -> tuple[dict[str, Any], float, int]:
    """`tyr prune ARGS` in a child process: (result.json, wall seconds, its peak RSS in bytes)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-c", _PRUNE, "prune", *args, "--out", str(out), "--workdir", str(work), "-q"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak = int(next(ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("PEAK_RSS")))
    return json.loads((out / "result.json").read_text()), wall, peak


def random_llama_1b(dest: Path) -> int:
    """A random-weight Llama-3.2-1B-shaped checkpoint as bf16 safetensors with the embedded
    model's tokenizer; returns its fp32 size in bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in LLAMA_1B.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(resolve(None)).save_pretrained(dest)
    return arch.count_total_params(model) * 4


def fp32_bytes(src: Path) -> int:
    from transformers import AutoConfig

    return dims_of(AutoConfig.from_pretrained(src)).total * 4


def tyr_1b(src: Path, fp32: int, root: Path) -> dict[str, Any]:
    """`--method tyr` on the 1B checkpoint with its weights on disk: peak RSS and the work
    directory, beside `tyr plan`'s estimates of the same run."""
    from tyr.report import estimate

    sizes = [f"--{k.replace('_', '-')}={v}" for k, v in TYR_1B.items()]
    common = ["--sparsity", "0.5", "--method", "tyr", "--dtype", "bfloat16", "--weights", "disk"]
    work = root / "w1b_tyr"
    result, wall, peak = prune([str(src), *common, *sizes, "--no-eval"], root / "p1b_tyr", work)
    disk = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    est = estimate(
        str(src), 0.5, method="tyr", dtype="bfloat16", weights="disk", sizes=dict(TYR_1B), no_eval=True
    )
    return {
        "args": common + sizes + ["--no-eval"],
        "fp32_bytes": fp32,
        "peak_rss_bytes": peak,
        "peak_rss_ratio_tyr": peak / fp32,
        "workdir_bytes": disk,
        "plan_peak_ram_bytes": est["peak_ram_bytes"],
        "plan_peak_ram_phase": est["peak_ram_phase"],
        "plan_workdir_bytes": est["workdir_bytes"],
        "plan_ram_ratio_tyr": est["peak_ram_bytes"] / peak,
        "plan_disk_ratio_tyr": est["workdir_bytes"] / disk,
        "prune_s": round(wall, 1),
        "timings": result["timings"],
        "sparsity_achieved": result["sparsity_achieved"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="small-cpu", choices=["small-cpu"])
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--run", help="a finished `tyr prune --sparsity 0.5` output directory to reuse")
    ap.add_argument("--workdir", help="its work directory (for supernet_disk_ratio)")
    ap.add_argument(
        "--skip", default="", help="comma-separated parts to skip: e2e, speed, 1b, speed_1b, 1b_tyr"
    )
    ap.add_argument("--root", help="where runs go (default: a temporary directory, removed after)")
    ap.add_argument(
        "--merge", help="an earlier tyr.bench/1 JSON whose keys fill those this run skips (named in `merged`)"
    )
    ns = ap.parse_args()
    skip = set(filter(None, ns.skip.split(",")))
    root = Path(ns.root) if ns.root else Path(tempfile.mkdtemp(prefix="tyr-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    dense_dir = str(resolve(None))
    found: dict[str, Any] = {}
    detail: dict[str, Any] = {}

    run_dir, workdir = (Path(ns.run), Path(ns.workdir) if ns.workdir else None) if ns.run else (None, None)
    if run_dir is None and "e2e" not in skip:
        run_dir, workdir = root / "p50", root / "w50"
        result, wall, _ = prune(["--sparsity", "0.5"], run_dir, workdir)
        found["end_to_end_s"] = round(wall, 1)
        found["stages"] = result["timings"]
    if run_dir is not None:
        result = json.loads((run_dir / "result.json").read_text())
        found.setdefault("stages", result["timings"])
        dense = tyr.load(dense_dir)
        if workdir is not None:
            detail["supernet"] = supernet_disk_ratio(workdir, dense)
            found["supernet_disk_ratio"] = detail["supernet"]["supernet_disk_ratio"]
        detail["search"] = search_throughput(result, dense)
        for key in ("search_throughput_ratio", "search_throughput_ideal"):
            if key in detail["search"]:
                found[key] = detail["search"][key]
        del dense
        if "speed" not in skip:
            detail["speed"] = speed_pair(dense_dir, str(run_dir))
            found.update({k: v for k, v in detail["speed"].items() if k in KEYS})
    if "speed" not in skip:
        detail["overhead"] = modeling_overhead(dense_dir, root)
        found["dense_modeling_overhead"] = detail["overhead"]["dense_modeling_overhead"]
    if "1b" not in skip:
        src = root / "llama-1b"
        fp32 = random_llama_1b(src)
        args = [str(src), "--sparsity", "0.5", "--method", "uniform", "--calib-tokens", "16384", "--no-eval"]
        _, wall, peak = prune(args, root / "p1b", root / "w1b")
        found["peak_rss_ratio"] = peak / fp32
        detail["1b"] = {"fp32_bytes": fp32, "peak_rss_bytes": peak, "prune_s": round(wall, 1)}
        if "speed_1b" not in skip:
            pair = speed_pair(str(src), str(root / "p1b"))
            found.update({f"{k}_1b": v for k, v in pair.items() if k in KEYS})
            detail["speed_1b"] = pair

    if "1b_tyr" not in skip:
        src = root / "llama-1b"
        fp32 = random_llama_1b(src) if not (src / "config.json").is_file() else fp32_bytes(src)
        detail["1b_tyr"] = tyr_1b(src, fp32, root)
        for key in ("peak_rss_ratio_tyr", "plan_ram_ratio_tyr", "plan_disk_ratio_tyr"):
            found[key] = detail["1b_tyr"][key]

    merged: list[str] = []
    if ns.merge:
        earlier = json.loads(Path(ns.merge).read_text())
        merged = [k for k in KEYS if found.get(k) is None and earlier.get(k) is not None]
        found.update({k: earlier[k] for k in merged})
        found.setdefault("stages", earlier.get("stages"))
        detail = {**earlier.get("detail", {}), **detail}
    bench = {
        "schema": "tyr.bench/1",
        "suite": ns.suite,
        **{k: (round(found[k], 4) if isinstance(found.get(k), float) else found.get(k)) for k in KEYS},
        "stages": found.get("stages"),
        "not_measured": [k for k in KEYS if found.get(k) is None],
        **({"merged": {"from": ns.merge, "keys": merged}} if merged else {}),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "model": DEFAULT_MODEL,
        "detail": detail,
    }
    width = max(map(len, KEYS))
    for k in KEYS:
        v = bench[k]
        print(f"{k:<{width}}  {'—' if v is None else v}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(bench, indent=2, default=str) + "\n")
    if not ns.root:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
