"""Save a pruned model (safetensors + per-layer widths) and load it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from tyr import arch
from tyr.errors import UserError
from tyr.modeling import LayerPlan, apply_plans, empty_plans, plans_metadata

__all__ = ["FORMAT", "save_pruned", "load", "verify_export"]

FORMAT = "tyr.pruned/1"
WEIGHTS = "model.safetensors"


def save_pruned(
    model: nn.Module, tokenizer: Any, plans: list[LayerPlan | None], shape: arch.Shape, dest: Path
) -> None:
    """Write the physically smaller model's tensors, its config with per-layer widths and the tokenizer."""
    dest.mkdir(parents=True, exist_ok=True)
    save_model(model, str(dest / WEIGHTS))
    (dest / WEIGHTS).chmod(0o644)  # the writer creates it owner-only; the rest of DIR is 0644
    hf_config: Any = model.config
    config = hf_config.to_dict()
    config["tyr"] = {"format": FORMAT, "layers": plans_metadata(plans, shape)}
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model written by :func:`save_pruned` (``tyr.load``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / "config.json").is_file():
        raise UserError(f"{path} is not a tyr output directory", "point at the --out of a finished tyr prune")
    config = AutoConfig.from_pretrained(path)
    meta = getattr(config, "tyr", None)
    spec = arch.spec_for_config(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if meta is not None:
        shape = arch.shape_of(model, spec)
        apply_plans(model, empty_plans(meta["layers"], shape, dtype), spec, shape)
    load_model(model, str(path / WEIGHTS))
    return model.eval()


@torch.inference_mode()
def verify_export(model: nn.Module, path: Path, ids: torch.Tensor) -> None:
    """Reload what was written and check it against the in-memory pruned model: the same
    block-parameter count and the same logits on a short batch (DESIGN.md §4.9)."""
    dtype = next(model.parameters()).dtype
    again = load(path, dtype=dtype)
    if arch.count_block_params(again) != arch.count_block_params(model):
        raise RuntimeError(f"{path}: reloaded block parameters differ from the pruned model's")
    ref, got = model(ids).logits.float(), again(ids).logits.float()
    if not torch.allclose(ref, got, rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max()))):
        raise RuntimeError(f"{path}: reloaded logits differ from the pruned model's")
