"""Global sparsity search: the level space, the (1+λ) evolution and the KL fitness.

The space and the evolution import no torch: the search is a seeded function of a space, a
fitness callable and a random generator.
"""

from __future__ import annotations

from tyr.search.evolution import (
    Generation,
    evolve,
    mutate,
    offspring,
)
from tyr.search.fitness import (
    KLFitness,
    LiveModel,
    OnTheFlyTeacher,
    Teacher,
    TeacherCache,
    head_logits,
    kl_positions,
    topk_kl,
)
from tyr.search.space import (
    Genome,
    Space,
)

__all__ = [
    "Space",
    "Genome",
    "mutate",
    "offspring",
    "Generation",
    "evolve",
    "kl_positions",
    "head_logits",
    "topk_kl",
    "TeacherCache",
    "OnTheFlyTeacher",
    "Teacher",
    "LiveModel",
    "KLFitness",
]
