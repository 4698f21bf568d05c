"""Hook-driven accumulation of the Gram matrix H = XᵀX of a Linear's inputs (docs/algorithm.md §4.1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from tyr.stream.blocks import BlockInputs, StopForward

__all__ = ["Gram", "collect_gram", "propagate_mlp"]


class Gram:
    """Running H = Σ xᵀx over all tokens, accumulated from upcast inputs with TF32 off."""

    def __init__(
        self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> None:
        self.H = torch.zeros(dim, dim, dtype=dtype, device=device)

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            self.H.addmm_(x.T, x)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow


@contextlib.contextmanager
def _inputs_of(linear: nn.Linear, sink: Callable[[Tensor], None], *, stop: bool = False) -> Iterator[None]:
    """Pass every input of `linear` to `sink` while the context is open; stop=True ends each
    forward right after (raises :class:`StopForward`, which the caller catches)."""

    def hook(module: nn.Module, args: tuple) -> None:
        sink(args[0])
        if stop:
            raise StopForward()

    handle = linear.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def collect_gram(layer: nn.Module, linear: nn.Linear, inputs: BlockInputs, device: str = "cpu") -> Gram:
    """H of `linear`'s inputs over every chunk; each forward stops right after `linear` sees them."""

    def seen(i: int) -> Tensor:
        got: list[Tensor] = []
        with _inputs_of(linear, got.append, stop=True), contextlib.suppress(StopForward):
            inputs.run(layer, i, device)
        return got[0]

    gram = Gram(linear.in_features, device=device)
    for x in inputs.in_order(seen):  # chunk order, whichever rank ran the chunk
        gram.add(x)
    return gram


def propagate_mlp(
    layer: nn.Module,
    down: nn.Linear,
    inputs: BlockInputs,
    choose: Callable[[Tensor], Tensor],
    *,
    residual: bool,
    device: str = "cpu",
    z_offload: str | None = None,
) -> None:
    """Collect down_proj's H under the block's current weights, set down_proj to the weight that
    `choose(H)` returns, and leave the block's outputs under it in `inputs` (in place).

    For a residual MLP the output is h + z·W_downᵀ, so this pass's outputs plus z·ΔWᵀ are the
    new outputs (docs/algorithm.md §5.4): one forward instead of two. Otherwise the block re-runs.
    The z (d_ff wide) are kept where `z_offload` says, by default beside the activations.
    """
    z_store = inputs.hidden.sibling(z_offload) if residual else None

    def seen(i: int) -> Tensor:
        got: list[Tensor] = []
        with _inputs_of(down, got.append):
            y = inputs.run(layer, i, device)
        if z_store is not None:
            inputs.hidden[i] = y
            z_store.append(got[0])
        return got[0]

    gram = Gram(down.in_features, device=device)
    for z in inputs.in_order(seen):
        gram.add(z)
    new = choose(gram.H).to(down.weight)
    delta = new - down.weight
    down.weight.copy_(new)
    for i in range(len(inputs)):
        if z_store is not None:
            inputs.hidden[i] = inputs.hidden[i].to(device) + z_store[i].to(device) @ delta.T
        else:
            inputs.hidden[i] = inputs.run(layer, i, device)
    if z_store is not None:
        z_store.close()
