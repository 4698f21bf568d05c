"""Export: a pruned model as a from_pretrained-loadable checkpoint that proves itself."""

from __future__ import annotations

from tyr.export.checkpoint import (
    FORMAT,
    MODELING,
    export_config,
    modeling_sha256,
    save_pruned,
    verify_export,
    write_card,
)
from tyr.export.gguf import QUANTS, GGUFSummary, gguf_refusal, write_gguf

__all__ = [
    "QUANTS",
    "GGUFSummary",
    "write_gguf",
    "gguf_refusal",
    "FORMAT",
    "MODELING",
    "modeling_sha256",
    "export_config",
    "save_pruned",
    "write_card",
    "verify_export",
]
