"""Hook-driven accumulation of the Gram matrix H = XᵀX of a Linear's inputs (docs/algorithm.md §4.1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from tyr.stream.blocks import BlockInputs, StopForward

__all__ = ["Gram", "collect_gram", "intermediate_placement", "propagate_mlp"]


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


def intermediate_placement(offload: str, device: torch.device | str, streamed: bool = False) -> str:
    """Where the MLP's intermediate activations z (d_ff wide, 3–4× the hidden states) wait while
    down_proj is solved: beside the block activations (`cpu` or `disk`), or `recompute`: none
    kept, the block runs a second time instead. On a GPU with the activations on disk a block
    forward is far cheaper than writing and reading z; on a CPU the files are. `streamed` (the
    uniform prune of a model read block by block, short of memory) keeps them on disk at least.
    The values are the same in every case."""
    where = "disk" if streamed else offload
    return "recompute" if where == "disk" and torch.device(device).type == "cuda" else where


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

    For a residual MLP the output is h + z·W_downᵀ, so the outputs under the current weight plus
    z·ΔWᵀ are the new outputs (docs/algorithm.md §5.4): one forward instead of two. The z are
    kept where `z_offload` says (default :func:`intermediate_placement`), or, with `recompute`,
    the first pass stops at down_proj and a second full pass under the current weight gives the
    same outputs and z again, so that nothing d_ff wide is stored. Otherwise the block re-runs.
    """
    if z_offload is None:
        z_offload = intermediate_placement(inputs.hidden.offload, device)
    recompute = residual and z_offload == "recompute"
    z_store = inputs.hidden.sibling(z_offload) if residual and not recompute else None

    def seen(i: int) -> Tensor:
        got: list[Tensor] = []
        with _inputs_of(down, got.append, stop=recompute), contextlib.suppress(StopForward):
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
    for i in range(len(inputs)):
        if z_store is not None:
            inputs.hidden[i] = inputs.hidden[i].to(device) + z_store[i].to(device) @ delta.T
        elif recompute:
            got: list[Tensor] = []
            with _inputs_of(down, got.append):
                y = inputs.run(layer, i, device)
            inputs.hidden[i] = y + got[0] @ delta.T
    down.weight.copy_(new)
    if not residual:
        for i in range(len(inputs)):
            inputs.hidden[i] = inputs.run(layer, i, device)
    if z_store is not None:
        z_store.close()
