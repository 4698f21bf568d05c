"""`tyr.evaluate`: zero/few-shot accuracy (lm-evaluation-harness scoring) and held-out perplexity.

Scoring (as lm-eval's ``loglikelihood`` for multiple choice): for each answer option, the summed
log-probability of the continuation tokens given the context; ``acc`` takes the argmax, ``acc_norm``
the argmax of log-probability divided by the option's length in characters. Tokenization follows
lm-eval: trailing spaces of a context move to its continuation, the context is encoded alone and
the continuation is the rest of the encoding of context + continuation; no BOS is added.

The context of a question is run once and its KV cache is shared by all options, which are then
scored in one right-padded batch; that gives the same numbers as scoring each option separately.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tyr import arch
from tyr.compat import cache_kwarg
from tyr.data import tasks as taskdata
from tyr.data import windows
from tyr.errors import UserError
from tyr.eval.ppl import perplexity
from tyr.infra import atomic_json

__all__ = ["SCHEMA", "evaluate", "score_doc", "open_for_eval", "lm_eval_harness"]

log = logging.getLogger("tyr")
SCHEMA = "tyr.eval/1"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _split(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = _encode(tokenizer, context) if context else [tokenizer.eos_token_id]
    whole = _encode(tokenizer, context + continuation)
    cont = whole[len(ctx) :] if context else _encode(tokenizer, continuation)
    return ctx, cont


@torch.inference_mode()
def _score_context(model: nn.Module, ctx: list[int], conts: list[list[int]], device: str) -> list[float]:
    """Summed log-probabilities of each continuation after one shared context."""
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    longest = max(len(c) for c in conts)
    ctx = ctx[-max(1, limit - longest) :]  # lm-eval truncates the context from the left
    out = model(torch.tensor([ctx], device=device), use_cache=longest > 1, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = [float(first[c[0]]) if c else 0.0 for c in conts]
    if longest <= 1:
        return scores
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert cache is not None, "the model returns its KV cache with use_cache=True"
    cache.batch_repeat_interleave(len(conts))
    batch = torch.zeros(len(conts), longest - 1, dtype=torch.long, device=device)  # right padding
    for i, c in enumerate(conts):
        if len(c) > 1:
            batch[i, : len(c) - 1] = torch.tensor(c[:-1])
    cls: Any = type(model)
    logp = torch.log_softmax(model(batch, **{cache_kwarg(cls): cache}).logits.float(), dim=-1)
    for i, c in enumerate(conts):
        if len(c) > 1:
            target = torch.tensor(c[1:], device=device)
            scores[i] += float(logp[i, : len(c) - 1].gather(-1, target[:, None]).sum())
    return scores


def score_doc(model: nn.Module, tokenizer: Any, doc: taskdata.Doc, device: str = "cpu") -> list[float]:
    """Log-likelihood of each option of `doc`, options sharing a context scored together."""
    pairs = [_split(tokenizer, c, o) for c, o in doc.requests]
    scores: list[float] = [0.0] * len(pairs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    for ctx_key, members in groups.items():
        got = _score_context(model, list(ctx_key), [pairs[i][1] for i in members], device)
        for i, s in zip(members, got, strict=True):
            scores[i] = s
    return scores


def _run_task(model: nn.Module, tokenizer: Any, name: str, limit: int | None, device: str) -> dict[str, Any]:
    task = taskdata.TASKS[name]
    docs = list(taskdata.docs(name, limit))
    hits = hits_norm = 0
    for doc in tqdm(docs, desc=f"eval {name}", unit="q", leave=False):
        lls = score_doc(model, tokenizer, doc, device)
        # lm-eval normalises by the option's length in characters, its target delimiter excluded
        lengths = [len(o.removeprefix(" ")) for _, o in doc.requests]
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / max(1, lengths[i]))
        hits += best == doc.gold
        hits_norm += best_norm == doc.gold
    n = len(docs)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": n, "split": task.split, "shots": task.shots}


def open_for_eval(
    model: Any, tokenizer: Any = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, name) from an in-memory model, a tyr output directory, a checkpoint
    directory, a hub id, or None for the embedded default."""
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise UserError("an in-memory model needs its tokenizer", "pass tokenizer=...")
        return model.eval(), tokenizer, type(model).__name__
    from transformers import AutoTokenizer

    from tyr.loader import load, load_model

    if model is not None and (Path(str(model)).expanduser() / "config.json").is_file():
        path = Path(str(model)).expanduser()
        loaded = load(path, dtype=dtype)
        try:
            tok = tokenizer or AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} has no readable tokenizer", "export it with its tokenizer") from exc
        return loaded, tok, str(model)
    found = load_model(None if model is None else str(model), dtype)
    return found.model, tokenizer or found.tokenizer, found.name


def evaluate(
    model: Any = None,
    *,
    tasks: str | Sequence[str] = "paper7",
    limit: int | None = 300,
    ppl: str | None = "wiki:heldout",
    ppl_tokens: int = 65536,
    seq_len: int = 512,
    tokenizer: Any = None,
    device: str = "cpu",
    batch_size: int = 8,
    json_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Accuracy on `tasks` (first `limit` questions each) and perplexity on `ppl` (None: skip);
    returns the ``tyr.eval/1`` dict and writes it to `json_path` when given."""
    names = taskdata.resolve_tasks(tasks)
    if limit is not None and limit <= 0:
        raise UserError(f"limit={limit} must be positive", "e.g. --limit 100")
    net, tok, name = open_for_eval(model, tokenizer)
    net.to(device)
    results = {n: _run_task(net, tok, n, limit, device) for n in names}
    data: dict[str, Any] = {"schema": SCHEMA, "model": name, "tasks": results}
    paper = [results[n]["acc"] for n in taskdata.PAPER7 if n in results]
    data["mean_acc_paper7"] = sum(paper) / len(paper) if len(paper) == len(taskdata.PAPER7) else None
    data["mean_acc"] = sum(r["acc"] for r in results.values()) / len(results)
    if ppl:
        heldout = windows(ppl, "heldout", tok, ppl_tokens, seq_len, False, None)
        spec = arch.spec_for(net)
        value = perplexity(net, spec, heldout, batch_size=batch_size, device=device, desc="perplexity")
        data["ppl"] = {"source": ppl, "tokens": int(heldout.numel()), "seq_len": seq_len, "value": value}
    data["limit"] = limit
    data["date"] = datetime.date.today().isoformat()
    if json_path is not None:
        atomic_json(Path(json_path).expanduser(), data, indent=2)
    return data


def lm_eval_harness(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    **kwargs: Any,
) -> dict[str, Any]:
    """Run lm-evaluation-harness (``pip install lm-eval``) on an in-memory model, e.g. a pruned
    one before export; `include_path` is a folder of extra task YAMLs. Returns lm-eval's
    ``results`` (per task, metric → value) and the per-sample log-likelihoods under ``samples``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError("lm-evaluation-harness is not installed", "pip install 'tyr-pruner[lmeval]'") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=True, **kwargs
    )
    assert out is not None
    return {"results": out["results"], "samples": out.get("samples", {})}
