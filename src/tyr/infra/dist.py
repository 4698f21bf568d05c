"""Several processes on one run, through torch.distributed (launched by ``torchrun``).

Every rank loads the model and the calibration data and walks the same program; work that is
independent is split by index (:func:`mine`) and the results are gathered back in index order
(:func:`gather`, :func:`each_in_order`), so each value is computed exactly as one process would
compute it and the result does not depend on the number of processes (given the same threads
per process). Rank 0 alone writes files. With one process (no ``torchrun``) every function is a
no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as td

__all__ = [
    "setup",
    "rank",
    "world",
    "is_main",
    "mine",
    "gather",
    "map_ordered",
    "each_in_order",
    "share",
    "barrier",
    "teardown",
]

T = TypeVar("T")


def setup(device: str = "cpu") -> None:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPUs,
    NCCL on GPUs); nothing when launched as a single process."""
    if td.is_available() and not td.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend)
        if td.get_rank() > 0:  # rank 0 reports progress and notices for everyone
            os.environ["TQDM_DISABLE"] = "1"
            logging.getLogger("tyr").setLevel(logging.WARNING)


def teardown() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def _active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if _active() else 0


def world() -> int:
    return td.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def mine(n: int) -> range:
    """The indices of n independent tasks that this rank computes (round robin)."""
    return range(rank(), n, world())


def gather(local: dict[int, T], n: int) -> list[T]:
    """Every rank's {index: value} merged into one list of n values, in index order."""
    if not _active():
        return [local[i] for i in range(n)]
    parts: list[Any] = [None] * world()
    td.all_gather_object(parts, local)  # values: picklable, tensors on the CPU
    merged: dict[int, T] = {}
    for part in parts:
        merged.update(part)
    return [merged[i] for i in range(n)]


def map_ordered(fn: Any, items: Sequence[Any]) -> list[Any]:
    """[fn(x) for x in items], each item computed on one rank, the list the same on all."""
    return gather({i: fn(items[i]) for i in mine(len(items))}, len(items))


def each_in_order(n: int, compute: Callable[[int], torch.Tensor]) -> Iterator[torch.Tensor]:
    """The tensors of n tasks dealt round robin (task i is rank i mod world's (i // world)-th),
    on every rank in index order: this rank computes its own, `compute(local index)`, and each
    other arrives from its rank. A round of `world` tasks is held at a time. Every rank must
    consume the whole iterator (each step is a collective)."""
    if not _active():
        yield from (compute(i) for i in range(n))
        return
    w, r = world(), rank()
    for start in range(0, n, w):
        own = compute(start // w).contiguous() if start + r < n else None
        for i in range(start, min(start + w, n)):
            src = i % w
            meta: list[Any] = [None]
            if src == r:
                assert own is not None
                meta = [(tuple(own.shape), own.dtype, own.device.type)]
            td.broadcast_object_list(meta, src=src)
            shape, dtype, kind = meta[0]
            buf = own if own is not None and src == r else torch.empty(shape, dtype=dtype, device=kind)
            td.broadcast(buf, src=src)
            yield buf


def share(value: T | None = None) -> T | None:
    """Rank 0's `value`, on every rank (the others pass nothing)."""
    if not _active():
        return value
    return gather({0: value} if is_main() else {}, 1)[0]


def barrier() -> None:
    if _active():
        td.barrier()
