"""Layer streaming: capture block-0 inputs with every argument, then run one block at a time.

The whole model never sits on the compute device: embeddings and rotary tables go there for
the capture, then each block in turn. Block inputs/outputs live in an :class:`ActivationStore`
on the host or on disk (docs/algorithm.md §11.1, docs/architecture.md §3.3).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tyr import arch
from tyr.arch import ArchSpec
from tyr.compat import layer_output
from tyr.infra import dist
from tyr.stream import lazy as lazy_mod

__all__ = [
    "ActivationStore",
    "BlockInputs",
    "capture",
    "forward_block",
    "run_blocks",
    "final_hidden",
    "Prefix",
    "StopForward",
    "to_device",
    "on_device",
]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed was seen."""

    def __init__(self, args: tuple = (), kwargs: dict | None = None) -> None:
        super().__init__("forward stopped by hook")
        self.args_seen = args
        self.kwargs_seen = kwargs or {}


class ActivationStore:
    """A list of hidden-state chunks kept in host memory or in files (`offload="disk"`)."""

    def __init__(self, offload: str = "cpu", root: Path | None = None) -> None:
        if offload not in ("cpu", "disk"):
            raise ValueError(f"offload must be 'cpu' or 'disk', not {offload!r}")
        self.offload = offload
        self.root = root
        self._items: list[Any] = []
        self._dir: Path | None = None
        if offload == "disk":
            self._dir = Path(tempfile.mkdtemp(prefix="tyr-act-", dir=root))

    def sibling(self, offload: str | None = None) -> ActivationStore:
        """A new, empty store with the same placement (or `offload`, in the same root)."""
        return ActivationStore(offload or self.offload, self.root)

    def __len__(self) -> int:
        return len(self._items)

    def _put(self, i: int, x: Tensor) -> Any:
        x = x.detach().to("cpu")
        if self._dir is None:
            return x
        path = self._dir / f"{i:06d}.pt"
        torch.save(x.contiguous(), path)
        return path

    def append(self, x: Tensor) -> None:
        self._items.append(self._put(len(self._items), x))

    def __setitem__(self, i: int, x: Tensor) -> None:
        self._items[i] = self._put(i, x)

    def __getitem__(self, i: int) -> Tensor:
        item = self._items[i]
        return torch.load(item, weights_only=True) if isinstance(item, Path) else item

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class BlockInputs:
    """Hidden states entering the current block plus the decoder-layer kwargs of each chunk.

    Families with several attention types (sliding-window and global layers) give their blocks
    different masks and rotary tables; `kwargs[i]` is the first block's, and
    :meth:`kwargs_for` returns any block's.

    A divided set (`total` chunks over the processes of a torchrun) holds this rank's chunks
    only, dealt round robin as :func:`tyr.infra.dist.mine` deals them: each rank runs its own
    chunks through a block, and :meth:`in_order` brings what the statistics need from every
    chunk, in the order of one process. `forwards` counts the block forwards run here."""

    def __init__(
        self,
        hidden: ActivationStore,
        kwargs: list[dict[str, Any]],
        by_type: list[dict[str, dict[str, Any]]] | None = None,
        layer_type: dict[int, str] | None = None,
        total: int | None = None,
    ) -> None:
        self.hidden = hidden
        self.kwargs = kwargs
        self._by_type = by_type
        self._layer_type = layer_type or {}
        self.total = len(kwargs) if total is None else total
        self.divided = total is not None
        self.forwards = 0

    def __len__(self) -> int:
        return len(self.kwargs)

    def run(self, layer: nn.Module, i: int, device: torch.device | str = "cpu") -> Tensor:
        """`layer`'s output for this rank's chunk i (the stored inputs are left as they are)."""
        self.forwards += 1
        return forward_block(layer, self.hidden[i].to(device), to_device(self.kwargs_for(layer, i), device))

    def in_order(self, compute: Callable[[int], Tensor]) -> Iterator[Tensor]:
        """`compute(i)` of every chunk, in chunk order; a divided set computes its own chunks
        and receives the others' (every rank must consume it all)."""
        if not self.divided:
            return (compute(i) for i in range(len(self)))
        return dist.each_in_order(self.total, compute)

    def kwargs_for(self, layer: nn.Module, i: int) -> dict[str, Any]:
        """The kwargs that `layer` (a block of the captured model) receives for chunk i."""
        kind = self._layer_type.get(id(layer))
        if kind is None or self._by_type is None:
            return self.kwargs[i]
        return self._by_type[i][kind]

    def close(self) -> None:
        self.hidden.close()


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _base_model(model: nn.Module, spec: ArchSpec) -> nn.Module:
    return arch.get_module(model, spec.layers.rpartition(".")[0])


def layer_types(model: nn.Module) -> list[str] | None:
    """Each block's attention type (e.g. sliding or full) when the family mixes them."""
    types = getattr(model.config, "layer_types", None)
    return list(types) if types and len(set(types)) > 1 else None


def _clean(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    for key in ("cache", "past_key_values", "past_key_value"):
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    return to_device(kwargs, "cpu")


@torch.inference_mode()
def capture(
    model: nn.Module,
    spec: ArchSpec,
    batches: Sequence[Tensor],
    device: torch.device | str = "cpu",
    offload: str = "cpu",
    offload_root: Path | None = None,
    lazy: lazy_mod.LazyModel | None = None,
    divide: bool = False,
) -> BlockInputs:
    """Run the embedding stage for each token batch [b, T] and keep block 0's inputs and kwargs
    (and, for families mixing attention types, the kwargs of the first block of each type).
    `lazy`: the state of `model` when its blocks are read from disk (:mod:`tyr.stream.lazy`).
    `divide`: under torchrun, keep this rank's share of the batches only (a divided set)."""
    total = len(batches) if divide and dist.world() > 1 else None
    if total is not None:
        batches = [batches[i] for i in dist.mine(total)]
    base = _base_model(model, spec)
    blocks = arch.layers(model, spec)
    types = layer_types(model)
    # The first block of each attention type; the forward stops at the last of them.
    firsts = {0: "only"} if types is None else {types.index(t): t for t in dict.fromkeys(types)}
    stop_at = max(firsts)
    front = [arch.get_module(model, spec.embed), arch.get_module(model, spec.rotary)]
    homes = [_home(m) for m in front]
    for m in front:
        m.to(device)
    held = contextlib.ExitStack()
    for b in range(stop_at):
        held.enter_context(on_device(blocks[b], device, lazy))

    seen: dict[str, dict[str, Any]] = {}
    first_hidden: list[Tensor] = []

    def hook_for(b: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if b == 0:
                first_hidden.append(hidden)
            seen[firsts[b]] = _clean(kwargs)
            if b == stop_at:
                raise StopForward()

        return hook

    store = ActivationStore(offload, offload_root)
    all_kwargs: list[dict[str, Any]] = []
    by_type: list[dict[str, dict[str, Any]]] = []
    handles = [blocks[b].register_forward_pre_hook(hook_for(b), with_kwargs=True) for b in firsts]
    try:
        for ids in batches:
            seen.clear()
            first_hidden.clear()
            try:
                base(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                store.append(first_hidden[0])
                all_kwargs.append(seen[firsts[0]])
                by_type.append(dict(seen))
            else:
                raise RuntimeError("block 0 was never reached while capturing its inputs")
    finally:
        for handle in handles:
            handle.remove()
        held.close()
        for m, home in zip(front, homes, strict=True):
            if home is not None:
                m.to(home)
        if lazy is not None:
            lazy.drop_pages()  # the embedding rows the lookups brought in
    if types is None:
        return BlockInputs(store, all_kwargs, total=total)
    layer_type = {id(blk): t for blk, t in zip(blocks, types, strict=True)}
    return BlockInputs(store, all_kwargs, by_type, layer_type, total=total)


def forward_block(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """One decoder layer's output hidden states."""
    return layer_output(layer(hidden, **kwargs))


def _home(module: nn.Module) -> torch.device | None:
    """Where a module's tensors are (None when it has none)."""
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if t is None else t.device


@contextlib.contextmanager
def on_device(
    module: nn.Module, device: torch.device | str, lazy: lazy_mod.LazyModel | None = None
) -> Iterator[nn.Module]:
    """Hold one block on the compute device for the duration of the block's work, then put it
    back where it was (a block of a lazy model is read from disk first and dropped afterwards,
    see :mod:`tyr.stream.lazy`)."""
    with lazy_mod.resident(module, lazy):
        home, dev = _home(module), torch.device(device)
        if home is None or (home.type == dev.type and dev.index in (None, home.index)):
            yield module
            return
        module.to(device)
        try:
            yield module
        finally:
            module.to(home)


def run_blocks(
    model: nn.Module,
    spec: ArchSpec,
    inputs: BlockInputs,
    device: torch.device | str = "cpu",
    on_block: Callable[[int], None] | None = None,
    lazy: lazy_mod.LazyModel | None = None,
) -> BlockInputs:
    """Propagate the stored inputs through every block, in place; returns the final hidden states."""
    with torch.inference_mode():
        for b, layer in enumerate(arch.layers(model, spec)):
            with on_device(layer, device, lazy):
                for i in range(len(inputs)):
                    inputs.hidden[i] = inputs.run(layer, i, device)
            if on_block is not None:
                on_block(b)
    return inputs


class Prefix:
    """One token batch's hidden states at block `depth`, its blocks visiting `device` one at a
    time: :meth:`final` moves them forward to a block and runs the rest of the model from there
    on a branch, so that models sharing their first blocks share that work (the search's
    parent-activation reuse, docs/algorithm.md §7.8)."""

    def __init__(
        self,
        model: nn.Module,
        spec: ArchSpec,
        ids: Tensor,
        device: torch.device | str,
        lazy: lazy_mod.LazyModel | None = None,
    ) -> None:
        self.spec, self.device, self.lazy = spec, device, lazy
        inputs = capture(model, spec, [ids], device, lazy=lazy)
        try:
            self.hidden, self.depth = inputs.hidden[0].to(device), 0
            # Each block's kwargs (one per attention type), on the device once.
            moved: dict[int, dict[str, Any]] = {}
            self._kwargs = []
            for layer in arch.layers(model, spec):
                kw = inputs.kwargs_for(layer, 0)
                if id(kw) not in moved:
                    moved[id(kw)] = to_device(kw, device)
                self._kwargs.append(moved[id(kw)])
        finally:
            inputs.close()

    def _run(self, model: nn.Module, hidden: Tensor, blocks: range) -> Tensor:
        layers = arch.layers(model, self.spec)
        for b in blocks:
            with on_device(layers[b], self.device, self.lazy):
                hidden = forward_block(layers[b], hidden, self._kwargs[b])
        return hidden

    def final(self, model: nn.Module, branch: int | None = None) -> Tensor:
        """The final norm's output of `model`, on the device. Blocks before `branch` (≥ depth;
        default: all of them) must be those that computed the kept states: the states advance
        to `branch`, and the rest of the blocks run on a branch of them."""
        n_blocks = len(arch.layers(model, self.spec))
        branch = n_blocks if branch is None else branch
        self.hidden = self._run(model, self.hidden, range(self.depth, branch))
        self.depth = branch
        hidden = self._run(model, self.hidden, range(branch, n_blocks))
        norm = arch.get_module(model, self.spec.final_norm)
        with on_device(norm, self.device):
            return norm(hidden)


def final_hidden(
    model: nn.Module,
    spec: ArchSpec,
    ids: Tensor,
    device: torch.device | str = "cpu",
    lazy: lazy_mod.LazyModel | None = None,
) -> Tensor:
    """The final norm's output on one batch of `ids`, the blocks visiting `device` one at a time
    (the model stays where it is); returned where `ids` are."""
    return Prefix(model, spec, ids, device, lazy).final(model).to(ids.device)
