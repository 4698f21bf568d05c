"""What the host machine offers a run: the memory available to it now."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory_bytes", "memory_budget_bytes"]


def available_memory_bytes() -> int:
    """Memory a new allocation can take without swapping: Linux's MemAvailable (free memory
    plus the page cache it can drop), else the free physical pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget_bytes(gigabytes: float | None) -> int:
    """The host memory activations may take before they go to disk (`--memory-budget`): the
    gigabytes given, else half of the memory available now."""
    return int(gigabytes * 1e9) if gigabytes else available_memory_bytes() // 2
