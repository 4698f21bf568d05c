"""Hook-driven accumulation of the Gram matrix H = XᵀX of a Linear's inputs (ALGORITHM.md §4.1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from tyr.stream import BlockInputs, StopForward, forward_block, to_device

__all__ = ["Gram", "gram_of", "collect_gram"]


class Gram:
    """Running H = Σ xᵀx over all tokens, accumulated from upcast inputs with TF32 off."""

    def __init__(
        self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        self.H = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            self.H.addmm_(x.T, x)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow
        self.tokens += x.shape[0]


@contextlib.contextmanager
def gram_of(
    linear: nn.Linear,
    gram: Gram,
    *,
    stop: bool = False,
    sink: Callable[[Tensor], None] | None = None,
) -> Iterator[Gram]:
    """Accumulate the inputs of `linear` into `gram` while the context is open.

    stop=True ends each forward right after the input is seen (raises :class:`StopForward`,
    which the caller catches); `sink` also receives every input chunk.
    """

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        gram.add(x)
        if sink is not None:
            sink(x)
        if stop:
            raise StopForward()

    handle = linear.register_forward_pre_hook(hook)
    try:
        yield gram
    finally:
        handle.remove()


def collect_gram(layer: nn.Module, linear: nn.Linear, inputs: BlockInputs, device: str = "cpu") -> Gram:
    """H of `linear`'s inputs over every chunk; each forward stops right after `linear` sees them."""
    gram = Gram(linear.in_features, device=device)
    with gram_of(linear, gram, stop=True):
        for i in range(len(inputs)):
            with contextlib.suppress(StopForward):
                forward_block(layer, inputs.hidden[i].to(device), to_device(inputs.kwargs[i], device))
    return gram
