"""Typed, frozen, validated configuration of a `tyr prune` run; saved with every output."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tyr.budget import BUDGETS
from tyr.errors import UserError
from tyr.local import DAMP, GQA_MODES, SALIENCIES, SCHEDULES
from tyr.supernet import ACCUMULATIONS

__all__ = [
    "DTYPE_BYTES",
    "OFFLOADS",
    "activation_bytes",
    "offload_mode",
    "FINAL_PASSES",
    "TEACHER_CACHES",
    "TEACHER_ENTRY_BYTES",
    "teacher_cache_mode",
    "check_ffn_unit",
    "WEIGHTS",
    "weights_mode",
    "HEAL_MODES",
    "HealConfig",
    "PruneConfig",
    "PRESETS",
    "Sizes",
    "options",
    "load_config_file",
    "parse_set",
    "resolve_preset",
]

METHODS = ("tyr", "uniform")
FINAL_PASSES = ("none", "reprune")  # after the search (api._search)
PRESET_NAMES = ("auto", "smoke", "quick", "paper")

# Data sizes per preset. `quick` is sized so that the embedded 135M model finishes on 2 CPU
# cores in a few minutes; `paper` is the paper's protocol (clipped to what the source holds).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "calib_tokens": 2048,
        "seq_len": 256,
        "eval_tokens": 2048,
        "batch_size": 8,
        "iterations": 1,
        "generations": 2,
        "offspring": 4,
        "stage_tokens": "256,512",
        "survivors": "2,1",
        "kl_topk": 64,
    },
    "quick": {
        "calib_tokens": 32768,
        "seq_len": 512,
        "eval_tokens": 32768,
        "batch_size": 8,
        "iterations": 4,
        "generations": 4,
        "offspring": 16,
        "stage_tokens": "512,2048,8192",
        "survivors": "4,2,1",
        "kl_topk": 256,
    },
    "paper": {
        "calib_tokens": 4_194_304,
        "seq_len": 4096,
        "eval_tokens": 4_194_304,
        "batch_size": 1,
        "iterations": 4,
        "generations": 50,
        "offspring": 128,
        "stage_tokens": "2048,16384,131072",
        "survivors": "16,4,1",
        "kl_topk": 8192,
    },
}
# Training tokens of `tyr heal` by default: sized so that the embedded 135M model's 50 % result
# heals in under 30 minutes on 2 CPU cores: 40 steps of 8 × 512 (docs/healing.md §3).
HEAL_TOKENS = 163_840
# Teacher logits per position of the distillation loss, 0 = the whole vocabulary: a top-k KL
# ignores the student's mass outside the teacher's k, and healed far less (docs/healing.md §1).
HEAL_KL_TOPK = 0
DATA_KEYS = ("calib_tokens", "seq_len", "eval_tokens", "batch_size")
# Options that only change how the result is evaluated, not the work files.
EVAL_KEYS = ("no_eval", "eval_data", "eval_tokens")
# Where the search keeps the dense teacher's top-k logits: `disk` fills a memory-mapped cache of
# the calibration set once, `none` recomputes each minibatch's (about 13 % more forward tokens
# with the paper's stages, and no disk); `auto` caches up to TEACHER_CACHE_MAX_BYTES. Both give
# the same values, so the choice changes neither the result nor the work files' meaning.
TEACHER_CACHES = ("auto", "disk", "none")
TEACHER_CACHE_MAX_BYTES = 16 * 10**9
TEACHER_ENTRY_BYTES = 8  # one fp32 logit and its int32 vocabulary index
# Where the calibration activations live: `auto` keeps them in host memory while they take at
# most the memory budget (default: half of the memory available when the run starts), and puts
# them in the work directory otherwise. The place changes no value.
OFFLOADS = ("auto", "cpu", "disk")
# Where the dense weights live during the prune: `disk` reads one decoder block at a time from
# a local safetensors checkpoint (the search then holds only its pruned student in memory),
# `memory` loads the model whole. `auto`: disk for `uniform` (it reads each block once), and for
# `tyr` when the model and its pruned student take more than the memory budget (the search
# re-reads a dense block whenever a genome changes it). A checkpoint that cannot be read block
# by block loads whole.
WEIGHTS = ("auto", "memory", "disk")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# Options of how a run keeps its data, not of what it computes: the result is the same, so
# they are no part of its identity and a work directory resumes under any of them.
NEUTRAL_KEYS = ("teacher_cache", "offload", "memory_budget", "weights")
# Options added later, left out of a run's identity and work options at their default so that
# earlier runs keep theirs (and their work directories resume).
LATER_DEFAULTS: dict[str, Any] = {"ffn_unit": 1}
# Options of what follows the prune (healing, a GGUF copy): they change neither the pruned model
# nor its work files.
HEAL_KEYS = ("heal", "heal_out", "gguf", "gguf_quant")


def _meta(help: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"help": help, "choices": choices}


def activation_bytes(tokens: int, hidden: int, intermediate: int, dtype: str) -> int:
    """Memory of block activations: each token's hidden state (`hidden` wide, updated in place
    block after block) and, for the local pruner, its MLP intermediate (`intermediate` wide,
    held while down_proj is solved; 0 for a perplexity)."""
    return tokens * (hidden + intermediate) * DTYPE_BYTES[dtype]


def offload_mode(requested: str, needed: int, budget: int) -> str:
    """`cpu` or `disk`: what `auto` means for activations of `needed` bytes under `budget`."""
    if requested != "auto":
        return requested
    return "cpu" if needed <= budget else "disk"


def weights_mode(requested: str, method: str, weight_bytes: int, budget: int, sparsity: float) -> str:
    """`memory` or `disk`: what `auto` means for a model of `weight_bytes` under `budget`: disk
    for `uniform`; for `tyr` when the model and its pruned student, (2 − S) × the weights,
    exceed the budget."""
    if requested != "auto":
        return requested
    return "disk" if method == "uniform" or weight_bytes * (2 - sparsity) > budget else "memory"


def check_ffn_unit(unit: int, d_ff: int) -> None:
    """`--ffn-unit` must divide the model's FFN width, so that every width it allows is whole."""
    if d_ff % unit:
        raise UserError(
            f"--ffn-unit {unit} does not divide the model's FFN width {d_ff}",
            "give a divisor of it (1 always works)",
        )


def teacher_cache_mode(requested: str, calib_tokens: int, k: int) -> str:
    """`disk` or `none`: what `auto` means for a calibration set of `calib_tokens` at top-k `k`."""
    if requested != "auto":
        return requested
    return "disk" if calib_tokens * k * TEACHER_ENTRY_BYTES <= TEACHER_CACHE_MAX_BYTES else "none"


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = field(metadata=_meta("fraction of decoder-block parameters to remove, in (0, 1)"))
    out: str = field(metadata=_meta("output directory (written atomically)"))
    model: str | None = field(default=None, metadata=_meta("hub id, HF directory or .gguf; None = embedded"))
    method: str = field(
        default="tyr", metadata=_meta("tyr = global search; uniform = same fraction per block", METHODS)
    )
    preset: str = field(
        default="auto", metadata=_meta("data sizes (auto: quick under 1B parameters on CPU)", PRESET_NAMES)
    )
    calib: str = field(
        default="wiki",
        metadata=_meta("calibration source: wiki, a .txt/.jsonl/.parquet file, or hf:NAME[:CONFIG][:SPLIT]"),
    )
    calib_tokens: int | None = field(default=None, metadata=_meta("calibration tokens"))
    seq_len: int | None = field(default=None, metadata=_meta("sequence length for calibration and eval"))
    calib_sample: str = field(
        default="random",
        metadata=_meta("seeded windows from the whole source, or its first tokens", ("random", "first")),
    )
    eval_data: str = field(default="wiki:heldout", metadata=_meta("held-out perplexity source"))
    eval_tokens: int | None = field(default=None, metadata=_meta("held-out perplexity tokens"))
    no_eval: bool = field(default=False, metadata=_meta("skip perplexity"))
    iterations: int | None = field(default=None, metadata=_meta("coarse-to-fine search iterations"))
    generations: int | None = field(default=None, metadata=_meta("generations per iteration"))
    offspring: int | None = field(default=None, metadata=_meta("offspring per generation (λ)"))
    stage_tokens: str | None = field(
        default=None, metadata=_meta("selection tokens per stage, e.g. 512,2048,8192")
    )
    survivors: str | None = field(default=None, metadata=_meta("survivors per stage, e.g. 4,2,1"))
    levels: int = field(default=9, metadata=_meta("candidates per sub-layer (odd)"))
    kl_topk: int | None = field(default=None, metadata=_meta("teacher logits kept per position"))
    teacher_cache: str = field(
        default="auto",
        metadata=_meta(
            "the teacher's top-k logits: cached on disk once, or recomputed per minibatch (none);"
            " auto caches up to 16 GB",
            TEACHER_CACHES,
        ),
    )
    accumulation: str = field(
        default=ACCUMULATIONS[0], metadata=_meta("error accumulation in the supernet", ACCUMULATIONS)
    )
    budget: str = field(
        default=BUDGETS[0],
        metadata=_meta(
            "search budget: attention and FFN each at the sparsity, or one real-parameter budget"
            " the search trades between them",
            BUDGETS,
        ),
    )
    final_pass: str = field(
        default=FINAL_PASSES[0],
        metadata=_meta(
            "after the search: reprune = prune again at the chosen widths, calibrated along the chosen path",
            FINAL_PASSES,
        ),
    )
    genome: str | None = field(
        default=None,
        metadata=_meta("apply a per-sub-layer genome (JSON or a tyr result.json) without searching"),
    )
    ffn_unit: int = field(
        default=1,
        metadata=_meta(
            "FFN widths change in multiples of this many neurons (32: every FFN tensor of a"
            " GGUF Q8_0/Q4_0 export quantizes)"
        ),
    )
    saliency: str = field(default=SALIENCIES[0], metadata=_meta("group saliency", SALIENCIES))
    schedule: str = field(default=SCHEDULES[0], metadata=_meta("FFN removal schedule", SCHEDULES))
    gqa: str = field(default=GQA_MODES[0], metadata=_meta("GQA head structure", GQA_MODES))
    solver: str = field(
        default="obs", metadata=_meta("obs = Hessian pruner; magnitude = baseline", ("obs", "magnitude"))
    )
    damp: float = field(default=DAMP, metadata=_meta("Hessian damping relative to mean(diag H)"))
    batch_size: int | None = field(default=None, metadata=_meta("sequences per forward"))
    offload: str = field(
        default="auto",
        metadata=_meta(
            "where calibration activations live (auto: memory while they fit the budget)", OFFLOADS
        ),
    )
    memory_budget: float | None = field(
        default=None,
        metadata=_meta(
            "GB of host memory --offload auto fills with activations and --weights auto with the"
            " weights (default: half the available)"
        ),
    )
    weights: str = field(
        default="auto",
        metadata=_meta(
            "where the dense weights live (disk: one block at a time from safetensors; auto: disk"
            " for uniform, and for tyr when they and the pruned copy exceed the budget)",
            WEIGHTS,
        ),
    )
    workdir: str | None = field(default=None, metadata=_meta("work files; default $TYR_HOME/runs/<hash>"))
    overwrite: bool = field(default=False, metadata=_meta("replace a non-empty --out"))
    dtype: str = field(default="float32", metadata=_meta("model dtype", ("float32", "bfloat16")))
    device: str = field(default="cpu", metadata=_meta("compute device", ("cpu", "cuda")))
    trust_remote_code: bool = field(
        default=False, metadata=_meta("run Python code shipped with the input checkpoint (auto_map)")
    )
    seed: int = field(default=0, metadata=_meta("seed of every random choice"))
    heal: int | None = field(
        default=None, metadata=_meta("then heal the result with this many tokens (tyr heal's defaults)")
    )
    heal_out: str | None = field(
        default=None, metadata=_meta("the healed model's directory (default OUT-healed)")
    )
    gguf: str | None = field(
        default=None, metadata=_meta("then also write the result (healed, with --heal) as GGUF to this file")
    )
    gguf_quant: str = field(
        default="f16", metadata=_meta("weight type of the --gguf file (as tyr export --quant)")
    )

    def __post_init__(self) -> None:
        if not 0.0 < float(self.sparsity) < 1.0:
            raise UserError(
                f"sparsity {self.sparsity} is outside (0, 1)", "give a fraction such as 0.25 or 0.5"
            )
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"{f.name}={value!r} is not valid", f"choose one of {', '.join(choices)}")
        for key in (
            "calib_tokens",
            "seq_len",
            "eval_tokens",
            "batch_size",
            "iterations",
            "generations",
            "offspring",
            "kl_topk",
            "heal",
        ):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise UserError(f"{key}={value} must be positive", "give a positive integer")
        if self.method != "tyr" and self.genome is not None:
            raise UserError(
                f"genome is only for --method tyr, not {self.method}", "drop --genome or --method"
            )
        if self.method != "tyr" and (self.budget, self.final_pass) != (BUDGETS[0], FINAL_PASSES[0]):
            raise UserError(
                "budget and final_pass are only for --method tyr (the search)",
                "drop them or use --method tyr",
            )
        if self.method == "tyr" and self.solver != "obs":
            raise UserError(
                f"solver={self.solver} is only for --method uniform", "drop it or add --method uniform"
            )
        if self.levels < 1 or self.levels % 2 == 0:
            raise UserError(f"levels={self.levels} must be odd and positive", "the default is 9")
        stages = [_int_list("stage_tokens", self.stage_tokens), _int_list("survivors", self.survivors)]
        if all(x is not None for x in stages) and len(stages[0] or ()) != len(stages[1] or ()):
            raise UserError(
                "stage_tokens and survivors need the same number of entries", "e.g. 512,2048 and 4,1"
            )
        if self.ffn_unit < 1:
            raise UserError(f"ffn_unit={self.ffn_unit} must be a positive integer", "the default is 1")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise UserError(f"memory_budget={self.memory_budget} must be positive", "give gigabytes, e.g. 32")
        if not self.damp > 0:
            raise UserError(f"damp={self.damp} must be positive", f"the default is {DAMP}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def api_call(self) -> str:
        """The `tyr.prune(...)` call that reproduces this configuration (defaults left out)."""
        args = [repr(self.model)] if self.model else []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("sparsity", "out") or (f.name != "model" and value != f.default):
                args.append(f"{f.name}={value!r}")
        return f"tyr.prune({', '.join(args)})"

    def identity(self) -> str:
        """Hash of everything that changes the result (not where it is written); local input
        files count with their size and modification time, so an edited file is a new run."""
        return _digest(self._options(exclude=("out", "workdir", "overwrite", *HEAL_KEYS, *NEUTRAL_KEYS)))

    def work_options(self) -> dict[str, Any]:
        """The options that shape the work directory's files (all but where the result goes and
        how it is evaluated): resuming a work directory requires the same ones."""
        return self._options(exclude=("out", "workdir", "overwrite", *EVAL_KEYS, *HEAL_KEYS, *NEUTRAL_KEYS))

    def heal_config(self) -> HealConfig | None:
        """The `tyr heal` run that follows the prune (`--heal TOKENS`), or None."""
        if self.heal is None:
            return None
        out = self.heal_out or str(Path(self.out).expanduser()).rstrip("/") + "-healed"
        return HealConfig(
            source=self.out,
            out=out,
            tokens=self.heal,
            device=self.device,
            seed=self.seed,
            overwrite=self.overwrite,
        )

    def work_identity(self) -> str:
        return _digest(self.work_options())

    def _options(self, exclude: tuple[str, ...]) -> dict[str, Any]:
        keep: dict[str, Any] = {k: v for k, v in self.to_dict().items() if k not in exclude}
        for key, default in LATER_DEFAULTS.items():  # at its default, as before the option existed
            if keep.get(key) == default:
                del keep[key]
        for key in ("model", "calib", "eval_data"):
            value = keep.get(key)
            path = Path(value).expanduser() if value else None
            if path is not None and path.exists():
                files = [path] if path.is_file() else sorted(q for q in path.iterdir() if q.is_file())
                keep[key + "_files"] = [[q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in files]
        return keep


HEAL_MODES = ("full", "lora")
HEAL_LR = {"full": 1e-4, "lora": 1e-3}  # the default learning rate of each mode


@dataclass(frozen=True)
class HealConfig:
    """A `tyr heal` run: distillation of a pruned model from its dense teacher (docs/healing.md)."""

    source: str = field(metadata=_meta("the --out directory of tyr prune"))
    out: str = field(metadata=_meta("output directory of the healed model (written atomically)"))
    teacher: str | None = field(
        default=None, metadata=_meta("dense teacher (default: the model the source was pruned from)")
    )
    data: str | None = field(
        default=None,
        metadata=_meta(
            "training text, sources as --calib (default: the prune's calibration source without"
            " the windows it calibrated on)"
        ),
    )
    tokens: int = field(default=HEAL_TOKENS, metadata=_meta("training tokens (the budget)"))
    seq_len: int | None = field(default=None, metadata=_meta("sequence length (default: the prune's)"))
    batch_size: int = field(default=8, metadata=_meta("sequences per optimizer step"))
    micro_batch: int = field(default=2, metadata=_meta("sequences per forward (gradients accumulate)"))
    mode: str = field(
        default="full",
        metadata=_meta("full = every kept weight trains; lora = adapters, merged at the end", HEAL_MODES),
    )
    lr: float | None = field(
        default=None, metadata=_meta("peak learning rate (default 1e-4 full, 1e-3 lora)")
    )
    warmup: float = field(default=0.05, metadata=_meta("fraction of the steps of linear warm-up"))
    weight_decay: float = field(default=0.0, metadata=_meta("AdamW weight decay"))
    temperature: float = field(default=1.0, metadata=_meta("distillation temperature"))
    kl_topk: int = field(
        default=HEAL_KL_TOPK, metadata=_meta("teacher logits kept per position (0: the whole vocabulary)")
    )
    lm_weight: float = field(default=0.0, metadata=_meta("weight of the next-token loss added to the KL"))
    lora_rank: int = field(default=16, metadata=_meta("LoRA rank"))
    lora_alpha: float | None = field(default=None, metadata=_meta("LoRA alpha (default 2 × rank)"))
    eval_every: int = field(default=8, metadata=_meta("steps between held-out perplexity points"))
    curve_tokens: int = field(default=8192, metadata=_meta("held-out tokens of each curve point"))
    save_every: int = field(default=8, metadata=_meta("steps between checkpoints"))
    eval_data: str | None = field(
        default=None, metadata=_meta("held-out perplexity source (default: the prune's)")
    )
    eval_tokens: int | None = field(
        default=None, metadata=_meta("held-out tokens before and after (default: the prune's)")
    )
    zeroshot: int | None = field(
        default=None,
        metadata=_meta("also zero-shot before and after, this many questions per task"),
    )
    grad_checkpointing: bool = field(default=False, metadata=_meta("recompute activations in backward"))
    workdir: str | None = field(default=None, metadata=_meta("work files; default $TYR_HOME/heal/<hash>"))
    overwrite: bool = field(default=False, metadata=_meta("replace a non-empty --out"))
    device: str = field(default="cpu", metadata=_meta("compute device", ("cpu", "cuda")))
    seed: int = field(default=0, metadata=_meta("seed of the data order and the adapters' initialisation"))

    def __post_init__(self) -> None:
        if self.mode not in HEAL_MODES:
            raise UserError(f"mode={self.mode!r} is not valid", f"choose one of {', '.join(HEAL_MODES)}")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"device={self.device!r} is not valid", "choose cpu or cuda")
        for key in (
            *("tokens", "seq_len", "batch_size", "micro_batch", "lora_rank"),
            *("eval_every", "curve_tokens", "save_every", "eval_tokens", "zeroshot"),
        ):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise UserError(f"{key}={value} must be positive", "give a positive integer")
        for key in ("lr", "temperature", "lora_alpha"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise UserError(f"{key}={value} must be positive", "give a positive number")
        if not 0 <= self.warmup < 1:
            raise UserError(f"warmup={self.warmup} is outside [0, 1)", "e.g. 0.05")
        if self.kl_topk < 0:
            raise UserError(
                f"kl_topk={self.kl_topk} is negative", "give 0 (the whole vocabulary) or a positive k"
            )
        if self.lm_weight < 0 or self.weight_decay < 0:
            raise UserError("lm_weight and weight_decay cannot be negative", "give 0 or more")
        if self.micro_batch > self.batch_size:
            raise UserError(
                f"micro_batch={self.micro_batch} exceeds batch_size={self.batch_size}", "lower micro_batch"
            )

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else HEAL_LR[self.mode]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> str:
        """Hash of everything that changes the healed model and its numbers, the source's files
        included (names, sizes, modification times)."""
        return _digest(self._options(("out", "workdir", "overwrite")))

    def work_options(self) -> dict[str, Any]:
        """The options that shape the work directory (resuming requires the same ones)."""
        return self._options(("out", "workdir", "overwrite", "eval_tokens", "zeroshot"))

    def work_identity(self) -> str:
        return _digest(self.work_options())

    def _options(self, exclude: tuple[str, ...]) -> dict[str, Any]:
        keep: dict[str, Any] = {k: v for k, v in self.to_dict().items() if k not in exclude}
        keep["source"] = str(Path(self.source).expanduser().resolve())
        for key in ("source", "teacher", "data", "eval_data"):
            value = getattr(self, key)
            path = Path(value).expanduser() if value else None
            if path is not None and path.exists():
                files = [path] if path.is_file() else sorted(q for q in path.iterdir() if q.is_file())
                keep[key + "_files"] = [[q.name, q.stat().st_size, q.stat().st_mtime_ns] for q in files]
        return keep


def _digest(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def _int_list(key: str, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(int(x) for x in str(value).replace(" ", "").split(","))
    except ValueError as exc:
        raise UserError(
            f"{key}={value!r} is not a comma-separated list of integers", "e.g. 512,2048,8192"
        ) from exc
    if not out or any(x <= 0 for x in out):
        raise UserError(f"{key}={value!r} needs positive integers", "e.g. 512,2048,8192")
    return out


def options(cls: type = PruneConfig, skip: tuple[str, ...] = ("model",)) -> list[tuple[str, type, str]]:
    """(name, type, help) of every option of `cls` but those in `skip` (the positional
    arguments), for the command line: the help and the choices come from the field metadata,
    the type from the annotation."""
    out = []
    for f in fields(cls):
        if f.name in skip:
            continue
        kind = _field_types(cls)[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        text = f.metadata["help"]
        if f.metadata.get("choices"):
            text += f": {', '.join(f.metadata['choices'])}"
        if f.default not in (None, False, dataclasses.MISSING):
            text += f" (default {f.default})"
        out.append((f.name, kind, text))
    return out


def _field_types(cls: type = PruneConfig) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key: str, value: Any, cls: type = PruneConfig) -> Any:
    kind = _field_types(cls)[key]
    if isinstance(kind, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{key}={value!r} is not a valid {kind.__name__}", "fix the value") from exc


def check_keys(values: dict[str, Any], where: str, cls: type = PruneConfig) -> dict[str, Any]:
    """`values` with every key an option of `cls` (else a UserError naming the closest) and
    every value coerced to the option's type."""
    known = _field_types(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = [m for k in unknown for m in difflib.get_close_matches(k, known, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"unknown key(s) {', '.join(unknown)} in {where}{hint}", f"known keys: {', '.join(known)}"
        )
    return {k: _coerce(k, v, cls) for k, v in values.items()}


def load_config_file(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"config file {path} does not exist", "check the --config path")
    import yaml

    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot parse {path}: {first}", "fix the file (YAML or JSON)") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"{path} is not a mapping of option names to values", "write key: value lines")
    return check_keys({k.replace("-", "_"): v for k, v in data.items()}, path)


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} is not KEY=VALUE", "write for example --set damp=0.02")
        out[key.strip().replace("-", "_")] = value.strip()
    return check_keys(out, "--set")


@dataclass(frozen=True)
class Sizes:
    """The sizes of a run once its preset is resolved: none optional, lists parsed."""

    calib_tokens: int
    seq_len: int
    eval_tokens: int
    batch_size: int
    iterations: int
    generations: int
    offspring: int
    stage_tokens: tuple[int, ...]
    survivors: tuple[int, ...]
    levels: int
    kl_topk: int


def resolve_preset(cfg: PruneConfig, n_params: int) -> tuple[PruneConfig, str, Sizes]:
    """Fill unset data sizes from the preset (`auto`: quick under 1B parameters on CPU);
    returns the filled config, the preset's name and the sizes."""
    name = cfg.preset
    if name == "auto":
        name = "quick" if n_params < 1_000_000_000 and cfg.device == "cpu" else "paper"
    preset = PRESETS[name]
    updates: dict[str, Any] = {k: v for k, v in preset.items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **updates)
    values = {f.name: getattr(cfg, f.name) for f in fields(Sizes)}
    lists = {k: _int_list(k, values[k]) for k in ("stage_tokens", "survivors")}
    sizes = Sizes(**{**values, **lists})
    return cfg, name, sizes
