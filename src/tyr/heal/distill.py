"""Distillation of a pruned student from its dense teacher: the loss, the schedule, the data
order and the resumable training loop (docs/healing.md §1–§2)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from tyr import arch
from tyr.arch import ArchSpec
from tyr.infra import atomic_writer
from tyr.search import head_logits, kl_positions

__all__ = ["TrainOptions", "Outcome", "distill_loss", "lr_factor", "batch_rows", "train"]

log = logging.getLogger("tyr")

STATE = "state.pt"  # weights being trained, optimizer, scheduler, RNG, curve
BEST = "best.pt"  # the trained weights at the best curve point


def distill_loss(
    student: Tensor,
    teacher: Tensor,
    ids: Tensor,
    *,
    temperature: float = 1.0,
    topk: int | None = None,
    lm_weight: float = 0.0,
    t_idx: Tensor | None = None,
) -> Tensor:
    """Mean over positions of T²·KL(teacher_T ‖ student_T), over the teacher's top-k logits
    (both renormalised there, as the search's fitness) or the whole vocabulary; plus
    `lm_weight` × the next-token cross-entropy of the student on `ids`. Logits [B, L, V]; or,
    with `t_idx` [B, L, k], the student's logits already taken at the teacher's top-k indices
    and `teacher` those k values (no LM loss then: it needs the whole vocabulary)."""
    s, t = student.float() / temperature, teacher.float() / temperature
    if t_idx is not None:
        if lm_weight:
            raise ValueError("the LM loss needs the student's logits over the whole vocabulary")
        kl = kl_positions(s, t, t_idx)
    elif topk is not None and topk < t.shape[-1]:
        vals, idx = t.topk(topk, dim=-1)
        kl = kl_positions(s, vals, idx)
    else:
        kl = kl_positions(s, t)
    loss = kl.mean() * temperature**2
    if lm_weight:
        ce = F.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(student.device))
        loss = loss + lm_weight * ce
    return loss


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warm-up over
    `warmup` steps, then a cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_rows(step: int, batch: int, n: int, seed: int) -> list[int]:
    """The training windows of step `step`: consecutive slices of an epoch order, epoch 0 in
    the windows' own (already shuffled) order, epoch e > 0 in a permutation drawn with seed + e."""
    rows = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(i, n)
        if epoch == 0:
            rows.append(pos)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            rows.append(int(order[pos]))
    return rows


@dataclass(frozen=True)
class TrainOptions:
    steps: int
    batch_size: int
    micro_batch: int
    lr: float
    warmup: float
    weight_decay: float
    temperature: float
    kl_topk: int | None
    lm_weight: float
    eval_every: int
    save_every: int
    seed: int
    device: str = "cpu"


@dataclass
class Outcome:
    """What a training run did: the held-out curve, where it was best and why it ended."""

    curve: list[dict[str, float]] = field(default_factory=list)  # step, tokens, ppl, loss, seconds
    best_step: int = 0
    stopped_early: bool = False
    resumed_at: int | None = None
    seconds: float = 0.0  # training time of this process (a resumed run: since the resume)


def _trainable(net: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in net.named_parameters() if p.requires_grad}


def _save(path: Path, obj: Any) -> None:
    """torch.save through a temporary sibling, fsync and rename: a kill leaves the old file."""
    with atomic_writer(path) as f:
        torch.save(obj, f)


def _weights(net: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().clone() for n, p in _trainable(net).items()}


def _restore(net: nn.Module, weights: dict[str, Tensor]) -> None:
    params = _trainable(net)
    if set(params) != set(weights):
        raise RuntimeError("the checkpoint's weights do not match the model's trainable parameters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def _autocast(device: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a GPU; full precision on the CPU (bf16 matmuls there are slower)."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    opt: TrainOptions,
    workdir: Path,
    held_out_ppl: Callable[[], float],
    spec: ArchSpec,
) -> Outcome:
    """Train the student's trainable parameters for `opt.steps` steps of `opt.batch_size`
    windows; every `eval_every` steps the held-out perplexity is a curve point, and a point
    worse than the start ends the run (the best point's weights are kept). State is saved to
    `workdir` every `save_every` steps and reloaded when present, so a killed run continues
    to the same weights. On return the student holds the best point's weights."""
    params = list(_trainable(student).values())
    optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    warmup = int(opt.warmup * opt.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=opt.steps, warmup=warmup)
    )
    out, step = Outcome(), 0
    losses: list[float]
    state_path, best_path = workdir / STATE, workdir / BEST
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        _restore(student, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        step, out.curve, out.best_step = state["step"], state["curve"], state["best_step"]
        out.stopped_early, losses = state["stopped_early"], state["losses"]
        out.resumed_at = step
        log.info("resuming the healing at step %d of %d", step, opt.steps)
    else:
        losses = []
        start = held_out_ppl()
        out.curve.append({"step": 0, "tokens": 0, "ppl": start, "loss": float("nan"), "seconds": 0.0})
        _save(best_path, _weights(student))
    start_ppl = out.curve[0]["ppl"]
    best_ppl = min(p["ppl"] for p in out.curve)
    seq_tokens = windows.shape[1] * opt.batch_size
    clock = time.perf_counter()
    bar = tqdm(total=opt.steps, initial=step, desc="heal", unit="step", dynamic_ncols=True)
    try:
        while step < opt.steps and not out.stopped_early:
            t0 = time.perf_counter()
            student.train()
            rows = batch_rows(step, opt.batch_size, windows.shape[0], opt.seed)
            loss = _step(student, teacher, windows[rows], opt, spec)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            rate = seq_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", ppl=f"{out.curve[-1]['ppl']:.2f}")
            if step % opt.eval_every == 0 or step == opt.steps:
                student.eval()
                ppl = held_out_ppl()
                point = {
                    "step": step,
                    "tokens": step * seq_tokens,
                    "ppl": ppl,
                    "loss": sum(losses) / len(losses),
                    "seconds": round(time.perf_counter() - clock, 3),
                }
                out.curve.append(point)
                losses = []
                if ppl < best_ppl:
                    best_ppl, out.best_step = ppl, step
                    _save(best_path, _weights(student))
                if ppl > start_ppl:
                    out.stopped_early = True
                    log.warning(
                        "held-out perplexity rose above the start (%.3f > %.3f) at step %d; stopping"
                        " and keeping step %d",
                        ppl,
                        start_ppl,
                        step,
                        out.best_step,
                    )
            if step % opt.save_every == 0 or step == opt.steps or out.stopped_early:
                state = {
                    "step": step,
                    "weights": _weights(student),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state(),
                    "curve": out.curve,
                    "best_step": out.best_step,
                    "stopped_early": out.stopped_early,
                    "losses": losses,
                }
                _save(state_path, state)
    finally:
        bar.close()
    out.seconds = round(time.perf_counter() - clock, 3)
    student.eval()
    _restore(student, torch.load(best_path, map_location="cpu", weights_only=True))
    return out


def _step(student: nn.Module, teacher: nn.Module, batch: Tensor, opt: TrainOptions, spec: ArchSpec) -> float:
    """One accumulated gradient over `batch`, in micro-batches; returns the mean loss. With a
    top-k KL and no LM loss, the student's LM head multiplies only the teacher's k rows per
    position (as the fitness does), which saves most of the head's and the loss's work."""
    device = next(student.parameters()).device
    gather = opt.kl_topk is not None and not opt.lm_weight
    total = 0.0
    for part in batch.split(opt.micro_batch):
        ids = part.to(device)
        with _autocast(opt.device):
            with torch.no_grad():
                t_logits = teacher(ids).logits
            if gather and opt.kl_topk is not None and opt.kl_topk < t_logits.shape[-1]:
                t_vals, t_idx = t_logits.topk(opt.kl_topk, dim=-1)
                base = _hf_model(student)
                h = arch.get_module(base, _decoder_path(spec))(ids).last_hidden_state
                loss = distill_loss(
                    head_logits(base, spec, h, t_idx), t_vals, ids, temperature=opt.temperature, t_idx=t_idx
                )
            else:
                loss = distill_loss(
                    student(ids).logits,
                    t_logits,
                    ids,
                    temperature=opt.temperature,
                    topk=opt.kl_topk,
                    lm_weight=opt.lm_weight,
                )
        (loss * (part.shape[0] / batch.shape[0])).backward()
        total += float(loss.detach()) * part.shape[0]
    return total / batch.shape[0]


def _hf_model(net: nn.Module) -> nn.Module:
    """The causal-LM module under a peft wrapper (adapters stay injected in it)."""
    get_base = getattr(net, "get_base_model", None)
    return get_base() if callable(get_base) else net


def _decoder_path(spec: ArchSpec) -> str:
    """The decoder stack whose output is the final-normed hidden state: the final norm's parent."""
    return spec.final_norm.rpartition(".")[0]
