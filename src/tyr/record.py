"""`DIR/result.json`, schema ``tyr.result/1``: the record of a finished run; and
`DIR/gguf.json` (``tyr.gguf/1``): the GGUF files exported from it and what llama.cpp measured.

Typed here, written by :func:`write` alone and read by :func:`read` alone (the report, the
finished-output check of `tyr prune` and `--genome` read it through this module). The keys are
the user-facing contract of the README; new keys may be added, none renamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from tyr.budget import Shape
from tyr.errors import UserError
from tyr.infra import atomic_json

__all__ = [
    "Result",
    "SCHEMA",
    "FILE",
    "Record",
    "Layer",
    "Iteration",
    "layer_rows",
    "write",
    "read",
    "read_if_finished",
    "GGUF_FILE",
    "read_gguf",
    "add_gguf",
]

SCHEMA = "tyr.result/1"
FILE = "result.json"
GGUF_FILE = "gguf.json"
GGUF_SCHEMA = "tyr.gguf/1"


@dataclass
class Result:
    """A finished run (`tyr prune` or `tyr heal`): where it was written and its result.json."""

    path: Path
    data: dict[str, Any]

    @property
    def sparsity_achieved(self) -> float:
        return float(self.data["sparsity_achieved"])

    @property
    def ppl(self) -> dict[str, Any] | None:
        return self.data.get("ppl")


class Params(TypedDict):
    dense_block: int
    pruned_block: int
    dense_total: int
    pruned_total: int


class Layer(TypedDict):
    index: int
    q_heads: int
    kv_heads: int
    q_to_kv: list[int]
    intermediate: int
    attn_sparsity: float  # fraction of the sub-layer's real parameters removed
    mlp_sparsity: float


class Ppl(TypedDict, total=False):
    source: str
    tokens: int
    seq_len: int
    dense: float
    pruned: float


class Iteration(TypedDict):
    step_attn: int  # attention units of 2·d·d_h (a query head; a KV head emptied)
    step_mlp: int  # neurons
    centres: list[int]  # units removed per gene, genes interleaved (attn, mlp) per block
    genome: list[int]  # the best level per gene
    parent_fitness: list[float]  # one per generation
    seconds: float
    supernet_seconds: float
    search_seconds: float
    tokens_scored: int | None  # student tokens over all fitness calls (None after a resume)
    block_forwards: list[int]  # calibration chunks run through a block in the supernet build, per rank
    teacher_sequences: NotRequired[list[int]]  # sequences the dense teacher ran in the search, per rank


class Search(TypedDict):
    iterations: list[Iteration]


class Machine(TypedDict):
    cpus: int
    device: str
    processes: int


class Record(TypedDict, total=False):
    schema: str
    tyr_version: str
    model: str
    method: str
    sparsity_target: float
    sparsity_achieved: float  # real block parameters, counted on the exported tensors
    params: Params
    layers: list[Layer]
    ppl: Ppl | None
    search: Search  # method tyr only
    timings: dict[str, float]
    config: dict[str, Any]
    config_identity: str
    command: str
    modeling_sha256: str
    seed: int
    machine: Machine
    heal: dict[str, Any]  # tyr heal only: what the distillation did (docs/healing.md §4)


def layer_rows(meta: list[dict[str, Any]], shape: Shape) -> list[Layer]:
    """The per-layer rows of a record from the plans' export metadata."""
    dense_a, dense_f = shape.attn_params(shape.n_q, shape.n_kv), shape.mlp_params(shape.intermediate)
    rows: list[Layer] = []
    for i, m in enumerate(meta):
        kept_a = shape.attn_params(len(m["kept_q"]), len(m["kept_kv"]))
        rows.append(
            {
                "index": i,
                "q_heads": len(m["kept_q"]),
                "kv_heads": len(m["kept_kv"]),
                "q_to_kv": m["q_to_kv"],
                "intermediate": m["intermediate"],
                "attn_sparsity": round(1 - kept_a / dense_a, 6),
                "mlp_sparsity": round(1 - shape.mlp_params(m["intermediate"]) / dense_f, 6),
            }
        )
    return rows


def write(out_dir: Path, record: Record) -> None:
    atomic_json(out_dir / FILE, record, indent=2)


def read(out_dir: Path) -> Record:
    """The record in `out_dir`; a missing or foreign file is the user's error."""
    path = out_dir / FILE
    if not path.is_file():
        raise UserError(f"{out_dir} has no {FILE}", "point at the --out of a finished tyr prune")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON", "rerun tyr prune into a fresh directory") from exc
    if not is_record(data):
        raise UserError(f"{path} is not a {SCHEMA} file", "point at the --out of a finished tyr prune")
    return data


def is_record(data: Any) -> bool:
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def read_if_finished(out_dir: Path, identity: str) -> Record | None:
    """The record in `out_dir` when it is the finished result of the configuration whose
    identity is `identity`; None when absent, unreadable or of another configuration."""
    path = out_dir / FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None  # unreadable: not a finished result of anything
    if isinstance(data, dict) and data.get("config_identity") == identity:
        return data  # type: ignore[return-value]
    return None


def read_gguf(out_dir: Path) -> dict[str, Any]:
    """`DIR/gguf.json`: {"exports": {file name: summary}, "llama_cpp": benchmark or absent};
    empty when there is none or it is unreadable."""
    path = out_dir / GGUF_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) and data.get("schema") == GGUF_SCHEMA else {}


def add_gguf(
    out_dir: Path, *, export: dict[str, Any] | None = None, llama_cpp: dict[str, Any] | None = None
) -> None:
    """Record one exported GGUF file (keyed by its name) or a llama.cpp measurement."""
    data = {"schema": GGUF_SCHEMA, "exports": {}, **read_gguf(out_dir)}
    if export is not None:
        data["exports"][Path(export["path"]).name] = export
    if llama_cpp is not None:
        data["llama_cpp"] = llama_cpp
    atomic_json(out_dir / GGUF_FILE, data, indent=2)
