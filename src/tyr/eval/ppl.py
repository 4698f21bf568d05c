"""Held-out perplexity through the streaming primitive: exp of the token-weighted mean NLL."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tyr import arch
from tyr.arch import ArchSpec
from tyr.infra import assets, atomic_json
from tyr.stream import LazyModel, capture, on_device, run_blocks

__all__ = ["LOGIT_ELEMENTS", "nll_sum", "perplexity", "cached_ppl"]

LOGIT_ELEMENTS = 1 << 25  # fp32 logits per chunk (128 MiB), whatever the batch and vocabulary


def nll_sum(
    hidden: Tensor,
    ids: Tensor,
    norm: nn.Module,
    head: nn.Module,
    softcap: float | None = None,
) -> tuple[float, int]:
    """Σ next-token NLL over a batch [b, T] from final hidden states, logits upcast to fp32 in
    chunks of tokens so that a chunk holds at most LOGIT_ELEMENTS values and [b·T, V] fp32 never
    exists at once (docs/algorithm.md §11.2); `softcap` is the family's final logit soft-capping."""
    total = 0.0
    h = norm(hidden)[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].to(h.device).flatten()
    vocab: int = head.out_features if isinstance(head, nn.Linear) else int(head(h[:1]).shape[-1])
    rows = max(1, LOGIT_ELEMENTS // vocab)
    for s in range(0, h.shape[0], rows):
        logits = head(h[s : s + rows]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        total += float(F.cross_entropy(logits, targets[s : s + rows], reduction="sum"))
    return total, int(targets.numel())


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    spec: ArchSpec,
    windows: Tensor,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    desc: str = "perplexity",
    lazy: LazyModel | None = None,
    offload: str = "cpu",
    offload_root: Path | None = None,
) -> float:
    """PPL of non-overlapping windows [n, L], one block at a time (`lazy`: the state of a model
    whose blocks are read from disk); the block activations live in memory or, with `offload`
    disk, in files under `offload_root`."""
    batches = list(windows.split(batch_size))
    inputs = capture(model, spec, batches, device, offload, offload_root, lazy=lazy)
    bar = tqdm(total=len(arch.layers(model, spec)), desc=desc, unit="block", leave=False)
    norm, head = arch.get_module(model, spec.final_norm), arch.get_module(model, spec.lm_head)
    try:
        run_blocks(model, spec, inputs, device, on_block=lambda _: bar.update(), lazy=lazy)
        total, count = 0.0, 0
        with on_device(norm, device), on_device(head, device):
            for i, ids in enumerate(batches):
                t, c = nll_sum(
                    inputs.hidden[i].to(device), ids, norm, head, softcap=arch.logit_softcap(model)
                )
                total, count = total + t, count + c
    finally:
        bar.close()
        inputs.close()
    nll = total / count
    return math.exp(nll) if nll < 709 else math.inf  # beyond a double: a broken model


def cached_ppl(key_parts: dict[str, Any], compute: Callable[[], float]) -> float:
    """`compute()`, remembered under $TYR_HOME/ppl by `key_parts` (what the number depends on:
    the weights' fingerprint, the source, the tokens, the sequence length, the dtype)."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    path = assets.tyr_home() / "ppl" / f"{key}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["ppl"])
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(path, {**key_parts, "ppl": value})
    return value
