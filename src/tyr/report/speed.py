"""Speed and memory of a causal LM on the current device: prefill and decode throughput at batch 1.

Pure measurement, no file IO. :func:`measure` times a model already in memory;
:func:`measure_in_subprocess` loads a directory in a fresh interpreter and measures it there, so
that the peak memory it reports belongs to that model alone (the peak RSS of a process never
goes down: a dense model measured before a pruned one in the same process would be charged to
both).

- prefill: one forward over a batch-1 prompt with ``logits_to_keep=1`` (the first forward that
  ``generate`` runs: every position goes through the blocks, only the last one through the LM head),
  with the KV cache on; best of ``repeats`` after one warm-up.
- decode: greedy ``generate`` of exactly ``new_tokens`` tokens after a ``decode_prompt``-token
  prompt; the decode time is the generate time minus one prefill of that prompt.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["measure", "measure_in_subprocess", "cost_per_million", "peak_memory_bytes", "peak_rss_bytes"]

MARKER = "TYR_SPEED_JSON "  # prefixes the result line that the child process prints

_CHILD = r"""
import json, sys
import torch
import tyr
from tyr.report.speed import MARKER, measure
kw = json.loads(sys.argv[2])
device, dtype = kw.pop("device"), getattr(torch, kw.pop("dtype"))
model = tyr.load(sys.argv[1], dtype=dtype).to(device)
print(MARKER + json.dumps(measure(model, **kw)), flush=True)
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Fastest wall time of `repeats` calls of `fn` (s) and the last call's result."""
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def peak_rss_bytes() -> int:
    """This process's peak resident memory (bytes) since it started its program.

    On Linux that is ``VmHWM``: ``ru_maxrss`` also keeps the peak of the process image that
    ``exec`` replaced, so a child started by a large parent would report the parent's memory.
    Elsewhere ``ru_maxrss`` (bytes on macOS, kB on other systems).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far (bytes): allocated CUDA memory on a GPU, else the process's peak RSS
    (interpreter, torch, weights, activations) since it started."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def _vocab_size(model: nn.Module) -> int:
    config: Any = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if not size:
        raise ValueError("the model's config has no vocab_size; pass vocab=")
    return int(size)


@torch.inference_mode()
def measure(
    model: nn.Module,
    *,
    prompt_tokens: int = 512,
    decode_prompt: int = 128,
    new_tokens: int = 128,
    repeats: int = 3,
    vocab: int | None = None,
) -> dict[str, Any]:
    """Prefill and decode throughput of `model` at batch 1 on the device its parameters are on.

    Returns ``prefill_tokens_per_s``, ``decode_tokens_per_s``, ``prefill_s`` (one prefill of
    `prompt_tokens`), ``decode_s`` (`new_tokens` decode steps), ``peak_rss_bytes`` (peak CUDA
    memory allocated when on a GPU, else the process's peak RSS: see :func:`peak_memory_bytes`),
    ``threads`` (torch intra-op threads), ``device`` and the sizes used. Token ids are random
    (seeded): the speed of a dense decoder does not depend on their values.
    """
    if min(prompt_tokens, decode_prompt, new_tokens) < 1:
        raise ValueError("prompt_tokens, decode_prompt and new_tokens must be positive")
    model.eval()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(0)
    length = max(prompt_tokens, decode_prompt)
    ids = torch.randint(0, vocab or _vocab_size(model), (1, length), generator=gen).to(device)
    long_ids, short_ids = ids[:, :prompt_tokens], ids[:, :decode_prompt]

    def prefill(x: torch.Tensor) -> Callable[[], Any]:
        return lambda: model(input_ids=x, use_cache=True, logits_to_keep=1)

    def decode() -> torch.Tensor:
        # min_new_tokens == max_new_tokens masks EOS until the last step, and eos_token_id=None
        # lets no stopping criterion end the loop early: exactly new_tokens steps every time.
        return model.generate(  # type: ignore[operator]
            short_ids,
            attention_mask=torch.ones_like(short_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )

    prefill(long_ids)()  # warm-up: lazy init, allocator and kernel caches
    prefill_s, _ = _best_seconds(prefill(long_ids), device, repeats)
    short_s, _ = _best_seconds(prefill(short_ids), device, repeats)
    decode()  # warm-up
    generate_s, out = _best_seconds(decode, device, repeats)
    produced = int(out.shape[1]) - decode_prompt
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens instead of {new_tokens}")
    # generate = one prefill of the prompt + new_tokens - 1 cached steps + generate's overhead;
    # when timing noise makes the difference non-positive (tiny models), fall back to the whole time.
    decode_s = generate_s - short_s if generate_s > short_s else generate_s
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s": new_tokens / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "peak_rss_bytes": peak_memory_bytes(device),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "prompt_tokens": prompt_tokens,
        "decode_prompt": decode_prompt,
        "new_tokens": new_tokens,
        "repeats": repeats,
    }


def measure_in_subprocess(
    model_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    dtype: str = "float32",
    timeout: float | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`measure` of ``tyr.load(model_dir)`` in a fresh Python process (so that the peak
    memory is this model's alone); `kw` are measure's keyword arguments, `timeout` in seconds."""
    package_root = str(Path(__file__).resolve().parents[2])  # the directory that holds tyr/
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
    args = json.dumps({**kw, "device": device, "dtype": dtype})
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(model_dir), args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"measuring {model_dir} took longer than {timeout} s") from exc
    for line in reversed(proc.stdout.splitlines()):
        if proc.returncode == 0 and line.startswith(MARKER):
            result: dict[str, Any] = json.loads(line.removeprefix(MARKER))
            return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"measuring {model_dir} failed (exit {proc.returncode}): {tail}")


def cost_per_million(tokens_per_s: float, usd_per_hour: float) -> float:
    """USD per 1,000,000 tokens for a machine that costs `usd_per_hour` and runs at `tokens_per_s`."""
    if tokens_per_s <= 0:
        raise ValueError("tokens_per_s must be positive")
    return usd_per_hour / (tokens_per_s * 3600.0) * 1e6
