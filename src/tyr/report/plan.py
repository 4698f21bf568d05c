"""`tyr plan`: what a prune will produce and cost, estimated from a model's config alone.

Nothing here reads weights or runs a forward pass: the model is built on the meta device,
counted, and every estimate is arithmetic on its shape and on the resolved preset.

:func:`estimate` returns a JSON-serialisable dict:

- ``model``, ``family``, ``sparsity`` (S, the fraction of decoder-block parameters removed),
  ``preset`` (resolved: ``auto`` becomes ``quick`` under 1B parameters, ``paper`` otherwise),
  ``method``, ``dtype``, ``shape`` (layers, hidden, heads, head_dim, intermediate, vocab, tied).
- ``settings``: the preset's sizes the estimates used (calib_tokens, seq_len, eval_tokens,
  batch_size, iterations, generations, offspring, stage_tokens, survivors, levels, kl_topk) and
  ``threads`` (``torch.get_num_threads()``).
- ``params``: ``dense_total``, ``dense_block``, ``pruned_total``, ``pruned_block``. The pruned
  counts remove exactly round(S·dense_block) block parameters; embeddings, norms and the
  lm_head are kept; a tied lm_head counts once.
- ``disk_bytes``: ``dense``, ``pruned``: parameters × 4 (float32) or 2 (bfloat16) bytes.
- ``ideal_speedup``: ``decode`` = dense ÷ pruned bytes of weights read per generated token
  (every weight once, one row of the input embedding, the whole lm_head even when tied);
  ``prefill`` = dense ÷ pruned FLOPs of the forward that ``generate`` runs on a prompt of the
  preset's seq_len (2 FLOPs per multiply-add of every block linear for every token, the lm_head
  for the last position only, plus causal attention scores and values; query heads assumed to
  shrink with the block parameters). Memory-bound and compute-bound
  limits; real kernels get less.
- ``supernet_bytes``: one iteration's supernet on disk (the first, widest-step one; 0 for
  ``uniform``): for each sub-layer and level, the compact o_proj / down_proj weight in the
  model dtype plus int32 index lists. ``workdir_bytes``: the work directory at its fullest
  (:func:`workdir_bytes`: one iteration's supernet, the teacher cache, offloaded activations).
- ``teacher_cache``: ``disk`` or ``none`` (``--teacher-cache``; ``auto`` resolved as the run
  resolves it). ``teacher_cache_bytes``: calib_tokens × min(kl_topk, vocab) × (4 B value + 4 B
  index) on disk; 0 when the teacher is recomputed per minibatch, and for ``uniform`` (no
  search, no teacher).
- ``offload`` (``cpu`` or ``disk``: ``--offload auto`` resolved against this machine's available
  memory, as a run resolves it) and ``activation_bytes`` (the calibration activations);
  ``eval_offload`` the same for the held-out perplexity's activations. ``weights``: ``memory`` or
  ``disk`` (``--weights auto`` resolved as a run resolves it, assuming a local safetensors
  checkpoint, which a block-by-block read needs).
  ``peak_ram_bytes`` and ``peak_ram_phase``: host memory of the largest phase (prune, search
  or eval) of rank 0, activations in memory or, offloaded, one batch of them; the search holds
  the largest stage's teacher top-k. ``host_ram_bytes``: all ``nproc`` processes on one host.
- ``device`` (cpu or cuda), ``nproc``; ``gpu`` (None on a CPU): ``name``, ``model``,
  ``memory_bytes`` and ``memory_phase`` (one process's GPU memory, :func:`gpu_memory`),
  ``device_memory_bytes``, ``student_on_gpu``.
- ``runtime_s``: ``prune`` (the uniform local-pruning pass; 0 for ``tyr``), ``supernet``,
  ``search``, ``eval`` (dense and pruned perplexity), ``total``; ``runtime_basis`` says how
  (on a GPU: :func:`gpu_runtime`, datasheet arithmetic not calibrated by a measured run).

Run time is a CPU estimate: work in FLOP units divided by a rate measured on a reference run
(see :data:`REFERENCE`), scaled linearly with ``torch.get_num_threads()``. Forward passes cost
their FLOPs at :data:`FORWARD_FLOPS_PER_S_2T`; the local pruner's per-candidate solve (OBS
removal rounds and refit on a Hessian of side n_in) costs :data:`LOCAL_SOLVE_FACTOR` ×
(n_in³ + n_in²·hidden) FLOP units, the one constant fitted to the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from tyr import arch
from tyr.budget import Shape, attn_structures, candidate_units
from tyr.config import (
    DTYPE_BYTES,
    TEACHER_ENTRY_BYTES,
    PruneConfig,
    Sizes,
    activation_bytes,
    check_ffn_unit,
    offload_mode,
    resolve_preset,
    teacher_cache_mode,
    weights_mode,
)
from tyr.errors import UserError
from tyr.eval import LOGIT_ELEMENTS
from tyr.infra import memory_budget_bytes
from tyr.modeling import unfuse
from tyr.report.fmt import fmt_bytes, fmt_params
from tyr.stream import intermediate_placement

__all__ = [
    "Accelerator",
    "Dims",
    "GPUS",
    "REFERENCE",
    "FORWARD_FLOPS_PER_S_2T",
    "LOCAL_SOLVE_FACTOR",
    "load_config",
    "dims_of",
    "estimate",
    "format_plan",
]

# Measured reference (2 CPU cores, embedded SmolLM2-135M: 30 layers, hidden 576, 9 q / 3 KV
# heads, head_dim 64, intermediate 1536, vocab 49152, tied; S = 0.5, preset quick, method tyr).
REFERENCE: dict[str, float] = {
    "threads": 2,
    "supernet_s": 783.0,  # 4 supernet builds
    "search_s": 740.0,  # 4 × 4 generations of search, teacher cache fill included
    "dense_forward_8x512_s": 12.0,  # one dense forward of 8 × 512 tokens (cross-check only)
    "uniform_total_s": 176.0,  # uniform 50 %, end to end (cross-check only)
}
# Forward FLOP rate on 2 threads: the reference search's forward FLOPs (655,360 student tokens
# plus 32,768 teacher tokens, 85.0 TFLOP) ÷ 740 s. The single dense forward of 8×512 tokens
# implies 98 GFLOP/s (1.17 TFLOP in ≈ 12 s), 15 % lower: it also writes [8, 512, 49152] logits.
FORWARD_FLOPS_PER_S_2T = 1.148e11
# FLOP units per (n_in³ + n_in²·hidden) of one candidate's local solve, fitted so that the
# reference's 4 supernet builds take 783 s: 565 s of streaming (forwards, Gram matrices,
# residual updates) at the forward rate leave 217 s for 4 × 540 candidate solves. Above 1
# because the solver runs in fp64 on the CPU, in 16 removal rounds of small factorizations.
LOCAL_SOLVE_FACTOR = 4.31

# Vocabulary rows of an LM head in bfloat16 that the search's teacher converts to fp32 at once
# (tyr.search.fitness.HEAD_ROWS; tests/test_plan.py holds the two equal).
HEAD_ROWS = 32768
RUNTIME_OVERHEAD_BYTES = 1_000_000_000  # Python, torch and transformers, resident
SAFETENSORS_HEADER_BYTES = 256  # JSON header of one candidate file, approximately


@dataclass(frozen=True)
class Dims:
    """What the estimates need from a model, counted on its meta-device instance."""

    family: str  # the ArchSpec name
    shape: Shape
    vocab: int
    tied: bool
    total: int  # all distinct parameters (a tied lm_head once)
    block: int  # P_blk: weights and biases of q, k, v, o, gate, up, down
    embed: int  # input embedding parameters
    head: int  # lm_head parameters (its matrix is read in full per token, tied or not)


# ---------------------------------------------------------------------------------------------
# Loading: a config, never weights.


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}", "point at a model's config.json") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{path} has no model_type", "point at a Hugging Face model's config.json")
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{path}: unknown model_type {model_type!r}", "tyr supports: " + arch.supported()
        ) from exc


def load_config(model: str | None) -> tuple[Any, str]:
    """(transformers config, display name) of the embedded default (None), a directory holding
    config.json (weights optional), a config.json file, or anything `tyr prune` accepts."""
    from tyr.loader import DEFAULT_MODEL, open_model

    if model is None:
        return open_model(None).config, DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        return _config_from_json(path), model
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{model} has no config.json", "point at a Hugging Face model directory")
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=False), model
        except (OSError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot read the config in {model}: {first}", "check config.json") from exc
    return open_model(model).config, model  # a hub id or a .gguf file; raises UserError


def dims_of(config: Any) -> Dims:
    """Count a supported model's parameters on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    spec = arch.spec_for_config(config)  # UserError for an unsupported family
    with torch.device("meta"):
        model: Any = unfuse(AutoModelForCausalLM.from_config(config), spec)
    embed = model.get_input_embeddings().weight
    head = arch.get_module(model, spec.lm_head)
    head_params = head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)
    return Dims(
        family=spec.name,
        shape=arch.shape_of(model, spec),
        vocab=int(embed.shape[0]),
        tied=head.weight is embed,
        total=arch.count_total_params(model),
        block=arch.count_block_params(model, spec),
        embed=embed.numel(),
        head=head_params,
    )


# ---------------------------------------------------------------------------------------------
# Parameters, bytes, FLOPs.


def pruned_block(dims: Dims, sparsity: float) -> int:
    """Block parameters left after removing exactly S of them."""
    return dims.block - round(sparsity * dims.block)


def attention_score_flops(shape: Shape, seq_len: int) -> float:
    """FLOPs per token of QKᵀ and A·V: 2 matmuls × 2 FLOPs × n_q·head_dim per key, over T/2
    keys on average in a causal prompt of T tokens, in every layer."""
    return shape.n_layers * 2 * 2 * shape.n_q * shape.head_dim * seq_len / 2


def forward_flops(dims: Dims, seq_len: int, kept: float = 1.0, head_rows: int | None = None) -> float:
    """FLOPs per token of one forward pass keeping the fraction `kept` of the block parameters
    (and of the query heads); `head_rows` = only that many lm_head rows are multiplied (the
    search's gathered top-k logits), None = the whole lm_head."""
    head = dims.head if head_rows is None else head_rows * dims.shape.hidden
    return 2 * (kept * dims.block + head) + kept * attention_score_flops(dims.shape, seq_len)


def prefill_flops(dims: Dims, seq_len: int, kept: float = 1.0) -> float:
    """FLOPs per prompt token of a prefill that computes logits at the last position only."""
    return forward_flops(dims, seq_len, kept, head_rows=0) + 2 * dims.head / seq_len


def decode_params_read(dims: Dims, removed: int) -> int:
    """Parameters read per generated token (× dtype bytes = bytes): all weights once, one
    input-embedding row, the whole lm_head (a tied one again, as the output projection)."""
    tied_head = dims.head if dims.tied else 0
    return dims.total - dims.embed + dims.shape.hidden + tied_head - removed


# ---------------------------------------------------------------------------------------------
# Supernet: which candidates exist, their size on disk, the work to solve them.


def candidate_bytes(shape: Shape, kind: str, removed: int, dtype_bytes: int) -> int:
    """One candidate file: the compact consumer weight [hidden, kept·unit] and int32 indices."""
    if kind == "attn":
        kept, kept_kv = attn_structures(shape, removed)[0]  # the structure of most query heads
        weight = shape.hidden * kept * shape.head_dim
        indices = kept + kept_kv
    else:
        kept = shape.intermediate - removed
        weight = shape.hidden * kept
        indices = kept
    return weight * dtype_bytes + indices * 4 + SAFETENSORS_HEADER_BYTES


def supernet_iteration_bytes(
    shape: Shape, sparsity: float, iteration: int, levels: int, dtype_bytes: int
) -> int:
    return sum(
        candidate_bytes(shape, kind, u, dtype_bytes)
        for kind, units in candidate_units(shape, sparsity, iteration, levels)
        for u in units
    )


def local_solve_units(shape: Shape, kind: str) -> float:
    """FLOP units of one candidate's local solve: n_in³ + n_in²·hidden, n_in = the consumer's
    input width (n_q·head_dim for o_proj, intermediate for down_proj)."""
    n_in = shape.n_q * shape.head_dim if kind == "attn" else shape.intermediate
    return float(n_in**3 + n_in**2 * shape.hidden)


def streaming_flops_per_token(shape: Shape, seq_len: int, dense_block: int) -> float:
    """FLOPs per calibration token of one pass of local pruning over all blocks: the full block
    forward (down_proj's Gram pass), the attention part again (o_proj's Gram pass), both Gram
    accumulations x·xᵀ, and the residual update of the block outputs z·ΔWᵀ."""
    d, L = shape.hidden, shape.n_layers
    attn_in = shape.n_q * shape.head_dim
    qkv = d * shape.head_dim * (shape.n_q + 2 * shape.n_kv)
    scores = attention_score_flops(shape, seq_len)
    block_forward = 2 * dense_block + scores
    attn_pass = L * 2 * qkv + scores
    grams = L * 2 * (attn_in**2 + shape.intermediate**2)
    residual = L * 2 * shape.intermediate * d
    return block_forward + attn_pass + grams + residual


def local_pruning_seconds(
    dims: Dims, settings: Sizes, candidates: list[tuple[str, list[int]]], rate: float
) -> float:
    """One pass of local pruning (a supernet build, or the uniform prune) at `rate` FLOP/s."""
    stream = settings.calib_tokens * streaming_flops_per_token(dims.shape, settings.seq_len, dims.block)
    solves = sum(len(units) * local_solve_units(dims.shape, kind) for kind, units in candidates)
    return (stream + LOCAL_SOLVE_FACTOR * solves) / rate


# ---------------------------------------------------------------------------------------------
# Search, evaluation, memory.


def search_tokens_per_generation(settings: Sizes) -> int:
    """Student forward tokens of one generation: stage 0 scores every offspring, stage i the
    survivors of stage i−1, and the last stage re-scores the parent too; a stage draws at most
    the calibration set."""
    stages = [min(t, settings.calib_tokens) for t in settings.stage_tokens]
    scored = [settings.offspring, *settings.survivors[:-1]]
    scored[-1] += 1  # the parent
    return sum(n * t for n, t in zip(scored, stages, strict=True))


def teacher_tokens(settings: Sizes, cache: str) -> int:
    """Dense forward tokens of the teacher: the calibration set once into the disk cache, or
    every stage's minibatch of every generation when it is recomputed (`none`)."""
    if cache == "disk":
        return settings.calib_tokens
    per_generation = sum(min(t, settings.calib_tokens) for t in settings.stage_tokens)
    return settings.iterations * settings.generations * per_generation


def search_seconds(dims: Dims, settings: Sizes, kept: float, rate: float, cache: str = "disk") -> float:
    """All generations of all iterations on the pruned-size student (top-k lm_head rows only),
    plus the teacher's full dense forwards (:func:`teacher_tokens`)."""
    topk = min(settings.kl_topk, dims.vocab)
    student = forward_flops(dims, settings.seq_len, kept, head_rows=topk)
    tokens = settings.iterations * settings.generations * search_tokens_per_generation(settings)
    teacher = teacher_tokens(settings, cache) * forward_flops(dims, settings.seq_len)
    return (tokens * student + teacher) / rate


def eval_seconds(dims: Dims, settings: Sizes, kept: float, rate: float) -> float:
    """Perplexity of the dense model (cached after the first run) and of the pruned one."""
    per_token = forward_flops(dims, settings.seq_len) + forward_flops(dims, settings.seq_len, kept)
    return settings.eval_tokens * per_token / rate


def _intermediates(method: str, offload: str, weights: str, device: str) -> str:
    """Where a run puts the MLP's intermediate activations (:func:`tyr.stream.intermediate_placement`;
    `--method uniform` with its weights on disk is the streamed case)."""
    return intermediate_placement(offload, device, streamed=method == "uniform" and weights == "disk")


def peak_ram(
    dims: Dims,
    settings: Sizes,
    method: str,
    dtype_bytes: int,
    offload: str = "cpu",
    eval_offload: str = "cpu",
    weights: str = "disk",
    sparsity: float = 0.5,
    device: str = "cpu",
    nproc: int = 1,
    student_on_device: bool = False,
) -> tuple[int, str, int]:
    """(bytes, phase) of the largest host-memory phase of rank 0, and the host memory of all
    `nproc` processes on one host (the others do not evaluate), block activations in
    memory (`offload` cpu: its share of the calibration sequences) or in the work directory but
    for one batch (disk); `eval_offload` likewise for the held-out perplexity's.

    `weights` (resolved `--weights`): `memory` holds the model; `disk` reads one block at a time
    from a local safetensors checkpoint (tyr.stream.lazy; the embedding mapped, read by rows),
    and the search then holds its pruned student, one dense block and the LM head (the teacher's
    logits read all of it); in memory, the model and the pruned student. The MLP's intermediate
    activations wait where :func:`tyr.stream.intermediate_placement` puts them. On a GPU the
    solver's matrices live there, and so does a student that fits it (`student_on_device`,
    :func:`gpu_memory`): the host holds one dense block of it at a time, copied and sliced
    before it moves there."""
    shape = dims.shape
    streamed = weights == "disk"
    block = dims.block // shape.n_layers * dtype_bytes
    resident = block if streamed else dims.total * dtype_bytes
    batch = settings.batch_size * settings.seq_len
    share = -(-settings.calib_tokens // nproc)
    tokens = share if offload == "cpu" else batch
    calib_acts = (tokens + batch) * shape.hidden * dtype_bytes  # the states, and one batch's new ones
    z_at = _intermediates(method, offload, weights, device)
    z_tokens = tokens if z_at == "cpu" else batch
    mlp_inputs = z_tokens * shape.intermediate * dtype_bytes
    n_in = max(shape.intermediate, shape.n_q * shape.head_dim)
    # fp32 Gram and fp64 H_d⁻¹, plus (tyr, weights in memory) the working copy of each level's
    # solve (with the weights on disk each level inverts afresh instead); W, G, Ŵ in fp64
    copy = 8 if method == "tyr" and not streamed else 0
    solver = n_in**2 * (4 + 8 + copy) + 3 * n_in * shape.hidden * 8 if device == "cpu" else 0
    eval_tokens = settings.eval_tokens if eval_offload == "cpu" else batch
    phases = {
        "prune": resident + calib_acts + mlp_inputs + solver,
        "eval": resident
        + (eval_tokens + batch) * shape.hidden * dtype_bytes
        + LOGIT_ELEMENTS * 4 * 2,  # a chunk of fp32 logits and its log-probabilities
    }
    if method == "tyr":
        # the dense teacher, the live student, the largest stage's teacher top-k, and the
        # teacher's fp32 logits of 256 positions over the vocabulary (or over HEAD_ROWS of it)
        stage = min(max(settings.stage_tokens), settings.calib_tokens)
        minibatch = stage * min(settings.kl_topk, dims.vocab) * TEACHER_ENTRY_BYTES
        rows = dims.vocab if dtype_bytes == 4 else min(HEAD_ROWS, dims.vocab)
        logits = min(256, settings.seq_len) * rows * 4
        # the student: its pruned blocks (it shares the embedding and LM head with the teacher),
        # or, on a GPU, one dense block on its way there
        student = block if student_on_device else pruned_block(dims, sparsity) * dtype_bytes
        head_chunk = 0 if dtype_bytes == 4 else min(HEAD_ROWS, dims.vocab) * shape.hidden * 4
        teacher = block + dims.head * dtype_bytes + head_chunk if streamed else resident
        phases["search"] = student + teacher + minibatch + logits
    phase = max(phases, key=lambda k: phases[k])
    worker = max(v for k, v in phases.items() if k != "eval")  # rank 0 alone evaluates
    host = phases[phase] + (nproc - 1) * worker + nproc * RUNTIME_OVERHEAD_BYTES
    return phases[phase] + RUNTIME_OVERHEAD_BYTES, phase, host


def workdir_bytes(
    dims: Dims,
    settings: Sizes,
    method: str,
    dtype_bytes: int,
    supernet: int,
    teacher: int,
    offload: str,
    eval_offload: str,
    weights: str,
    device: str = "cpu",
) -> int:
    """The work directory at its fullest: one iteration's supernet at a time (a finished
    iteration keeps only its genome), the teacher cache, and the activations that are
    offloaded: the calibration states and, where they wait on disk, the MLP intermediates
    during a build; the held-out states during the perplexity. `--method uniform` with the
    weights on disk writes each changed block there as well."""
    shape = dims.shape
    z_at = _intermediates(method, offload, weights, device)
    width = (shape.hidden if offload == "disk" else 0) + (shape.intermediate if z_at == "disk" else 0)
    calib = settings.calib_tokens * width
    heldout = settings.eval_tokens * shape.hidden if eval_offload == "disk" else 0
    spilled = dims.block * dtype_bytes if method == "uniform" and weights == "disk" else 0
    return supernet + teacher + spilled + max(calib, heldout) * dtype_bytes


# ---------------------------------------------------------------------------------------------
# GPUs: memory and time per process, from the accelerator's datasheet figures.


@dataclass(frozen=True)
class Accelerator:
    """Datasheet figures of one device as torch sees it (one GCD of an MI250)."""

    name: str
    bf16: float  # dense tensor FLOP/s in bfloat16
    fp32: float  # FLOP/s in float32 without TF32 (tyr keeps TF32 off)
    memory: float  # bytes
    link: float  # host-to-device bytes/s that pageable copies reach (PCIe)


GPUS: dict[str, Accelerator] = {
    "h100": Accelerator("NVIDIA H100 SXM 80 GB", 989e12, 67e12, 80e9, 20e9),
    "h200": Accelerator("NVIDIA H200 SXM 141 GB", 989e12, 67e12, 141e9, 20e9),
    "a100": Accelerator("NVIDIA A100 SXM 80 GB", 312e12, 19.5e12, 80e9, 12e9),
    "a100-40": Accelerator("NVIDIA A100 40 GB", 312e12, 19.5e12, 40e9, 12e9),
    "l40s": Accelerator("NVIDIA L40S 48 GB", 362e12, 91.6e12, 48e9, 12e9),
    "rtx4090": Accelerator("NVIDIA RTX 4090 24 GB", 165e12, 82.6e12, 24e9, 12e9),
    "mi250": Accelerator("AMD MI250 (one GCD, 64 GB)", 181e12, 23.9e12, 64e9, 12e9),
    "mi300x": Accelerator("AMD MI300X 192 GB", 1307e12, 163e12, 192e9, 20e9),
}
# Fraction of the peak FLOP/s that tyr's forwards and solves are assumed to reach on a GPU, and
# the local disk's read/write rate for offloaded activations: assumptions, not measurements
# (no GPU run of tyr has calibrated them yet; docs/architecture.md §3.3 says how to).
GPU_EFFICIENCY = 0.4
DISK_BYTES_PER_S = 2e9
CUDA_CONTEXT_BYTES = 500_000_000
STUDENT_GPU_FRACTION = 0.8  # tyr.search.fitness: a student above it streams its blocks


def student_on_gpu(dims: Dims, dtype_bytes: int, gpu: Accelerator) -> bool:
    """Whether the search's student lives on the GPU: a copy of the model would take at most
    80 % of the GPU's memory (tyr.search.fitness; else its blocks stream through the GPU)."""
    return dims.total * dtype_bytes <= STUDENT_GPU_FRACTION * gpu.memory


def gpu_memory(
    dims: Dims,
    settings: Sizes,
    method: str,
    dtype_bytes: int,
    on_gpu: bool,
    weights: str,
    sparsity: float = 0.5,
) -> tuple[int, str]:
    """(bytes, phase) of the largest GPU-memory phase of one process. Local pruning: one block
    and copies of its two consumers, both fp32 Gram matrices, the fp32 solver's H_d⁻¹ (and its
    working copy with the weights in memory), W, G, Ŵ and the propagation weight in fp32, one
    batch's activations through the block. Search: the student (the embedding and LM head, and
    its pruned blocks when it fits, else one block at a time), one streamed
    teacher block, the largest stage's hidden states, one batch's teacher top-k (the stage's
    wait in host memory) and a chunk of logits.
    Eval: one block, one batch's states and a chunk of logits."""
    shape = dims.shape
    block = dims.block // shape.n_layers * dtype_bytes
    batch = settings.batch_size * settings.seq_len
    attn_in = shape.n_q * shape.head_dim
    n_in = max(shape.intermediate, attn_in)
    consumers = (attn_in + shape.intermediate) * shape.hidden * dtype_bytes
    copy = 4 if method == "tyr" and weights == "memory" else 0
    solver = (attn_in**2 + shape.intermediate**2) * 4 + n_in**2 * (4 + copy) + 4 * n_in * shape.hidden * 4
    working = batch * (4 * shape.hidden + 3 * shape.intermediate) * dtype_bytes
    logits = LOGIT_ELEMENTS * 4 * 2
    phases = {
        "prune": block + consumers + solver + working,
        "eval": block + batch * shape.hidden * dtype_bytes * 2 + logits,
    }
    if method == "tyr":
        embed_head = (dims.embed + (0 if dims.tied else dims.head)) * dtype_bytes
        pruned = pruned_block(dims, sparsity) * dtype_bytes
        student = embed_head + (pruned if on_gpu else block)
        stage = min(max(settings.stage_tokens), settings.calib_tokens)
        topk = batch * min(settings.kl_topk, dims.vocab) * TEACHER_ENTRY_BYTES  # one batch's
        states = stage * shape.hidden * dtype_bytes
        phases["search"] = student + block + states + topk + logits + working
    phase = max(phases, key=lambda k: phases[k])
    return phases[phase] + CUDA_CONTEXT_BYTES, phase


def gpu_runtime(
    dims: Dims,
    settings: Sizes,
    sparsity: float,
    method: str,
    kept: float,
    cache: str,
    dtype_bytes: int,
    gpu: Accelerator,
    nproc: int,
    offload: str,
    on_gpu: bool,
    weights: str = "memory",
) -> dict[str, float]:
    """Seconds per phase with `nproc` processes, one GPU each: FLOPs at GPU_EFFICIENCY of the
    peak (forwards in the model dtype, solves in fp32 at LOCAL_SOLVE_FACTOR FLOP units each),
    plus the copies between host and GPU (activations each pass, streamed blocks) and, with the
    activations offloaded, the disk's reads and writes. The calibration forwards, the levels'
    solves and the offspring are divided between the processes; the disk (one per node) is
    not; nor is the teacher when it fills a disk cache (recomputed per minibatch, its sequences
    are divided too)."""
    shape, L = dims.shape, dims.shape.n_layers
    flops = (gpu.bf16 if dtype_bytes == 2 else gpu.fp32) * GPU_EFFICIENCY
    solve_rate = gpu.fp32 * GPU_EFFICIENCY
    block = dims.block // L * dtype_bytes
    hidden = settings.calib_tokens * shape.hidden * dtype_bytes
    recompute = _intermediates(method, offload, weights, "cuda") == "recompute"

    def local(candidates: list[tuple[str, list[int]]]) -> float:
        per_token = streaming_flops_per_token(shape, settings.seq_len, dims.block)
        if recompute:
            per_token += 2 * dims.block + attention_score_flops(shape, settings.seq_len)
        stream = settings.calib_tokens * per_token / flops / nproc
        solves = sum(len(u) * local_solve_units(shape, k) for k, u in candidates)
        levels = max(len(u) for _, u in candidates)
        solve = LOCAL_SOLVE_FACTOR * solves / solve_rate / min(nproc, levels)
        # per block: the Gram passes and the update read the states 3 times and write them once
        link = L * (4 * hidden / nproc + block) / gpu.link
        disk = L * 4 * hidden / DISK_BYTES_PER_S if offload == "disk" else 0.0
        return stream + solve + link + disk

    prune = supernet = search = 0.0
    if method == "tyr":
        supernet = sum(
            local(candidate_units(shape, sparsity, t, settings.levels))
            for t in range(1, settings.iterations + 1)
        )
        topk = min(settings.kl_topk, dims.vocab)
        student_tokens = settings.iterations * settings.generations * search_tokens_per_generation(settings)
        teacher = teacher_tokens(settings, cache)
        batch = settings.batch_size * settings.seq_len
        student_s = (
            student_tokens * forward_flops(dims, settings.seq_len, kept, head_rows=topk) / flops / nproc
        )
        # recomputed per minibatch, the teacher's sequences are dealt between the processes;
        # a disk cache is filled by every process
        teachers = nproc if cache == "none" else 1
        teacher_s = teacher * forward_flops(dims, settings.seq_len) / flops / teachers
        # every teacher forward (one sequence) streams the dense blocks; so does a student
        # forward (one batch) when the student does not fit the GPU
        moved = -(-teacher // settings.seq_len) * dims.block * dtype_bytes / teachers
        if not on_gpu:
            moved += -(-student_tokens // batch) * pruned_block(dims, sparsity) * dtype_bytes / nproc
        search = student_s + teacher_s + moved / gpu.link
    else:
        prune = local(candidate_units(shape, sparsity, 1, 1))
    evaluation = (
        settings.eval_tokens
        * (forward_flops(dims, settings.seq_len) + forward_flops(dims, settings.seq_len, kept))
        / flops
        + 2 * 2 * L * settings.eval_tokens * shape.hidden * dtype_bytes / gpu.link
    )
    return _seconds(prune, supernet, search, evaluation)


def _seconds(prune: float, supernet: float, search: float, evaluation: float) -> dict[str, float]:
    total = prune + supernet + search + evaluation
    phases = {"prune": prune, "supernet": supernet, "search": search, "eval": evaluation, "total": total}
    return {k: round(v, 1) for k, v in phases.items()}


def _gpu_basis(gpu: Accelerator, nproc: int) -> str:
    return (
        f"GPU estimate for {nproc} process(es) on {gpu.name} each: forwards and solves at "
        f"{GPU_EFFICIENCY:.0%} of the datasheet peak ({gpu.bf16 / 1e12:.0f} TFLOP/s bf16, "
        f"{gpu.fp32 / 1e12:.1f} TFLOP/s fp32), host-GPU copies at {gpu.link / 1e9:.0f} GB/s, "
        f"offloaded activations at {DISK_BYTES_PER_S / 1e9:.0f} GB/s of disk. Not calibrated by a "
        "measured GPU run."
    )


# ---------------------------------------------------------------------------------------------
# The estimate.


def _runtime(
    dims: Dims, settings: Sizes, sparsity: float, method: str, kept: float, cache: str
) -> dict[str, float]:
    threads = max(1, torch.get_num_threads())
    rate = FORWARD_FLOPS_PER_S_2T * threads / REFERENCE["threads"]
    prune = supernet = search = 0.0
    if method == "tyr":
        supernet = sum(
            local_pruning_seconds(
                dims, settings, candidate_units(dims.shape, sparsity, t, settings.levels), rate
            )
            for t in range(1, settings.iterations + 1)
        )
        search = search_seconds(dims, settings, kept, rate, cache)
    else:  # one candidate per sub-layer, at the uniform centre
        centre = candidate_units(dims.shape, sparsity, 1, 1)
        prune = local_pruning_seconds(dims, settings, centre, rate)
    evaluation = eval_seconds(dims, settings, kept, rate)
    return _seconds(prune, supernet, search, evaluation)


def _basis(threads: int) -> str:
    return (
        f"CPU estimate for {threads} thread(s), scaled linearly from a measured reference run "
        "(embedded SmolLM2-135M, S=0.5, preset quick, 2 CPU cores: supernet 783 s, search 740 s): "
        f"forward work at {FORWARD_FLOPS_PER_S_2T / 1e9:.0f} GFLOP/s per 2 threads, local solves at "
        f"{LOCAL_SOLVE_FACTOR} x (n_in^3 + n_in^2*hidden) FLOP units each; a GPU is much faster. "
        "Preset sizes are nominal (a shorter calibration or held-out source is clipped); "
        "eval includes the dense perplexity, cached after the first run."
    )


def estimate(
    model: str | None,
    sparsity: float,
    *,
    preset: str = "auto",
    method: str = "tyr",
    dtype: str = "float32",
    teacher_cache: str = "auto",
    offload: str = "auto",
    memory_budget: float | None = None,
    weights: str = "auto",
    sizes: dict[str, Any] | None = None,
    no_eval: bool = False,
    ffn_unit: int = 1,
    device: str = "cpu",
    gpu: str = "h100",
    nproc: int = 1,
) -> dict[str, Any]:
    """Estimates for pruning `model` (None = the embedded default, a directory holding
    config.json, a config.json file, or a hub id / .gguf as `tyr prune` takes) to `sparsity`;
    see the module docstring for the keys. `sizes` overrides the preset's sizes as `tyr prune`'s
    options of the same names do (calib_tokens, seq_len, iterations, ...); `no_eval` as
    `--no-eval` (no perplexities). `device` cuda: the run on `nproc` processes with one GPU
    of the kind `gpu` (a key of :data:`GPUS`) each. Raises UserError for bad input or an
    unsupported family."""
    if gpu not in GPUS:
        raise UserError(f"unknown GPU {gpu!r}", "choose one of " + ", ".join(GPUS))
    if nproc < 1:
        raise UserError(f"--nproc {nproc} is not a process count", "give 1 or more")
    extra = dict(sizes or {})
    unknown = sorted(set(extra) - {f.name for f in fields(Sizes)})
    if unknown:
        raise UserError(
            f"tyr plan cannot take {', '.join(unknown)}",
            "give sizes only: " + ", ".join(f.name for f in fields(Sizes)),
        )
    # Validates sparsity, method, preset and dtype with the messages `tyr prune` gives.
    cfg = PruneConfig(
        sparsity=sparsity,
        out="",
        model=model,
        method=method,
        preset=preset,
        dtype=dtype,
        teacher_cache=teacher_cache,
        offload=offload,
        memory_budget=memory_budget,
        weights=weights,
        ffn_unit=ffn_unit,
        device=device,
        **extra,
    )
    config, name = load_config(model)
    dims = dims_of(config)
    check_ffn_unit(ffn_unit, dims.shape.intermediate)
    dims = replace(dims, shape=replace(dims.shape, ffn_unit=ffn_unit))
    cfg, preset_name, settings = resolve_preset(cfg, dims.total)
    if no_eval:
        settings = replace(settings, eval_tokens=0)
    S, b = float(sparsity), DTYPE_BYTES[dtype]

    kept_block = pruned_block(dims, S)
    removed = dims.block - kept_block
    kept = kept_block / dims.block
    pruned_total = dims.total - removed

    prefill = prefill_flops(dims, settings.seq_len) / prefill_flops(dims, settings.seq_len, kept)
    decode = decode_params_read(dims, 0) / decode_params_read(dims, removed)

    iterations = range(1, settings.iterations + 1)
    per_iteration = [supernet_iteration_bytes(dims.shape, S, t, settings.levels, b) for t in iterations]
    tyr = method == "tyr"
    supernet = per_iteration[0] if tyr else 0
    topk = min(settings.kl_topk, dims.vocab)
    cache = teacher_cache_mode(teacher_cache, settings.calib_tokens, topk) if tyr else "none"
    teacher = settings.calib_tokens * topk * TEACHER_ENTRY_BYTES if cache == "disk" else 0
    acts = activation_bytes(settings.calib_tokens, dims.shape.hidden, dims.shape.intermediate, dtype)
    budget = memory_budget_bytes(memory_budget)
    where = offload_mode(offload, acts, budget)
    eval_acts = activation_bytes(settings.eval_tokens, dims.shape.hidden, 0, dtype)
    eval_where = offload_mode(offload, eval_acts, budget)
    weights_at = weights_mode(weights, method, dims.total * b, budget, S)
    on_gpu = device == "cuda" and student_on_gpu(dims, b, GPUS[gpu])
    ram, phase, host_ram = peak_ram(
        dims, settings, method, b, where, eval_where, weights_at, S, device, nproc, on_gpu
    )
    workdir = workdir_bytes(
        dims, settings, method, b, supernet, teacher, where, eval_where, weights_at, device
    )
    threads = max(1, torch.get_num_threads())
    shape = dims.shape
    if device == "cuda":
        accel = GPUS[gpu]
        gpu_bytes, gpu_phase = gpu_memory(dims, settings, method, b, on_gpu, weights_at, S)
        runtime = gpu_runtime(
            dims, settings, S, method, kept, cache, b, accel, nproc, where, on_gpu, weights_at
        )
        basis = _gpu_basis(accel, nproc)
        gpu_est: dict[str, Any] | None = {
            "name": gpu,
            "model": accel.name,
            "memory_bytes": gpu_bytes,
            "memory_phase": gpu_phase,
            "device_memory_bytes": int(accel.memory),
            "student_on_gpu": on_gpu,
        }
    else:
        runtime, basis, gpu_est = _runtime(dims, settings, S, method, kept, cache), _basis(threads), None
    return {
        "model": name,
        "family": dims.family,
        "sparsity": S,
        "preset": preset_name,
        "method": method,
        "dtype": dtype,
        "shape": {
            "layers": shape.n_layers,
            "hidden": shape.hidden,
            "n_q": shape.n_q,
            "n_kv": shape.n_kv,
            "head_dim": shape.head_dim,
            "intermediate": shape.intermediate,
            "vocab": dims.vocab,
            "tied": dims.tied,
        },
        "settings": {
            "calib_tokens": settings.calib_tokens,
            "seq_len": settings.seq_len,
            "eval_tokens": settings.eval_tokens,
            "batch_size": settings.batch_size,
            "iterations": settings.iterations,
            "generations": settings.generations,
            "offspring": settings.offspring,
            "stage_tokens": list(settings.stage_tokens),
            "survivors": list(settings.survivors),
            "levels": settings.levels,
            "kl_topk": settings.kl_topk,
            "threads": threads,
        },
        "params": {
            "dense_total": dims.total,
            "dense_block": dims.block,
            "pruned_total": pruned_total,
            "pruned_block": kept_block,
        },
        "disk_bytes": {"dense": dims.total * b, "pruned": pruned_total * b},
        "ideal_speedup": {"prefill": round(prefill, 4), "decode": round(decode, 4)},
        "supernet_bytes": supernet,
        "workdir_bytes": workdir,
        "teacher_cache": cache,
        "teacher_cache_bytes": teacher,
        "offload": where,
        "eval_offload": eval_where,
        "weights": weights_at,
        "activation_bytes": acts,
        "peak_ram_bytes": ram,
        "peak_ram_phase": phase,
        "device": device,
        "nproc": nproc,
        "host_ram_bytes": host_ram,
        "gpu": gpu_est,
        "runtime_s": runtime,
        "runtime_basis": basis,
    }


# ---------------------------------------------------------------------------------------------
# Text.


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def format_plan(est: dict[str, Any]) -> str:
    """A short markdown table of an :func:`estimate` result, with units (decimal GB/MB)."""
    p, disk, speed, rt = est["params"], est["disk_bytes"], est["ideal_speedup"], est["runtime_s"]
    st = est["settings"]
    tyr = est["method"] == "tyr"
    rows = [
        ("parameters", fmt_params(p["dense_total"]), fmt_params(p["pruned_total"])),
        ("decoder-block parameters", fmt_params(p["dense_block"]), fmt_params(p["pruned_block"])),
        (f"disk ({est['dtype']})", fmt_bytes(disk["dense"]), fmt_bytes(disk["pruned"])),
        (f"ideal prefill speedup (seq {st['seq_len']})", "1.00x", f"{speed['prefill']:.2f}x"),
        ("ideal decode speedup", "1.00x", f"{speed['decode']:.2f}x"),
    ]
    lines = [
        f"tyr plan: {est['model']} ({est['family']}), sparsity {est['sparsity']:g}, "
        f"method {est['method']}, preset {est['preset']}",
        "",
        "| quantity | dense | pruned |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        "| cost | estimate |",
        "|---|---|",
    ]
    costs = []
    if tyr:
        costs += [
            ("supernet on disk (one iteration)", fmt_bytes(est["supernet_bytes"])),
            (
                "teacher cache",
                fmt_bytes(est["teacher_cache_bytes"])
                if est["teacher_cache"] == "disk"
                else "none (top-k recomputed per minibatch)",
            ),
            (
                f"work directory at its fullest ({st['iterations']} iterations)",
                fmt_bytes(est["workdir_bytes"]),
            ),
        ]
    where = "in memory" if est["offload"] == "cpu" else "on disk"
    blocks = "whole" if est["weights"] == "memory" else "block by block"
    n = est["nproc"]
    each = " of rank 0" if n > 1 else ""
    ram = f"peak RAM{each} ({est['peak_ram_phase']} phase, activations {where}, weights {blocks})"
    costs.append((ram, fmt_bytes(est["peak_ram_bytes"])))
    if n > 1:
        costs.append((f"host RAM, {n} processes on one host", fmt_bytes(est["host_ram_bytes"])))
    g = est["gpu"]
    if g is not None:
        student = "on the GPU" if g["student_on_gpu"] else "streamed block by block"
        costs.append(
            (
                f"GPU memory per process ({g['memory_phase']} phase, student {student})",
                f"{fmt_bytes(g['memory_bytes'])} of {fmt_bytes(g['device_memory_bytes'])}",
            )
        )
    if tyr:
        costs += [
            ("run time: supernet", _duration(rt["supernet"])),
            ("run time: search", _duration(rt["search"])),
        ]
    else:
        costs.append(("run time: prune", _duration(rt["prune"])))
    costs += [("run time: eval", _duration(rt["eval"])), ("run time: total", _duration(rt["total"]))]
    lines += [f"| {a} | {b} |" for a, b in costs]
    lines += ["", f"Run time: {est['runtime_basis']}"]
    return "\n".join(lines)
