"""Týr-the-Pruner: supernet → evolutionary search → re-centre, coarse to fine (docs/algorithm.md §1, §8)."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from tyr import budget
from tyr.arch import ArchSpec
from tyr.budget import BUDGETS, KINDS, Gene, Shape, SubLayer, Widths
from tyr.config import TEACHER_ENTRY_BYTES, teacher_cache_mode
from tyr.errors import UserError
from tyr.infra import atomic_json, dist
from tyr.modeling import LayerPlan
from tyr.search import (
    Generation,
    Genome,
    KLFitness,
    LiveModel,
    OnTheFlyTeacher,
    Space,
    Teacher,
    TeacherCache,
    evolve,
)
from tyr.stream import LazyModel, capture
from tyr.supernet import Candidate, Store, SupernetOptions, build

__all__ = ["SearchOptions", "read_genome", "search_prune"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOptions:
    iterations: int = 4
    generations: int = 50
    offspring: int = 128
    stage_tokens: tuple[int, ...] = (2048, 16384, 131072)
    survivors: tuple[int, ...] = (16, 4, 1)
    levels: int = 9
    kl_topk: int = 8192
    teacher_cache: str = "auto"
    seed: int = 0
    gqa_budget_tol: float = 0.005  # of the guarded real parameters: L·P_A, or P_blk when joint (§3.5)
    budget: str = BUDGETS[0]
    supernet: SupernetOptions = SupernetOptions()


def _space(
    genes: list[Gene],
    subs: dict[Gene, SubLayer],
    cands: dict[Gene, list[Candidate]],
    target: float,
    tol: float,
    joint: bool,
) -> Space:
    """Levels per gene, and the guard on the real parameters removed: attention's under the
    per-kind budget (Σ k = 0 per kind besides, §3.5), all of them under the joint one."""
    guarded = [i for i, g in enumerate(genes) if joint or g.kind == "attn"]
    removed = {i: {c.level: c.removed_params for c in cands[genes[i]]} for i in guarded}

    def deviation(genome: Genome) -> float:
        return abs(sum(removed[i][genome[i]] for i in guarded) - target)

    limit = max(tol, deviation((0,) * len(genes)))
    return Space(
        tuple(genes),
        tuple(subs[g].low for g in genes),
        tuple(subs[g].high for g in genes),
        lambda genome: deviation(genome) <= limit,
        joint=joint,
    )


def _teacher(opt: SearchOptions, calib: Tensor, k: int, root: Path) -> Teacher:
    """The teacher's top-k store: a disk cache of the calibration set, or none (§7.6)."""
    mode = teacher_cache_mode(opt.teacher_cache, calib.numel(), k)
    size = calib.numel() * k * TEACHER_ENTRY_BYTES
    if mode == "disk":
        log.info("teacher top-%d logits cached on disk (%.2f GB at most)", k, size / 1e9)
        return TeacherCache(root, calib.shape[0], calib.shape[1], k)
    log.info(
        "teacher top-%d logits recomputed for each minibatch (a cache would take %.1f GB)", k, size / 1e9
    )
    return OnTheFlyTeacher(k)


def _guard(shape: Shape, initial: dict[str, list[int]], tol: float, joint: bool) -> tuple[int, float]:
    """The real parameters the initial centres remove, of attention (or of both kinds under a
    joint budget), and the guard's tolerance: `tol` of those sub-layers' dense parameters."""
    target = budget.attn_target(shape, sum(initial["attn"]))
    dense = shape.attn_params(shape.n_q, shape.n_kv)
    if joint:
        target += sum(budget.mlp_removed(shape, shape.intermediate - c) for c in initial["mlp"])
        dense += shape.mlp_params(shape.intermediate)
    return target, tol * shape.n_layers * dense


def search_prune(
    model: nn.Module,
    spec: ArchSpec,
    shape: Shape,
    sparsity: float,
    calib: Tensor,
    opt: SearchOptions,
    workdir: Path,
    identity: dict[str, Any],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    offload: str = "cpu",
    widths: Widths | None = None,
    lazy: LazyModel | None = None,
) -> tuple[list[LayerPlan | None], list[dict[str, Any]]]:
    """The global search; returns the per-block plans of the final genome and the search log.

    `widths` (`--genome`) replaces the uniform starting point, each block's attention held to
    the structures it allows; with one iteration of one level it applies them without a search.
    `lazy`: the state of `model` when its blocks are read from disk (the supernet build reads
    each block once per iteration; the search's student is built from them block by block).
    """
    L, mode = shape.n_layers, opt.supernet.gqa
    genes = [Gene(b, kind) for b in range(L) for kind in KINDS]
    initial = widths.centres(shape, mode) if widths else budget.initial_centres(shape, sparsity, mode)
    centres_by_gene = {g: int(initial[g.kind][g.block]) for g in genes}
    joint = opt.budget == "joint"
    target, tol = _guard(shape, initial, opt.gqa_budget_tol, joint)
    teacher = _teacher(opt, calib, min(opt.kl_topk, _vocab(model)), workdir / "teacher")
    batches = list(calib.split(batch_size))
    log_rows: list[dict[str, Any]] = []
    best: Genome = (0,) * len(genes)
    cands: dict[Gene, list[Candidate]] = {}
    store: Store | None = None
    for t in range(1, opt.iterations + 1):
        start = time.perf_counter()
        steps = budget.steps(shape, t)
        given = widths if t == 1 else None
        subs = budget.sublayers(shape, centres_by_gene, steps, opt.levels // 2, given, mode)
        ident = {
            **identity,
            "iteration": t,
            "steps": steps,
            "centres": [centres_by_gene[g] for g in genes],
            "supernet": asdict(opt.supernet),
        }
        store = Store(workdir / "supernet", t, ident)
        dist.barrier()  # every rank sees the same files from here on
        saved = _saved(store) if t < opt.iterations else None
        if saved is not None:
            # An earlier iteration that finished before: only its genome re-centres the next.
            best, fitness_log, scored = saved
            log_rows.append(
                _row(steps, centres_by_gene, genes, best, fitness_log, scored, start, 0.0, 0.0, 0, 0)
            )
            store.release()
            centres_by_gene = budget.recentre(centres_by_gene, genes, best, steps)
            continue
        built = time.perf_counter()
        loaded = store.load_all(genes)  # a finished supernet needs no forward pass
        forwards = 0
        if loaded is not None:
            cands = loaded
        else:
            # Each rank runs its share of the calibration chunks through every block.
            inputs = capture(model, spec, batches, device, offload, workdir, lazy=lazy, divide=True)
            try:
                desc = f"supernet {t}/{opt.iterations}"
                cands = build(model, spec, shape, inputs, subs, store, opt.supernet, device, desc, lazy)
                forwards = inputs.forwards
            finally:
                inputs.close()
        built = time.perf_counter() - built

        searched, teacher_before = time.perf_counter(), teacher.computed
        space = _space(genes, subs, cands, float(target), tol, joint)
        live = LiveModel(model, spec, shape, genes, cands, store, device, lazy=lazy)
        best, fitness_log, scored = _search_once(store, space, live, calib, teacher, opt, t, batch_size)
        search_s, rows = time.perf_counter() - searched, teacher.computed - teacher_before
        log_rows.append(
            _row(
                steps,
                centres_by_gene,
                genes,
                best,
                fitness_log,
                scored,
                start,
                built,
                search_s,
                forwards,
                rows,
            )
        )
        log.debug("iteration %d: genome %s", t, " ".join(f"{k:+d}" if k else "0" for k in best))
        if t < opt.iterations:
            store.release()  # the next iteration builds its own supernet from the dense weights
            centres_by_gene = budget.recentre(centres_by_gene, genes, best, steps)

    assert store is not None
    return _plans(shape, genes, best, cands, store), log_rows


def _row(
    steps: dict[str, int],
    centres: dict[Gene, int],
    genes: list[Gene],
    best: Genome,
    fitness_log: list[float],
    scored: int | None,
    start: float,
    built: float,
    search_s: float,
    forwards: int,
    teacher_rows: int,
) -> dict[str, Any]:
    """One iteration's entry of the search log."""
    return {
        "step_attn": steps["attn"],
        "step_mlp": steps["mlp"],
        "centres": [centres[g] for g in genes],
        "genome": list(best),
        "parent_fitness": fitness_log,
        "seconds": round(time.perf_counter() - start, 1),
        "supernet_seconds": round(built, 1),
        "search_seconds": round(search_s, 1),
        "tokens_scored": scored,  # student tokens over all fitness calls (None if unknown)
        "block_forwards": dist.gather({dist.rank(): forwards}, dist.world()),
        "teacher_sequences": dist.gather({dist.rank(): teacher_rows}, dist.world()),
    }


def _plans(
    shape: Shape, genes: list[Gene], genome: Genome, cands: dict[Gene, list[Candidate]], store: Store
) -> list[LayerPlan | None]:
    """The per-block plans of `genome`: each gene's stored candidate at its level."""
    chosen = {g: next(c for c in cands[g] if c.level == k) for g, k in zip(genes, genome, strict=True)}
    plans: list[LayerPlan | None] = []
    for b in range(shape.n_layers):
        a, m = chosen[Gene(b, "attn")], chosen[Gene(b, "mlp")]
        heads = budget.layout(a.kept, shape.n_q, shape.n_kv)
        plans.append(LayerPlan(heads, m.kept, store.weight(a), store.weight(m)))  # read afresh
    return plans


def _saved(store: Store) -> tuple[Genome, list[float], int | None] | None:
    """The result of the store's search when it finished before (``search.json``), else None."""
    path = store.dir / "search.json"
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return tuple(done["genome"]), done["parent_fitness"], done.get("tokens_scored")


def _search_once(
    store: Store,
    space: Space,
    live: LiveModel,
    calib: Tensor,
    teacher: Teacher,
    opt: SearchOptions,
    t: int,
    batch_size: int,
) -> tuple[Genome, list[float], int | None]:
    """Iteration t's search, or its saved result when it finished before."""
    saved = _saved(store)
    if saved is not None:
        return saved
    ckpt = store.dir / "search.ckpt.json"
    best, fitness_log, scored = _evolve_resumable(ckpt, space, live, calib, teacher, opt, t, batch_size)
    if dist.is_main():
        atomic_json(
            store.dir / "search.json",
            {"genome": list(best), "parent_fitness": fitness_log, "tokens_scored": scored},
        )
    return best, fitness_log, scored


def read_genome(path: str, config: Any, mode: str) -> Widths:
    """Per-block widths from `--genome`, checked against the model's config and the GQA mode
    before any work: {"q_heads": [...], "kv_heads": [...], "intermediate": [...]} kept per
    block ("kv_heads" optional), a tyr result.json (its layers, read the same way), or
    {"attn": [query heads removed], "mlp": [neurons removed]} (the KV heads left to the solver)."""
    L, n_q, d_ff = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    need = (
        f'give {{"q_heads": [...], "kv_heads": [...], "intermediate": [...]}} kept per block ({L} each),'
        f' {{"attn": [query heads removed], "mlp": [neurons removed]}} or a tyr result.json'
    )
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read --genome {path}: {exc}", "give a JSON file") from exc
    if not isinstance(data, dict):
        raise UserError(f"--genome {path} is not a genome for this model", need)

    def counts(key: str, n: int, optional: bool = False) -> list[Any]:
        values = data.get(key)
        if not isinstance(values, list) or len(values) != L:
            raise UserError(f"--genome {path}: {key!r} is not a list of {L} integers (one per block)", need)
        for b, x in enumerate(values):
            if not (optional and x is None) and (
                not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= n
            ):
                raise UserError(f"--genome {path}: {key}[{b}] = {x!r} is outside 0..{n}", need)
        return values

    if "layers" in data:
        rows = data["layers"]
        try:
            data = {k: [row[k] for row in rows] for k in ("q_heads", "kv_heads", "intermediate")}
        except (KeyError, TypeError) as exc:
            raise UserError(f"--genome {path} is a damaged tyr result ({exc!r})", need) from exc
    if "attn" in data or "mlp" in data:
        q = [n_q - x for x in counts("attn", n_q)]
        widths = Widths(tuple(q), (None,) * L, tuple(d_ff - x for x in counts("mlp", d_ff)))
    else:
        kv = counts("kv_heads", n_kv, optional=True) if "kv_heads" in data else [None] * L
        widths = Widths(tuple(counts("q_heads", n_q)), tuple(kv), tuple(counts("intermediate", d_ff)))
    heads = Shape(config.hidden_size, L, n_q, n_kv, 1, d_ff, False, False, False, False, False)  # counts only
    for b in range(L):
        if not widths.attn_choices(heads, b, mode):
            raise UserError(
                f"--genome {path}: block {b} keeps {widths.q_heads[b]} query heads over"
                f" {widths.kv_heads[b]} KV heads, which --gqa {mode} cannot",
                "give counts a structure allows (uniform: whole KV groups of equal size)",
            )
    return widths


def _evolve_resumable(
    ckpt: Path,
    space: Space,
    live: LiveModel,
    calib: Tensor,
    teacher: Teacher,
    opt: SearchOptions,
    t: int,
    batch_size: int,
) -> tuple[Genome, list[float], int | None]:
    """Iteration t's evolution, checkpointed after every generation (parent, fitness log and
    both random states), so that a resumed run continues exactly where the last one stopped.
    Returns the best genome, the parent fitness per generation and the student tokens scored
    (summed over ranks; None when the iteration resumed from a checkpoint)."""
    rng, batch_rng = random.Random(f"{opt.seed}-{t}"), random.Random(f"{opt.seed}-{t}-batches")
    parent: Genome | None = None
    fitness_log: list[float] = []
    if ckpt.is_file():
        try:
            state = json.loads(ckpt.read_text())
            parent, fitness_log = tuple(state["parent"]), list(state["parent_fitness"])
            rng.setstate(_rng_state(state["rng"]))
            batch_rng.setstate(_rng_state(state["batch_rng"]))
            log.info("search %d: resuming after generation %d", t, len(fitness_log))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is damaged (%s); this iteration's search starts again", ckpt, exc)
            rng, batch_rng = random.Random(f"{opt.seed}-{t}"), random.Random(f"{opt.seed}-{t}-batches")
            parent, fitness_log = None, []
    fitness = KLFitness(live, calib, teacher, opt.stage_tokens, batch_rng, batch_size)
    bar = tqdm(
        total=opt.generations, initial=len(fitness_log), desc=f"search {t}/{opt.iterations}", unit="gen"
    )

    def progress(gen: int, record: Generation) -> None:
        fitness_log.append(record.parent_fitness)
        state = {
            "parent": list(record.parent),
            "parent_fitness": fitness_log,
            "rng": rng.getstate(),
            "batch_rng": batch_rng.getstate(),
        }
        if dist.is_main():
            atomic_json(ckpt, state, indent=None)
        bar.set_postfix(kl=f"{record.parent_fitness:.4f}")
        bar.update()

    try:
        best, _ = evolve(
            space,
            fitness,
            rng,
            generations=opt.generations - len(fitness_log),
            offspring_count=opt.offspring,
            survivors=opt.survivors,
            start=parent,
            on_generation=progress,
        )
    finally:
        bar.close()
    resumed = parent is not None
    scored = sum(dist.gather({dist.rank(): fitness.tokens_evaluated}, dist.world()))
    return best, fitness_log, None if resumed else scored


def _rng_state(saved: list[Any]) -> tuple[Any, ...]:
    """random.Random.getstate() after a JSON round trip (lists back to tuples)."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def _vocab(model: nn.Module) -> int:
    config: Any = model.config
    return int(config.vocab_size)
