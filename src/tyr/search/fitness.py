"""Fitness of a genome: KL(teacher ‖ student) over the dense teacher's top-k logits (docs/algorithm.md
§7.5, §7.6), evaluated on a physically sliced model that reloads only the changed sub-layers and
starts each genome from the parent's hidden states at its first changed block (§7.8 levers 1–4;
the parent's state is kept at one block per batch and advanced as the genomes go, not at every
block)."""

from __future__ import annotations

import copy
import io
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from tyr import arch
from tyr.arch import ArchSpec, Shape
from tyr.budget import Gene, layout
from tyr.infra import atomic_json, atomic_write, dist
from tyr.search.space import Genome
from tyr.stream import LazyModel, Prefix, resident
from tyr.supernet import Candidate, Store

log = logging.getLogger(__name__)

HEAD_ROWS = 32768  # vocabulary rows of a non-fp32 LM head converted to fp32 at once

__all__ = ["kl_positions", "topk_kl", "TeacherCache", "OnTheFlyTeacher", "Teacher", "LiveModel", "KLFitness"]


def kl_positions(student: Tensor, t_vals: Tensor, t_idx: Tensor | None = None) -> Tensor:
    """KL(teacher ‖ student) at each position but the last of each sequence, [B, T-1], with
    autograd: over the teacher's top-k when `t_idx` is given (both distributions renormalised
    over those k; `student` gathered there when its last dim ≠ k), else over the whole
    vocabulary (`t_vals` then holds the teacher's full logits)."""
    s = student.float()
    t_vals = t_vals.to(s.device)
    if t_idx is not None:
        t_idx = t_idx.to(s.device)
        if s.shape[-1] != t_idx.shape[-1]:
            s = s.gather(-1, t_idx.long())
    lt = torch.log_softmax(t_vals.float(), dim=-1)[:, :-1]
    ls = torch.log_softmax(s, dim=-1)[:, :-1]
    return (lt.exp() * (lt - ls)).sum(-1)


def topk_kl(student: Tensor, t_vals: Tensor, t_idx: Tensor) -> tuple[float, int]:
    """Σ_t KL_t and the position count, both distributions renormalised over the teacher's top-k.

    student: [B, T, V] or [B, T, k] already gathered (gathered when its last dim ≠ V);
    t_vals / t_idx: [B, T, k]. The last position of each sequence is dropped.
    """
    kl = kl_positions(student, t_vals, t_idx)
    return float(kl.sum()), kl.numel()


class TeacherCache:
    """Top-k logits of the dense model for each calibration sequence, in memory-mapped files,
    computed the first time a sequence is drawn; a persisted bitmap makes restarts reuse it."""

    def __init__(self, root: Path, n_seq: int, seq_len: int, k: int) -> None:
        self.root, self.k = root, k
        self.computed = 0  # sequences whose teacher forward ran in this process
        self.persist = dist.is_main()  # other ranks compute the same values into memory
        self.values: Any
        self.index: Any
        if not self.persist:
            self.values = np.zeros((n_seq, seq_len, k), dtype=np.float32)
            self.index = np.zeros((n_seq, seq_len, k), dtype=np.int32)
            self.filled = np.zeros(n_seq, dtype=bool)
            return
        root.mkdir(parents=True, exist_ok=True)
        meta = {"n_seq": n_seq, "seq_len": seq_len, "k": k}
        meta_path = root / "meta.json"
        self._filled_path = root / "filled.npy"
        fresh = True
        if meta_path.is_file():
            try:
                fresh = json.loads(meta_path.read_text()) != meta
                if not fresh:
                    self.filled = np.load(self._filled_path)
                    fresh = self.filled.shape != (n_seq,) or self.filled.dtype != np.bool_
            except (ValueError, OSError) as exc:
                log.warning("teacher cache %s is damaged (%s); recomputing it", root, exc)
                fresh = True
        mode: Literal["w+", "r+"] = "w+" if fresh else "r+"
        self.values = np.memmap(root / "values.f32", dtype=np.float32, mode=mode, shape=(n_seq, seq_len, k))
        self.index = np.memmap(root / "index.i32", dtype=np.int32, mode=mode, shape=(n_seq, seq_len, k))
        if fresh:
            self.filled = np.zeros(n_seq, dtype=bool)  # the bitmap first: meta.json declares the cache usable
            self._save_filled()
            atomic_json(meta_path, meta)

    def _save_filled(self) -> None:
        if not self.persist:
            return
        buf = io.BytesIO()
        np.save(buf, self.filled)
        atomic_write(self._filled_path, buf.getvalue())

    def get(self, rows: Sequence[int], teacher_topk) -> tuple[Tensor, Tensor]:
        """[len(rows), T, k] values and indices; `teacher_topk(row, k)` → [T, k] fp32 values and
        indices of one missing sequence (never [n, T, V] logits)."""
        missing = [r for r in rows if not self.filled[r]]
        if missing:
            for r in missing:
                vals, idx = teacher_topk(r, self.k)
                self.computed += 1
                self.values[r] = vals.cpu().numpy()
                self.index[r] = idx.to(torch.int32).cpu().numpy()
            if self.persist:
                self.values.flush()
                self.index.flush()
            self.filled[missing] = True
            self._save_filled()
        return torch.from_numpy(np.asarray(self.values[list(rows)])), torch.from_numpy(
            np.asarray(self.index[list(rows)])
        )


class LiveModel:
    """A copy of the dense model whose sub-layers are the supernet candidates of a genome,
    physically sliced; applying a genome reloads only the sub-layers whose level changed.

    The student gets each block the first time a genome sets it, copied from the dense block
    (read from disk first for a lazy model, :mod:`tyr.stream.lazy`) and sliced at once, never a
    second dense copy. In host memory it shares the dense model's tensors outside the blocks
    (embedding, final norm, LM head: never pruned); on an accelerator it holds a copy of those
    and each block goes there once sliced, so neither memory holds the dense model twice."""

    def __init__(
        self,
        dense: nn.Module,
        spec: ArchSpec,
        shape: Shape,
        genes: Sequence[Gene],
        candidates: dict[Gene, list[Candidate]],
        store: Store,
        device: str = "cpu",
        stream: bool | None = None,
        lazy: LazyModel | None = None,
    ) -> None:
        from tyr.modeling import set_attention, set_mlp

        self._set_attention, self._set_mlp = set_attention, set_mlp
        self.dense, self.spec, self.shape, self.genes, self.store = dense, spec, shape, tuple(genes), store
        self.by_level = {g: {c.level: c for c in candidates[g]} for g in self.genes}
        self.lazy = lazy
        # The student lives on `device` when the model fits there; otherwise (stream) it stays in
        # host memory and each forward moves one block at a time to the device. The dense
        # teacher stays where it is.
        self.stream = _too_big(dense, device) if stream is None else stream
        self.device = device
        self.model = _shell(dense, spec, "cpu" if self.stream else device)
        self.loaded: dict[Gene, int] = {}
        self.reloads = 0

    def apply(self, genome: Genome) -> nn.Module:
        dense_layers, live_layers = arch.layers(self.dense, self.spec), arch.layers(self.model, self.spec)
        changed: dict[int, list[tuple[Gene, int]]] = {}
        for gene, level in zip(self.genes, genome, strict=True):
            if self.loaded.get(gene) != level:
                changed.setdefault(gene.block, []).append((gene, level))
        for b, genes in changed.items():
            with resident(dense_layers[b], self.lazy):
                if _unread(live_layers[b]):
                    live_layers[b] = copy.deepcopy(dense_layers[b])  # sliced below, before the next
                for gene, level in genes:
                    self._set(gene, level, dense_layers[b], live_layers[b])
            if self.device != "cpu" and not self.stream:
                live_layers[b].to(self.device)
        return self.model

    def _set(self, gene: Gene, level: int, dense: nn.Module, live: nn.Module) -> None:
        cand = self.by_level[gene][level]
        weight = self.store.weight(cand)
        if gene.kind == "attn":
            heads = layout(cand.kept, self.shape.n_q, self.shape.n_kv)
            parts = arch.attention_parts(dense, self.spec)
            self._set_attention(live, self.spec, self.shape, gene.block, parts, heads, weight)
        else:
            self._set_mlp(live, self.spec, arch.mlp_parts(dense, self.spec), cand.kept, weight)
        self.loaded[gene] = level
        self.reloads += 1


def _shell(dense: nn.Module, spec: ArchSpec, device: str = "cpu") -> nn.Module:
    """A copy of `dense` whose blocks' tensors are on the meta device (no memory) until
    :meth:`LiveModel.apply` fills them; its other tensors are the dense model's own (`device`
    cpu) or copies on `device` (a tied pair stays one tensor)."""

    def moved(t: Tensor, where: str) -> Tensor:
        out = t.detach().to(where) if where == "meta" else t.detach().to(where, copy=True)
        return nn.Parameter(out, requires_grad=False) if isinstance(t, nn.Parameter) else out

    memo: dict[int, Any] = {}
    for layer in arch.layers(dense, spec):
        for t in layer.state_dict(keep_vars=True).values():
            memo[id(t)] = moved(t, "meta")
    for t in (*dense.parameters(), *dense.buffers()):
        if id(t) not in memo:
            memo[id(t)] = t if device == "cpu" else moved(t, device)
    return copy.deepcopy(dense, memo=memo).eval()


def _unread(layer: nn.Module) -> bool:
    """Whether a student block still has the meta tensors of its shell."""
    return any(t.is_meta for t in layer.state_dict().values())


def _too_big(model: nn.Module, device: str) -> bool:
    """Whether a copy of `model` would take more than 80 % of the device's free memory."""
    if device == "cpu":
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size > 0.8 * free


def head_logits(model: nn.Module, spec: ArchSpec, h: Tensor, t_idx: Tensor, chunk: int = 16) -> Tensor:
    """Logits of final hidden states `h` [B, T, d] at the teacher's top-k indices, [B, T, k]
    fp32: only those k rows of the LM head are multiplied (k·d instead of V·d per position), in
    position chunks (§7.5)."""
    head = arch.get_module(model, spec.lm_head)
    h = h.to(head.weight.device).float()
    W = head.weight  # [V, d]; only the rows used are converted to fp32
    idx = t_idx.to(h.device).long()
    parts = []
    for s in range(0, h.shape[1], chunk):
        i = idx[:, s : s + chunk]  # [B, c, k]
        # index_select, not W[i]: its backward (index_add) is deterministic on the CPU, where an
        # advanced index's (an accumulating index_put) is not, and healing must repeat its bytes
        rows = W.index_select(0, i.flatten()).float().view(*i.shape, -1)
        z = torch.einsum("bcd,bckd->bck", h[:, s : s + chunk], rows)
        if head.bias is not None:
            z = z + head.bias.float().index_select(0, i.flatten()).view(i.shape)
        parts.append(z)
    return _softcap(model, torch.cat(parts, dim=1))


def _softcap(model: nn.Module, z: Tensor) -> Tensor:
    """The family's final logit soft-capping, when it has one (Gemma 2 and 3)."""
    cap = arch.logit_softcap(model)
    return z if cap is None else torch.tanh(z / cap) * cap


def _topk_logits(
    model: nn.Module, spec: ArchSpec, h: Tensor, k: int, chunk: int = 256
) -> tuple[Tensor, Tensor]:
    """The top-k logits of final hidden states `h` [B, T, d] over the whole vocabulary and
    their indices, [B, T, k] fp32 and int64, with the arithmetic of :func:`head_logits`, in
    position chunks. An fp32 LM head gives the logits of a chunk at once; a head in another
    dtype is converted HEAD_ROWS vocabulary rows at a time, each slice's top-k merged into the
    chunk's, so that neither the head in fp32 nor a chunk's [c, V] logits are ever whole."""
    head = arch.get_module(model, spec.lm_head)
    W = head.weight
    h = h.to(W.device).float()
    bias = head.bias.float() if head.bias is not None else None

    def logits(x: Tensor, lo: int, hi: int) -> Tensor:
        z = x @ (W.T if W.dtype == torch.float32 else W[lo:hi].float().T)
        return _softcap(model, z if bias is None else z + bias[lo:hi])

    vals, idx = [], []
    for s in range(0, h.shape[1], chunk):
        x = h[:, s : s + chunk]
        if W.dtype == torch.float32:
            v, i = logits(x, 0, W.shape[0]).topk(k, dim=-1)
        else:
            best_v, best_i = [], []
            for lo in range(0, W.shape[0], HEAD_ROWS):
                z = logits(x, lo, min(lo + HEAD_ROWS, W.shape[0]))
                top = z.topk(min(k, z.shape[-1]), dim=-1)
                best_v.append(top.values)
                best_i.append(top.indices + lo)
            v, j = torch.cat(best_v, dim=-1).topk(k, dim=-1)
            i = torch.cat(best_i, dim=-1).gather(-1, j)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals, dim=1), torch.cat(idx, dim=1)


def _reference(genomes: Sequence[Genome]) -> Genome:
    """Each gene's most frequent level among `genomes` (ties: the lowest). For the offspring of
    one parent that is the parent, whatever the genomes of the call."""
    counts = (Counter(levels) for levels in zip(*genomes, strict=True))
    return tuple(min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for c in counts)


class OnTheFlyTeacher:
    """The teacher's top-k recomputed for every minibatch, one sequence at a time as
    :class:`TeacherCache` fills itself, so both give the same values; nothing is stored. For a
    calibration set whose cache would not fit the disk (docs/algorithm.md §7.6). Under torchrun
    the minibatch's sequences are dealt between the processes: each runs the teacher on its
    share and receives the others' top-k, bit for bit."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.computed = 0  # sequences whose teacher forward ran in this process

    def get(self, rows: Sequence[int], teacher_topk) -> tuple[Tensor, Tensor]:
        """[len(rows), T, k] fp32 values and int32 indices; `teacher_topk(row, k)` → [T, k]."""
        k, own = self.k, dist.mine(len(rows))

        def packed(j: int) -> Tensor:  # this rank's j-th: values and the indices' bits, to send
            v, idx = teacher_topk(rows[own[j]], k)
            self.computed += 1
            return torch.cat([v, idx.to(torch.int32).view(torch.float32)], dim=-1)

        vals, idx = [], []
        for both in dist.each_in_order(len(rows), packed):
            both = both.cpu()
            vals.append(both[..., :k].contiguous())
            idx.append(both[..., k:].contiguous().view(torch.int32))
        return torch.stack(vals), torch.stack(idx)


Teacher = TeacherCache | OnTheFlyTeacher


class KLFitness:
    """fitness(stage, genomes): each call draws a fresh minibatch of distinct calibration
    sequences, shared by all genomes of the call, and returns the token-weighted mean top-k KL."""

    def __init__(
        self,
        live: LiveModel,
        calib: Tensor,
        teacher: Teacher,
        stage_tokens: Sequence[int],
        rng: random.Random,
        batch_size: int = 8,
    ) -> None:
        self.live, self.calib, self.teacher = live, calib, teacher
        self.stage_tokens, self.rng, self.batch_size = tuple(stage_tokens), rng, batch_size
        self.tokens_evaluated = 0

    def _teacher_topk(self, row: int, k: int) -> tuple[Tensor, Tensor]:
        """The dense model's top-k logits of calibration sequence `row`, [T, k] fp32 and their
        indices: its final hidden states by the student's own block path (the same dtype and
        kernels) and its LM head in fp32, as the student's logits are, so that a genome of
        dense candidates scores KL 0 in any model dtype (docs/algorithm.md §11.12)."""
        live = self.live
        with torch.inference_mode():
            ids = self.calib[[row]]
            h = Prefix(live.dense, live.spec, ids, live.device, live.lazy).final(live.dense)
            vals, idx = _topk_logits(live.dense, live.spec, h, k)
            return vals[0], idx[0]

    def minibatch(self, tokens: int) -> tuple[list[int], int]:
        """Distinct random sequences until `tokens`; the last one truncated: (rows, its length)."""
        n_seq, L = self.calib.shape
        need = min(n_seq, -(-tokens // L))
        rows = self.rng.sample(range(n_seq), need)
        last = tokens - (need - 1) * L if tokens < n_seq * L else L
        return rows, max(2, min(L, last))

    @torch.inference_mode()
    def __call__(self, stage: int, genomes: Sequence[Genome]) -> list[float]:
        rows, last = self.minibatch(self.stage_tokens[stage])
        vals, idx = self.teacher.get(rows, self._teacher_topk)
        # Token batches with their teacher top-k; the truncated last sequence is a batch of its own.
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        for s in range(0, len(rows), self.batch_size):
            ids = self.calib[rows[s : s + self.batch_size]]
            v, i = vals[s : s + self.batch_size], idx[s : s + self.batch_size]
            if s + self.batch_size >= len(rows):
                parts += [(ids[:-1], v[:-1], i[:-1]), (ids[-1:, :last], v[-1:, :last], i[-1:, :last])]
            else:
                parts.append((ids, v, i))
        parts = [p for p in parts if p[0].shape[0]]
        mine = dist.mine(len(genomes))  # genomes scored on different ranks
        scores = self._score(parts, [genomes[g] for g in mine])
        self.tokens_evaluated += len(mine) * ((len(rows) - 1) * self.calib.shape[1] + last)
        return dist.gather(dict(zip(mine, scores, strict=True)), len(genomes))

    def _score(self, parts: list[tuple[Tensor, Tensor, Tensor]], genomes: list[Genome]) -> list[float]:
        """Mean top-k KL of each genome. The genomes run in the order of their first block that
        differs from the reference genome, so each batch's reference hidden states only move
        forward and every genome starts from them at its first own block: a genome's blocks
        before it are the reference's."""
        if not genomes:
            return []
        live = self.live
        ref = _reference(genomes)
        n_blocks = len(arch.layers(live.model, live.spec))
        branch = [
            min((g.block for g, a, b in zip(live.genes, ref, x, strict=True) if a != b), default=n_blocks)
            for x in genomes
        ]
        prefixes: list[Prefix] = []
        scores = [0.0] * len(genomes)
        for k in sorted(range(len(genomes)), key=lambda k: (branch[k], k)):
            model = live.apply(genomes[k])
            if not prefixes:  # the embedding stage, once per batch
                prefixes = [Prefix(model, live.spec, ids, live.device) for ids, _, _ in parts]
            total, count = 0.0, 0
            for prefix, (_, v, i) in zip(prefixes, parts, strict=True):
                h = prefix.final(model, branch[k])
                kl, n = topk_kl(head_logits(model, live.spec, h, i), v, i)
                total, count = total + kl, count + n
            scores[k] = total / max(count, 1)
        return scores
