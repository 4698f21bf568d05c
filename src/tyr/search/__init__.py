"""Global sparsity search: the level space and the (1+λ) evolution (ALGORITHM.md §5.1, §7).

Nothing here imports torch: the search is a seeded function of a space, a fitness callable
and a random generator.
"""
