"""The search knows nothing about torch: driven here with toy fitness functions."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from tyr.budget import Gene, Shape, ffn_step_floor, initial_centres, level_range, step_units, steps
from tyr.search import Space, evolve, mutate, offspring


def toy_space(blocks: int = 6, half: int = 4, guard=None) -> Space:
    genes = tuple(Gene(b, k) for b in range(blocks) for k in ("attn", "mlp"))
    return Space(genes, (-half,) * len(genes), (half,) * len(genes), guard)


def test_steps_and_floors_match_the_spec_examples():
    assert [step_units(32, t, 1) for t in (1, 2, 3, 4)] == [4, 2, 1, 1]
    assert [step_units(24, t, 1) for t in (1, 2, 3, 4)] == [3, 2, 1, 1]
    assert [step_units(11008, t, 32) for t in (1, 2, 3, 4)] == [1376, 688, 344, 172]
    assert [step_units(14336, t, 32) for t in (1, 2, 3, 4)] == [1792, 896, 448, 224]
    assert ffn_step_floor(14336) == 32 and ffn_step_floor(1536) == 24
    assert [step_units(1536, t, ffn_step_floor(1536)) for t in (1, 2, 3, 4)] == [192, 96, 48, 24]
    assert step_units(9, 1, 1, Fraction(1, 8)) == 1


def test_an_ffn_unit_keeps_every_ffn_count_a_multiple_of_it():
    """--ffn-unit 32 on the SmolLM2 shape: centres, totals and steps in whole grains of 32; the
    default grain of 1 gives the spec's steps."""
    shape = Shape(576, 30, 9, 3, 64, 1536, False, False, False, False, False, ffn_unit=32)
    for sparsity in (0.25, 0.37, 0.5):
        centres = initial_centres(shape, sparsity)["mlp"]
        assert all(c % 32 == 0 for c in centres) and max(centres) - min(centres) <= 32
        assert abs(sum(centres) - sparsity * 1536 * 30) <= 16  # one rounding of the total
    assert initial_centres(shape, 0.5)["mlp"] == [768] * 30
    assert [steps(shape, t)["mlp"] for t in (1, 2, 3, 4)] == [192, 96, 64, 32]
    one = Shape(576, 30, 9, 3, 64, 1536, False, False, False, False, False)
    assert [steps(one, t)["mlp"] for t in (1, 2, 3, 4)] == [192, 96, 48, 24]
    assert initial_centres(one, 0.37) != initial_centres(shape, 0.37)


def test_level_ranges():
    assert level_range(16, 4, 32) == (-4, 4)  # 50 %: 9 levels from 0 % to 100 %
    assert level_range(8, 4, 32) == (-2, 4)  # 25 %: 7 levels
    assert level_range(4, 4, 32) == (-1, 4)  # 12.5 %: 6 levels
    assert level_range(0, 1, 9) == (0, 4) and level_range(9, 1, 9) == (-4, 0)


def test_mutation_preserves_the_budget_and_the_bounds():
    space = toy_space(half=2)
    rng = random.Random(0)
    g = space.zero
    for _ in range(500):
        child = mutate(g, space, rng)
        assert child is not None and space.valid(child)
        assert sum(abs(a - b) for a, b in zip(child, g, strict=True)) <= 8  # at most 4 shifts
        g = child


def test_offspring_are_distinct_and_differ_from_the_parent():
    space = toy_space(blocks=2, half=1)  # genes (attn0, mlp0, attn1, mlp1), levels ±1
    kids = offspring(space.zero, space, random.Random(1), 50)
    assert len(kids) == len(set(kids)) and space.zero not in kids
    # Each kind is (0, 0), (1, -1) or (-1, 1): 3 × 3 − 1 = 8 genomes, all found, then exhausted.
    every = {(a, b, -a, -b) for a in (-1, 0, 1) for b in (-1, 0, 1)} - {space.zero}
    assert set(kids) == every


def _toy_fitness(target):
    def fitness(stage, genomes):
        return [sum((a - b) ** 2 for a, b in zip(g, target, strict=True)) for g in genomes]

    return fitness


def test_evolution_finds_a_budget_preserving_optimum():
    space = toy_space()
    target = (2, -1, -2, 1, 0, 3, 1, -3, -1, 0, 0, 0)  # Σ attn = 0 and Σ mlp = 0
    assert space.valid(target)
    best, history = evolve(
        space, _toy_fitness(target), random.Random(0), generations=60, offspring_count=16, survivors=(4, 2, 1)
    )
    assert best == target
    fits = [h.parent_fitness for h in history]
    assert all(b <= a for a, b in zip(fits, fits[1:], strict=False))  # elitist: never worse
    assert history[0].evaluated == [16, 4, 3]  # stage 3 = survivors of stage 2 plus the parent


def test_same_seed_same_genome_and_guard_is_respected():
    guard = lambda g: abs(g[0]) <= 1  # noqa: E731 - a stand-in for the GQA real-parameter guard
    space = toy_space(guard=guard)
    target = (3, 0, -3, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    runs = [
        evolve(
            space, _toy_fitness(target), random.Random(7), generations=20, offspring_count=8, survivors=(3, 1)
        )[0]
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and abs(runs[0][0]) <= 1
    other = evolve(
        space, _toy_fitness(target), random.Random(8), generations=3, offspring_count=8, survivors=(3, 1)
    )
    assert space.valid(other[0])


def test_invalid_start_is_refused():
    space = toy_space()
    with pytest.raises(ValueError):
        evolve(
            space,
            _toy_fitness(space.zero),
            random.Random(0),
            generations=1,
            offspring_count=2,
            survivors=(1,),
            start=(1,) + (0,) * 11,
        )


def test_a_joint_budget_moves_levels_between_kinds_within_its_guard():
    """Attention levels weigh 3, FFN levels 2 (real parameters): under the joint budget a child
    may trade one for the other while the guard holds the total within 2 of the start."""
    genes = tuple(Gene(b, k) for b in range(4) for k in ("attn", "mlp"))
    weight = [3 if g.kind == "attn" else 2 for g in genes]

    def guard(genome):
        return abs(sum(w * k for w, k in zip(weight, genome, strict=True))) <= 2

    joint = Space(genes, (-2,) * 8, (2,) * 8, guard, joint=True)
    children = offspring(joint.zero, joint, random.Random(0), 40)
    assert children and all(joint.valid(c) and guard(c) for c in children)
    crossed = [c for c in children if sum(c[0::2]) != 0]
    assert crossed and all(sum(c) == 0 for c in children)  # one level moved per shift, kinds mixed
    per_kind = Space(genes, (-2,) * 8, (2,) * 8, guard)
    assert all(
        sum(c[0::2]) == 0 == sum(c[1::2]) for c in offspring(per_kind.zero, per_kind, random.Random(0), 40)
    )
    with pytest.raises(ValueError, match="guard"):
        Space(genes, (-2,) * 8, (2,) * 8, None, joint=True)
