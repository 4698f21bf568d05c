"""Infrastructure shared by every stage: atomic work files and locks, torch.distributed
helpers, the packaged assets, number formatting.
"""

from __future__ import annotations

from tyr.infra import assets, dist
from tyr.infra.assets import (
    ASSETS,
    Asset,
    extract,
    sha256_file,
    tyr_home,
    wheel,
)
from tyr.infra.host import available_memory_bytes, memory_budget_bytes
from tyr.infra.workdir import (
    atomic_json,
    atomic_write,
    atomic_writer,
    check_options,
    finish_out,
    fsync_tree,
    locked,
    pid_alive,
    prepare_out,
)

__all__ = [
    "available_memory_bytes",
    "memory_budget_bytes",
    "atomic_write",
    "atomic_writer",
    "atomic_json",
    "fsync_tree",
    "locked",
    "check_options",
    "pid_alive",
    "prepare_out",
    "finish_out",
    "Asset",
    "ASSETS",
    "tyr_home",
    "wheel",
    "extract",
    "sha256_file",
    "assets",
    "dist",
]
