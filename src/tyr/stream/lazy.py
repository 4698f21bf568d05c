"""Weights read from disk one block at a time, so that host memory holds one block, not the model.

:func:`load` returns a :class:`LazyModel`: the stock model built on the meta device
(:attr:`LazyModel.module`) and the state that says where its tensors are, held by that object
and by nothing else:
- each decoder block's tensors are read from the checkpoint (safetensors) when the block is
  used (:meth:`LazyModel.resident`, :meth:`LazyModel.editing`) and dropped afterwards; a block
  that was changed is written to a spill file first, which becomes its source;
- the input embedding (and an untied LM head) is a memory map of an fp32 file, so a lookup
  brings in only the rows of the tokens it sees (:meth:`LazyModel.drop_pages` lets them go);
- the final norm and the computed buffers (rotary tables, embedding scales) are in memory.

The streaming, export and fingerprinting code takes the object as an optional `lazy` argument
(None: a model in memory); :meth:`LazyModel.save` writes the model tensor by tensor.
Checkpoints whose names differ from the modules (Phi-3's fused projections) or whose blocks
carry computed buffers load whole instead (:func:`load` returns None).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tyr import arch

__all__ = ["Checkpoint", "LazyModel", "load", "resident", "editing"]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_CHUNK = 64 << 20  # bytes per read when a tensor is copied in pieces


@dataclass(frozen=True)
class Entry:
    path: Path
    start: int  # absolute byte offset in the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and the offset where its data begins."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an indexed set of shards), read on
    demand with plain file reads: nothing is mapped, so nothing lingers in memory."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, Entry] = {}
        self._maps: list[mmap.mmap] = []
        for path in files:
            header, base = _header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, _ = info["data_offsets"]
                self.entries[name] = Entry(path, base + start, _DTYPES[info["dtype"]], tuple(info["shape"]))

    @classmethod
    def find(cls, folder: Path) -> Checkpoint | None:
        """The checkpoint in `folder`, or None when it holds no safetensors weights."""
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([folder / s for s in shards])
        single = folder / "model.safetensors"
        return cls([single]) if single.is_file() else None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[Tensor]:
        """The tensor flattened, in pieces of about 64 MiB, converted to `dtype`."""
        e = self.entries[name]
        step = max(1, _CHUNK // _itemsize(e.dtype))
        total = math.prod(e.shape)
        with e.path.open("rb") as f:
            f.seek(e.start)
            for lo in range(0, total, step):
                n = min(step, total - lo)
                buf = bytearray(n * _itemsize(e.dtype))
                f.readinto(buf)
                yield torch.frombuffer(buf, dtype=e.dtype).to(dtype)

    def read(self, name: str, dtype: torch.dtype) -> Tensor:
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=dtype)
        flat, lo = out.view(-1), 0
        for piece in self.chunks(name, dtype):
            flat[lo : lo + piece.numel()] = piece
            lo += piece.numel()
        return out

    def sample(self, name: str, count: int = 64) -> Tensor:
        """flat[::step][:count] as fp32, step = max(1, numel // count), read element by element
        (what :func:`tyr.loader.fingerprint` samples from a loaded tensor)."""
        e = self.entries[name]
        total, size = math.prod(e.shape), _itemsize(e.dtype)
        step = max(1, total // count)
        values = []
        with e.path.open("rb") as f:
            for i in range(0, total, step)[:count]:
                f.seek(e.start + i * size)
                values.append(torch.frombuffer(bytearray(f.read(size)), dtype=e.dtype))
        return torch.cat(values).float() if values else torch.zeros(0)

    def mapped(self, name: str, dtype: torch.dtype, cache: Path) -> Tensor:
        """The tensor as a private memory map in `dtype`: pages are read when touched (and
        dropped again by :meth:`drop_pages`). A tensor stored in another dtype is converted
        once into `cache` (plain writes)."""
        e = self.entries[name]
        if e.dtype == dtype:
            path, offset = e.path, e.start
        else:
            path, offset = cache, 0
            if not cache.is_file() or cache.stat().st_size != math.prod(e.shape) * _itemsize(dtype):
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + ".tmp")
                with tmp.open("wb") as f:
                    for piece in self.chunks(name, dtype):
                        f.write(_raw(piece))
                tmp.replace(cache)
        nbytes = math.prod(e.shape) * _itemsize(dtype)
        with path.open("rb") as f:
            mm = mmap.mmap(
                f.fileno(), offset + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        self._maps.append(mm)
        return torch.frombuffer(mm, dtype=torch.uint8, offset=offset, count=nbytes).view(dtype).view(e.shape)

    def drop_pages(self) -> None:
        """Let go of the mapped pages read so far (an embedding lookup touches the rows of its
        tokens and, through the kernel's fault-around, their neighbours): they are re-read from
        the file if needed again."""
        for mm in self._maps:
            mm.madvise(mmap.MADV_DONTNEED)


@dataclass
class Source:
    """Where a block's tensors are: `prefix` + its state-dict names in `checkpoint`."""

    checkpoint: Checkpoint
    prefix: str
    spill: Path  # where the block goes once changed
    dtype: torch.dtype
    users: int = 0


class LazyModel:
    """A model whose decoder blocks stay on disk until used: `module` (built on the meta
    device, except the embedding, the final norm and the computed buffers), the checkpoint it
    reads and, per block, where that block's tensors are now."""

    def __init__(self, module: nn.Module, checkpoint: Checkpoint, sources: list[Source]) -> None:
        self.module = module
        self.checkpoint = checkpoint
        self.sources = sources  # one per decoder block, in order
        blocks = arch.layers(module)
        self._by_block = {id(layer): src for layer, src in zip(blocks, sources, strict=True)}

    def source(self, module: nn.Module) -> Source | None:
        """The source of a decoder block of this model; None for any other module."""
        return self._by_block.get(id(module))

    @contextlib.contextmanager
    def resident(self, module: nn.Module) -> Iterator[nn.Module]:
        """A block's tensors in memory for the duration (read from disk, dropped on exit unless
        an outer context still uses them). A no-op for any module but a decoder block."""
        src = self.source(module)
        if src is None:
            yield module
            return
        if src.users == 0:
            _materialize(module, src)
        src.users += 1
        try:
            yield module
        finally:
            src.users -= 1
            if src.users == 0:
                module.to("meta")
                _trim()

    @contextlib.contextmanager
    def editing(self, layer: nn.Module) -> Iterator[nn.Module]:
        """Like :meth:`resident`, for code that changes the block: on a normal exit its new
        tensors are written to the block's spill file, which becomes its source."""
        src = self.source(layer)
        with self.resident(layer):
            yield layer
            if src is not None:
                src.spill.parent.mkdir(parents=True, exist_ok=True)
                tmp = src.spill.with_name(src.spill.name + ".tmp")
                _write_shard(tmp, [(k, v, None) for k, v in layer.state_dict().items()])
                tmp.replace(src.spill)
                src.checkpoint, src.prefix = Checkpoint([src.spill]), ""

    def drop_pages(self) -> None:
        """:meth:`Checkpoint.drop_pages` of the mapped tensors, and the freed heap trimmed."""
        self.checkpoint.drop_pages()
        _trim()

    def sample(self, name: str, t: Tensor, count: int = 64) -> Tensor:
        """:meth:`Checkpoint.sample` of the tensor `name` (a tied alias reads its twin)."""
        if name not in self.checkpoint:
            state = self.module.state_dict(keep_vars=True)
            name = next(n for n, v in state.items() if v is t and n in self.checkpoint)
        return self.checkpoint.sample(name, count)

    def save(self, dest: Path, max_shard_bytes: int = 5 << 30) -> None:
        """Write the model's tensors as safetensors in `dest` (sharded above `max_shard_bytes`,
        with an index, as ``save_pretrained`` does), one tensor in memory at a time. A tensor
        tied to an earlier one is stored once, under the earlier name."""
        _save(self, dest, max_shard_bytes)


def resident(module: nn.Module, lazy: LazyModel | None) -> contextlib.AbstractContextManager[nn.Module]:
    """:meth:`LazyModel.resident` of `lazy`; for a model in memory (None), a no-op."""
    return lazy.resident(module) if lazy is not None else contextlib.nullcontext(module)


def editing(layer: nn.Module, lazy: LazyModel | None) -> contextlib.AbstractContextManager[nn.Module]:
    """:meth:`LazyModel.editing` of `lazy`; for a model in memory (None), a no-op."""
    return lazy.editing(layer) if lazy is not None else contextlib.nullcontext(layer)


def load(
    where: Path, config: Any, cls: Any, dtype: torch.dtype, spill: Path, **kwargs: Any
) -> LazyModel | None:
    """`cls` (a model class or ``AutoModelForCausalLM``) for `config` as a lazy model over the
    checkpoint in `where`, spilling changed blocks under `spill`; None when that is not possible
    (no safetensors, names that differ from the modules, unknown computed buffers)."""
    ckpt = Checkpoint.find(where)
    if ckpt is None:
        return None
    _mmap_large_allocations()
    spec = arch.spec_for_config(config)
    with torch.device("meta"):
        make = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # Auto or a class
        model = make(config, dtype=dtype, **kwargs)
    model.eval()
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for name, t in state.items():
        first.setdefault(id(t), name)
        if first[id(t)] == name and name not in ckpt:
            return None
    blocks = arch.layers(model, spec)
    in_blocks = {f"{spec.layers}.{i}." for i in range(len(blocks))}
    # Computed buffers (rotary tables, embedding scales) get the values transformers' own
    # initialisation gives them; a block may have none, as blocks are read from disk only.
    for owner, module in model.named_modules():
        computed = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not computed:
            continue
        if any(f"{owner}.".startswith(p) for p in in_blocks):
            return None
        for n in computed:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        model._init_weights(module)
    for name, t in state.items():
        if first[id(t)] != name or any(name.startswith(p) for p in in_blocks):
            continue
        owner, _, attr = name.rpartition(".")
        module = arch.get_module(model, owner)
        if t.dim() == 2 and t.is_floating_point():  # embedding / LM head: mapped, read by rows
            value = ckpt.mapped(name, dtype, spill / "weights" / f"{name}.bin")
        else:
            value = ckpt.read(name, dtype if t.is_floating_point() else t.dtype)
        if isinstance(getattr(module, attr), nn.Parameter):
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
        else:
            setattr(module, attr, value)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    sources = [
        Source(ckpt, f"{spec.layers}.{i}.", spill / "blocks" / f"blk{i:04d}.safetensors", dtype)
        for i in range(len(blocks))
    ]
    _trim()  # the pieces read while converting the embedding
    return LazyModel(model, ckpt, sources)


@functools.cache
def _libc(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None


@functools.cache
def _mmap_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more with its own mapping, returned on free. glibc
    otherwise raises that threshold as large blocks are freed (up to 32 MiB) and serves tensors
    below it from a heap that fragments, so a block-by-block run's peak memory creeps up block
    after block (measured: +15 % over 10 blocks). Process-wide, set once, by the lazy mode."""
    mallopt = _libc("mallopt")
    if mallopt is not None:
        mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _trim() -> None:
    """Hand the freed heap back to the system. glibc serves allocations below its (adaptive, up
    to 32 MiB) mmap threshold from the heap, so a block's worth of freed tensors would otherwise
    stay resident, and every block read would add to the process's memory."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


def _materialize(layer: nn.Module, src: Source) -> None:
    state = {name: src.checkpoint.read(src.prefix + name, src.dtype) for name in layer.state_dict()}
    layer.load_state_dict(state, assign=True, strict=True)
    for p in layer.parameters():
        p.requires_grad_(False)


def _save(lazy: LazyModel, dest: Path, max_shard_bytes: int) -> None:
    model, ckpt = lazy.module, lazy.checkpoint
    spec = arch.spec_for(model)
    owners = [(f"{spec.layers}.{i}.", src) for i, src in enumerate(lazy.sources)]
    seen: set[int] = set()
    items: list[tuple[str, Tensor, Any]] = []  # (name, meta or real tensor, (checkpoint, key) or None)
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        block = next(((p, src) for p, src in owners if name.startswith(p)), None)
        if block is not None:
            p, src = block
            items.append((name, t, (src.checkpoint, src.prefix + name[len(p) :])))
        elif t.is_meta or (name in ckpt and t.dim() == 2):  # mapped tensors: read, not touched
            items.append((name, t, (ckpt, name)))
        else:
            items.append((name, t, None))
    shards: list[list[tuple[str, Tensor, Any]]] = [[]]
    size = 0
    for item in items:
        n = item[1].numel() * item[1].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for fname, shard in zip(names, shards, strict=True):
        _write_shard(dest / fname, shard)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for _, t, _ in items)},
            "weight_map": {n: f for f, shard in zip(names, shards, strict=True) for n, _, _ in shard},
        }
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_shard(path: Path, items: list[tuple[str, Tensor, Any]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t, _ in items:
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t, how in items:
            if how is None:
                f.write(_raw(t.detach()))
                continue
            source, key = how
            for piece in source.chunks(key, t.dtype):
                f.write(_raw(piece))


def _raw(t: Tensor) -> Any:
    """The bytes of a tensor, as a buffer (any dtype, bfloat16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()
