"""Load a checkpoint tyr exported (``tyr.load``), or a dense one, from a local directory.

A pruned checkpoint ships ``modeling_tyr.py``; tyr loads it with its own copy of that file
(:mod:`tyr.modeling.modeling_tyr`), never the directory's, so no code from the checkpoint runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyr import arch
from tyr.errors import UserError
from tyr.modeling import modeling_tyr
from tyr.stream import LazyModel
from tyr.stream import lazy as lazy_weights

__all__ = ["load", "load_pruned_lazy"]


def _read_config(path: Path) -> Any:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json", "point at the --out of a finished tyr prune")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}", "re-export it"
        ) from exc


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model exported by tyr (``tyr.load``), or a dense checkpoint, in eval mode."""
    path = Path(path).expanduser()
    _, cls, kwargs = _model_class(path, dtype)
    return cls.from_pretrained(path, **kwargs).eval()


def load_pruned_lazy(path: Path, dtype: torch.dtype, spill: Path) -> LazyModel | None:
    """:func:`load` as a lazy model (:mod:`tyr.stream.lazy`), changed blocks spilled under
    `spill`; None when the checkpoint does not allow it."""
    config, cls, kwargs = _model_class(path, dtype)
    attn = kwargs["attn_implementation"]
    return lazy_weights.load(path, config, cls, dtype, spill, attn_implementation=attn)


def _model_class(path: Path, dtype: torch.dtype) -> tuple[Any, Any, dict[str, Any]]:
    """The config of the checkpoint in `path`, the class that loads it (tyr's modeling class
    for a pruned one) and its ``from_pretrained`` keywords."""
    import transformers

    config = _read_config(path)
    spec = arch.spec_for_config(config)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": arch.attn_implementation(config),
        "trust_remote_code": False,
    }
    meta = getattr(config, "tyr", None)
    cls: Any = transformers.AutoModelForCausalLM
    if meta is not None and "names" not in meta:
        raise UserError(
            f"{path} was written by an older tyr (no block layout in config.json)", "prune it again"
        )
    if meta is not None:
        name = (getattr(config, "architectures", None) or [spec.architectures[0]])[0]
        cls = getattr(modeling_tyr, f"Tyr{name}")
    return config, cls, kwargs
