"""tyr: structural pruning of decoder-only LLMs with a global layer-wise sparsity search."""

from __future__ import annotations

__version__ = "0.1.0"

from tyr.api import Result, prune  # noqa: E402
from tyr.errors import UserError  # noqa: E402
from tyr.eval import evaluate  # noqa: E402
from tyr.heal import heal  # noqa: E402
from tyr.loader import load  # noqa: E402

__all__ = ["__version__", "Result", "UserError", "evaluate", "heal", "load", "prune"]
