"""Held-out perplexity through the streaming primitive: exp of the token-weighted mean NLL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tyr import arch
from tyr.arch import ArchSpec
from tyr.stream import capture, on_device, run_blocks

__all__ = ["nll_sum", "perplexity"]


def nll_sum(
    hidden: Tensor,
    ids: Tensor,
    norm: nn.Module,
    head: nn.Module,
    chunk: int = 256,
    softcap: float | None = None,
) -> tuple[float, int]:
    """Σ next-token NLL over a batch [b, T] from final hidden states, logits upcast to fp32 in
    position chunks so [T, V] fp32 never exists at once (ALGORITHM.md §11.2); `softcap` is the
    family's final logit soft-capping."""
    total, count = 0.0, 0
    h = norm(hidden)[:, :-1]
    targets = ids[:, 1:].to(h.device)
    for s in range(0, h.shape[1], chunk):
        logits = head(h[:, s : s + chunk]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        total += float(
            F.cross_entropy(logits.flatten(0, 1), targets[:, s : s + chunk].flatten(), reduction="sum")
        )
        count += targets[:, s : s + chunk].numel()
    return total, count


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    spec: ArchSpec,
    windows: Tensor,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    desc: str = "perplexity",
) -> float:
    """PPL of non-overlapping windows [n, L], one block at a time."""
    batches = list(windows.split(batch_size))
    inputs = capture(model, spec, batches, device)
    bar = tqdm(total=len(arch.layers(model, spec)), desc=desc, unit="block", leave=False)
    norm, head = arch.get_module(model, spec.final_norm), arch.get_module(model, spec.lm_head)
    try:
        run_blocks(model, spec, inputs, device, on_block=lambda _: bar.update())
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
    return math.exp(total / count)
