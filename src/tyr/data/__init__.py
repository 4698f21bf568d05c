"""Text and tasks: calibration and held-out token windows, the zero-shot task data."""

from __future__ import annotations

from tyr.data import tasks
from tyr.data.tasks import (
    CHANCE,
    PAPER7,
    TASKS,
    Doc,
    Task,
    docs,
    resolve_tasks,
)
from tyr.data.text import (
    WIKI_MEMBER,
    load_text,
    token_batches,
    tokenize,
    unused_windows,
    wiki_text,
    window_picks,
    windows,
)

__all__ = [
    "WIKI_MEMBER",
    "wiki_text",
    "load_text",
    "tokenize",
    "token_batches",
    "window_picks",
    "unused_windows",
    "windows",
    "Doc",
    "Task",
    "TASKS",
    "PAPER7",
    "CHANCE",
    "resolve_tasks",
    "docs",
    "tasks",
]
