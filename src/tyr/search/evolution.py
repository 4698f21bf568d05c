"""Budget-preserving (1+λ) evolution with staged selection (docs/algorithm.md §7.2–§7.4)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tyr.search.space import Genome, Space

__all__ = ["mutate", "offspring", "Generation", "evolve"]

# fitness(stage, genomes) -> one value per genome, lower is better. Each call draws a fresh
# minibatch shared by all the genomes of that call.
Fitness = Callable[[int, Sequence[Genome]], Sequence[float]]


def mutate(parent: Genome, space: Space, rng: random.Random, max_tries: int = 100) -> Genome | None:
    """Sparsity shift: n ~ min(U{1..4}, U{1..4}) times, one gene one level denser and another
    gene of the same kind (any kind, under a joint budget) one level sparser (§7.2). None when
    no valid shift exists."""
    child = list(parent)
    n = min(rng.randint(1, 4), rng.randint(1, 4))
    for _ in range(n):
        for _ in range(max_tries):
            down = [i for i in range(len(child)) if child[i] - 1 >= space.low[i]]
            if not down:
                return None
            i = rng.choice(down)
            pool = range(len(child)) if space.joint else space.of_kind(space.genes[i].kind)
            up = [j for j in pool if j != i and child[j] + 1 <= space.high[j]]
            if up:
                j = rng.choice(up)
                child[i] -= 1
                child[j] += 1
                break
        else:
            return None
    return tuple(child)


def offspring(
    parent: Genome, space: Space, rng: random.Random, count: int, max_draws: int = 0
) -> list[Genome]:
    """Up to `count` distinct valid children, none equal to the parent (§7.3)."""
    seen = {parent}
    out: list[Genome] = []
    for _ in range(max_draws or 50 * count):
        if len(out) == count:
            break
        child = mutate(parent, space, rng)
        if child is None or child in seen or not space.valid(child):
            continue
        seen.add(child)
        out.append(child)
    return out


@dataclass
class Generation:
    parent: Genome
    parent_fitness: float
    evaluated: list[int] = field(default_factory=list)  # candidates scored per stage


def evolve(
    space: Space,
    fitness: Fitness,
    rng: random.Random,
    *,
    generations: int,
    offspring_count: int,
    survivors: Sequence[int],
    start: Genome | None = None,
    on_generation: Callable[[int, Generation], None] | None = None,
) -> tuple[Genome, list[Generation]]:
    """Elitist (1+λ) search. Stage s scores the current candidates on a fresh minibatch and
    keeps the best survivors[s]; the last stage also re-scores the parent (no stale fitness),
    and the best of that stage becomes the next parent."""
    parent = start if start is not None else space.zero
    if not space.valid(parent):
        raise ValueError("the starting genome breaks the budget")
    history: list[Generation] = []
    for gen in range(generations):
        pool = offspring(parent, space, rng, offspring_count)
        if not pool:
            break
        record = Generation(parent, float("nan"))
        for stage, keep in enumerate(survivors):
            last = stage == len(survivors) - 1
            candidates = [parent, *pool] if last else pool  # ties keep the parent
            scores = list(fitness(stage, candidates))
            record.evaluated.append(len(candidates))
            ranked = sorted(range(len(candidates)), key=lambda i: (scores[i], i))
            if last:
                best = ranked[0]
                parent = candidates[best]
                record.parent, record.parent_fitness = parent, scores[best]
            else:
                pool = [candidates[i] for i in ranked[: max(1, keep)]]
        history.append(record)
        if on_generation is not None:
            on_generation(gen, record)
    return parent, history
