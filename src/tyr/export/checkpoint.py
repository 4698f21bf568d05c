"""Write a pruned model as a self-contained Hugging Face checkpoint and check it by reloading it.

DIR holds the physically smaller tensors (``model.safetensors``, sharded when large), a
``config.json`` that describes every block's widths and maps ``AutoModelForCausalLM`` to the
shipped ``modeling_tyr.py``, the tokenizer with its chat template, ``generation_config.json``
and a model card. ``from_pretrained(DIR, trust_remote_code=True)`` loads it without tyr;
:func:`tyr.loader.load` loads it with tyr's own copy of the same modeling code, never the
directory's, and :func:`verify_export` uses that to check what was written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyr import arch
from tyr.loader import load, load_pruned_lazy
from tyr.modeling import LayerPlan, modeling_tyr, plans_metadata
from tyr.stream import LazyModel, final_hidden

__all__ = [
    "FORMAT",
    "MODELING",
    "modeling_sha256",
    "export_config",
    "save_pruned",
    "write_card",
    "verify_export",
]

FORMAT = "tyr.pruned/1"
MODELING = "modeling_tyr.py"


def _modeling_source() -> bytes:
    return Path(modeling_tyr.__file__).read_bytes()


def modeling_sha256() -> str:
    """sha256 of the modeling file that exports ship (recorded in result.json and the card)."""
    return hashlib.sha256(_modeling_source()).hexdigest()


def _base_class_name(model: nn.Module) -> str:
    """The transformers class the export builds on: the model's own, or its family's first when
    the model came from a checkpoint's custom code."""
    name = type(model).__name__.removeprefix("Tyr")
    spec = arch.spec_for(model)
    return name if name in spec.architectures else spec.architectures[0]


def export_config(model: nn.Module, plans: list[LayerPlan | None], shape: arch.Shape) -> dict[str, Any]:
    """config.json of the pruned model: the dense model's config plus the per-layer widths."""
    spec = arch.spec_for(model)
    hf_config: Any = model.config
    config = hf_config.to_dict()
    base = _base_class_name(model)
    meta = plans_metadata(plans, shape)
    config["architectures"] = [base]
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING.removesuffix('.py')}.Tyr{base}"}
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    widths = {str(i): {"intermediate_size": m["intermediate"]} for i, m in enumerate(meta)}
    config["per_layer_config"] = {
        k: v for k, v in widths.items() if v["intermediate_size"] != shape.intermediate
    }
    config["tyr"] = {
        "format": FORMAT,
        "names": spec.names(),
        "head_dim": shape.head_dim,
        "modeling_sha256": modeling_sha256(),
        "layers": meta,
    }
    return config


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    plans: list[LayerPlan | None],
    shape: arch.Shape,
    dest: Path,
    *,
    lazy: LazyModel | None = None,
    max_shard_size: str = "5GB",
) -> None:
    """Write the checkpoint (everything but the model card, which needs the run's numbers)."""
    dest.mkdir(parents=True, exist_ok=True)
    hf_model: Any = model
    if lazy is not None:  # tensor by tensor from the block files
        lazy.save(dest)
        if hf_model.generation_config is not None:
            hf_model.generation_config.save_pretrained(dest)
    else:
        hf_model.save_pretrained(dest, max_shard_size=max_shard_size)  # weights + generation_config.json
    for shard in dest.glob("*.safetensors"):
        shard.chmod(0o644)  # the writer creates them owner-only; the rest of DIR is 0644
    config = export_config(model, plans, shape)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (dest / MODELING).write_bytes(_modeling_source())
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)


@torch.inference_mode()
def verify_export(model: nn.Module, path: Path, ids: torch.Tensor, lazy: LazyModel | None = None) -> None:
    """Reload what was written through ``from_pretrained`` and check it against the in-memory
    pruned model: the same parameter counts and the same logits on a short batch (docs/architecture.md §3.4).
    A lazy model is compared block by block on its final hidden states instead (its LM head is
    written as read, and a full forward would bring every weight into memory at once)."""
    dtype = next(model.parameters()).dtype
    streamed = lazy is not None
    again_lazy = load_pruned_lazy(path, dtype, path / ".verify") if streamed else None
    again = again_lazy.module if again_lazy is not None else load(path, dtype=dtype)
    try:
        for count in (arch.count_block_params, arch.count_total_params):
            if count(again) != count(model):
                raise RuntimeError(f"{path}: reloaded {count.__name__} differs from the pruned model's")
        if streamed:
            spec = arch.spec_for(model)
            what = "final hidden states"
            ref = final_hidden(model, spec, ids, lazy=lazy).float()
            got = final_hidden(again, spec, ids, lazy=again_lazy).float()
        else:
            what, ref, got = "logits", model(ids).logits.float(), again(ids).logits.float()
    finally:
        shutil.rmtree(path / ".verify", ignore_errors=True)
    if not torch.allclose(ref, got, rtol=0, atol=1e-4 * max(1.0, float(ref.abs().max()))):
        diff = float((ref - got).abs().max())
        raise RuntimeError(f"{path}: reloaded {what} differ from the pruned model's (max |Δ| {diff:.3g})")


def write_card(dest: Path, result: dict[str, Any], command: str, base: dict[str, str | None]) -> None:
    """README.md model card: base model and licence, method, sparsity, per-layer table, tyr
    version, the command that made it."""
    p, ppl = result["params"], result.get("ppl") or {}
    licence = base.get("license")
    front = [
        "---",
        *([f"base_model: {base['base_model']}"] if base.get("base_model") else []),
        f"license: {licence or 'other'}",
        "library_name: transformers",
        "tags: [tyr, pruned, structured-pruning]",
        "---",
    ]
    lines = [
        *front,
        "",
        f"# {result['model']}, {result['sparsity_achieved']:.1%} of block parameters pruned by tyr",
        "",
        f"- Base model: {base.get('base_model') or result['model']}"
        f" (licence: {licence or 'see the base model; this derivative inherits it'})",
        f"- Method: `{result['method']}` "
        + (
            "(Týr-the-Pruner: supernet of locally pruned candidates, evolutionary search of the "
            "layer-wise sparsity, arXiv 2503.09657)"
            if result["method"] == "tyr"
            else "(every block pruned by the same fraction, Hessian-based local pruner)"
        ),
        f"- Sparsity: target {result['sparsity_target']}, achieved {result['sparsity_achieved']:.4f}"
        " of decoder-block parameters (counted on the tensors)",
        f"- Parameters: {p['dense_total']:,} → {p['pruned_total']:,} in all;"
        f" blocks {p['dense_block']:,} → {p['pruned_block']:,}",
    ]
    if "pruned" in ppl:
        lines.append(
            f"- Held-out perplexity ({ppl['source']}, {ppl['tokens']:,} tokens, seq {ppl['seq_len']}):"
            f" dense {ppl['dense']:.2f} → pruned {ppl['pruned']:.2f}"
        )
    lines += [
        f"- tyr {result['tyr_version']}; modeling file `{MODELING}` sha256 `{result['modeling_sha256']}`",
        "",
        "Made with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("DIR")',
        "```",
        "",
        f"`trust_remote_code` runs `{MODELING}` from this directory (torch and transformers only):"
        " the stock model class of the base family with each block's projections resized."
        ' With tyr installed, `tyr.load("DIR")` loads it with tyr\'s own copy of that file.',
        "",
        "## Per-layer widths",
        "",
        "| block | query heads | KV heads | FFN width | attention sparsity | FFN sparsity |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['index']} | {r['q_heads']} | {r['kv_heads']} | {r['intermediate']} "
            f"| {r['attn_sparsity']:.1%} | {r['mlp_sparsity']:.1%} |"
        )
    (dest / "README.md").write_text("\n".join(lines) + "\n")
