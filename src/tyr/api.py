"""`tyr.prune`: load → calibrate → prune → export → evaluate, with an atomic output directory."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyr import __version__, arch, record
from tyr.budget import Shape, Widths
from tyr.config import (
    DTYPE_BYTES,
    PruneConfig,
    Sizes,
    activation_bytes,
    check_ffn_unit,
    check_keys,
    offload_mode,
    resolve_preset,
    weights_mode,
)
from tyr.data import windows
from tyr.errors import UserError
from tyr.eval import cached_ppl, perplexity
from tyr.export import (
    QUANTS,
    GGUFSummary,
    gguf_refusal,
    modeling_sha256,
    save_pruned,
    verify_export,
    write_card,
    write_gguf,
)
from tyr.heal import run_heal
from tyr.infra import assets, check_options, dist, finish_out, locked, memory_budget_bytes, prepare_out
from tyr.loader import Opened, fingerprint, load, load_lazy, load_weights, open_model, resolve, source_gguf
from tyr.methods import SearchOptions, SolverOptions, prune_uniform, read_genome, search_prune
from tyr.modeling import LayerPlan, apply_plans, plans_metadata
from tyr.record import Result
from tyr.report import load_config
from tyr.stream import LazyModel, capture
from tyr.supernet import SupernetOptions

__all__ = ["Result", "prune"]

log = logging.getLogger("tyr")


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        keys = ("load", "calibration", "prune", "supernet", "search", "export", "eval")
        self.spans: dict[str, float] = dict.fromkeys(keys, 0.0)

    def add(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.spans[name] = round(self.spans.get(name, 0.0) + now - since, 3)
        return now


def prune(
    model: str | None = None, *, sparsity: float, out: str | os.PathLike[str], **options: Any
) -> Result:
    """Prune `model` (hub id, HF directory, .gguf; None = the embedded SmolLM2-135M) so that
    `sparsity` of its decoder-block parameters are removed; write the result to `out`.

    Options are the keys of :class:`tyr.config.PruneConfig` (the CLI flags, underscored).
    """
    cfg = PruneConfig(model=model, sparsity=sparsity, out=str(out), **check_keys(options, "prune options"))
    return run(cfg)


def export_gguf(
    model: str | os.PathLike[str] | None, dest: str | os.PathLike[str], *, quant: str = "f16"
) -> GGUFSummary:
    """Write a model as GGUF for llama.cpp: the --out directory of tyr prune, or a dense model
    (HF directory, .gguf, hub id; None = the embedded SmolLM2-135M) for the baseline. The
    tokenizer comes verbatim from the GGUF the model was dequantized from, when there is one."""
    directory = Path(model).expanduser() if model is not None else None
    name = str(model) if model is not None else None
    if directory is not None and (directory / record.FILE).is_file():
        name = record.read(directory)["config"]["model"]
    else:
        resolved = resolve(name)
        if not isinstance(resolved, Path):
            raise UserError(f"{model} is not a local model", "download it first, or pass a directory")
        directory = resolved
    weights = load(directory)
    label = directory.name if model is not None else "SmolLM2-135M-Instruct"
    summary = write_gguf(
        weights, Path(dest), quant=quant, tokenizer_dir=directory, source_gguf=source_gguf(name), name=label
    )
    if (directory / record.FILE).is_file():
        record.add_gguf(directory, export=summary.as_dict())
    return summary


def _prepare_out(cfg: PruneConfig) -> tuple[Path, Path, Result | None]:
    """Validate --out before any work; returns (out, temporary sibling, finished result or None)."""
    out, tmp, done = prepare_out(cfg.out, cfg.overwrite, lambda o: record.read_if_finished(o, cfg.identity()))
    return out, tmp, None if done is None else Result(out, dict(done))


def run(cfg: PruneConfig, command: str | None = None) -> Result:
    """Run a validated configuration; `command` is what the model card quotes as its origin
    (the CLI passes its command line; by default the equivalent `tyr.prune(...)` call). With
    `heal`, the pruned result is then healed (docs/healing.md) into `heal_out`, and the
    returned result is the healed one."""
    if cfg.gguf is not None:
        _check_gguf(cfg, cfg.gguf)
    result = _run_prune(cfg, command)
    heal = cfg.heal_config()
    if not result.data:  # a torchrun worker: rank 0 heals and exports
        return result
    if heal is not None:
        log.info("pruned model written to %s; healing it into %s", result.path, heal.out)
        result = run_heal(heal)
    if cfg.gguf is not None:
        summary = export_gguf(result.path, cfg.gguf, quant=cfg.gguf_quant)
        log.info(
            "GGUF for llama.cpp written to %s (%s, %d bytes)",
            summary.path,
            summary.quant,
            summary.bytes,
        )
    return result


def _check_gguf(cfg: PruneConfig, gguf: str) -> None:
    """Refuse `--gguf` before any work when the quantization or the model's family cannot be
    written (docs/serving.md), rather than after the prune."""
    if cfg.gguf_quant not in QUANTS:
        raise UserError(f"gguf_quant={cfg.gguf_quant!r} is not valid", f"choose one of {', '.join(QUANTS)}")
    dest = Path(gguf).expanduser()
    if dest.is_dir() or not dest.parent.is_dir():
        raise UserError(f"--gguf {gguf} is not a file in an existing directory", "name a .gguf file")
    why = gguf_refusal(load_config(cfg.model)[0])  # the config alone, no weights
    if why is not None:
        raise UserError(
            f"this model cannot be written as GGUF: {why}", "drop --gguf; serve it with transformers"
        )


def _run_prune(cfg: PruneConfig, command: str | None) -> Result:
    clock = _Clock()
    dist.setup(cfg.device)
    # Every rank reads the same work directory (on several nodes: a shared filesystem).
    home = assets.tyr_home() / "runs" / cfg.work_identity()
    workdir = Path(cfg.workdir).expanduser() if cfg.workdir else home
    if not dist.is_main():  # a torchrun worker: shares the search, writes nothing
        try:
            if dist.share():  # rank 0 has checked --out and holds the work directory
                return _run(cfg, clock, Path(cfg.out), Path(cfg.out), workdir, command or "")
            return Result(Path(cfg.out), {})
        finally:
            dist.teardown()
    out, tmp, done = _prepare_out(cfg)
    if done is not None:
        log.info("%s already holds this result; nothing to do", out)
        dist.share(False)
        dist.teardown()
        return done
    try:
        with locked(workdir):
            check_options(workdir, cfg.work_options(), record=False)
            dist.share(True)
            return _run(cfg, clock, out, tmp, workdir, command or cfg.api_call())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        dist.teardown()


@dataclass
class _Opened:
    """The model as opened (config and tokenizer, no weights) and the run's resolved sizes."""

    opened: Opened
    cfg: PruneConfig  # preset resolved: every size set
    sizes: Sizes
    preset: str
    seq_len: int  # cfg.seq_len clipped to the model's context
    widths: Widths | None  # --genome: widths kept per block
    params: int  # the dense model's parameters, counted once on the meta device


def _run(asked: PruneConfig, clock: _Clock, out: Path, tmp: Path, workdir: Path, command: str) -> Result:
    """The run of `asked` (the options as given; presets are resolved here), holding `workdir`.
    On a torchrun worker (rank > 0), only the shared search: no evaluation, no files."""
    run = _open(asked)
    cfg, spec = run.cfg, run.opened.spec
    t = clock.add("load", clock.start)
    calib, heldout = _data(run, asked)
    t = clock.add("calibration", t)
    model, lazy = _weights(run, workdir)
    shape = replace(arch.shape_of(model, spec), ffn_unit=cfg.ffn_unit)
    dense_block, dense_total = arch.count_block_params(model, spec), arch.count_total_params(model)
    if dist.is_main():
        check_options(workdir, asked.work_options(), record=True)
    _log_model(run, shape, dense_block)
    clock.add("load", t)
    ppl = _dense_ppl(run, model, lazy, heldout, shape, workdir, clock) if heldout is not None else None

    plans, search_log = _prune(run, model, lazy, shape, calib, workdir, clock)
    if not dist.is_main():
        shutil.rmtree(_spill_dir(workdir), ignore_errors=True)
        return Result(out, {})

    t = time.perf_counter()
    apply_plans(model, plans, spec, shape, lazy)
    pruned_block, pruned_total = arch.count_block_params(model, spec), arch.count_total_params(model)
    save_pruned(model, run.opened.tokenizer, plans, shape, tmp, lazy=lazy)
    verify_export(model, tmp, calib[:1, : min(64, run.seq_len)], lazy)
    t = clock.add("export", t)
    if ppl is not None and heldout is not None:
        ppl["pruned"] = _perplexity(run, model, lazy, heldout, shape, workdir, "pruned perplexity")
        clock.add("eval", t)

    clock.spans["total"] = round(time.perf_counter() - clock.start, 3)
    data: record.Record = {
        "schema": record.SCHEMA,
        "tyr_version": __version__,
        "model": run.opened.name,
        "method": cfg.method,
        "sparsity_target": cfg.sparsity,
        "sparsity_achieved": round(1 - pruned_block / dense_block, 6),
        "params": {
            "dense_block": dense_block,
            "pruned_block": pruned_block,
            "dense_total": dense_total,
            "pruned_total": pruned_total,
        },
        "layers": record.layer_rows(plans_metadata(plans, shape), shape),
        "ppl": ppl,
        **({"search": {"iterations": search_log}} if search_log is not None else {}),  # type: ignore[typeddict-item]
        "timings": clock.spans,
        "config": {
            **cfg.to_dict(),
            "seq_len": run.seq_len,
            "calib_tokens": int(calib.numel()),
            "eval_tokens": int(heldout.numel()) if heldout is not None else 0,
            "preset_resolved": run.preset,
        },
        "config_identity": asked.identity(),
        "command": command,
        "modeling_sha256": modeling_sha256(),
        "seed": cfg.seed,
        "machine": {
            "cpus": os.cpu_count() or 1,
            "device": _device_name(cfg.device),
            "processes": dist.world(),
        },
    }
    write_card(tmp, dict(data), command, run.opened.provenance())
    record.write(tmp, data)
    finish_out(tmp, out)
    shutil.rmtree(_spill_dir(workdir), ignore_errors=True)
    return Result(out, dict(data))


def _open(asked: PruneConfig) -> _Opened:
    """Open the model (config and tokenizer), resolve the preset, check --genome and --seq-len
    against the model before any work."""
    if asked.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible", "use --device cpu")
    opened = open_model(asked.model, trust_remote_code=asked.trust_remote_code)
    params = opened.param_count()
    cfg, preset, sizes = resolve_preset(asked, params)
    widths = read_genome(cfg.genome, opened.config, cfg.gqa) if cfg.genome and cfg.method == "tyr" else None
    check_ffn_unit(cfg.ffn_unit, int(opened.config.intermediate_size))
    seq_len = min(sizes.seq_len, int(getattr(opened.config, "max_position_embeddings", sizes.seq_len)))
    if seq_len < sizes.seq_len and asked.seq_len is not None:
        raise UserError(
            f"--seq-len {sizes.seq_len} exceeds the model's context of {seq_len} positions",
            f"give --seq-len {seq_len} or less",
        )
    if seq_len < sizes.seq_len:
        log.warning("seq_len %d exceeds the model's %d positions; using %d", sizes.seq_len, seq_len, seq_len)
    if dist.world() > 1 and dist.is_main():
        log.info("%d processes share the supernet solves and the search", dist.world())
    return _Opened(opened, cfg, sizes, preset, seq_len, widths, params)


def _data(run: _Opened, asked: PruneConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration windows, and held-out windows on rank 0 unless --no-eval. Data come before
    weights, so that a bad source fails before any weights are read."""
    cfg, tok = run.cfg, run.opened.tokenizer
    sample_seed = cfg.seed if cfg.calib_sample == "random" else None
    explicit = asked.calib_tokens is not None
    calib = windows(cfg.calib, "calib", tok, run.sizes.calib_tokens, run.seq_len, explicit, sample_seed)
    if cfg.no_eval or not dist.is_main():
        return calib, None
    explicit = asked.eval_tokens is not None
    return calib, windows(cfg.eval_data, "heldout", tok, run.sizes.eval_tokens, run.seq_len, explicit, None)


def _weights(run: _Opened, workdir: Path) -> tuple[nn.Module, LazyModel | None]:
    """The model, and its lazy state when its blocks stay on disk (`--weights`): the uniform
    prune reads one block at a time from the checkpoint, and so does the search when the model
    does not fit the memory budget; it then holds only its pruned student in memory."""
    cfg = run.cfg
    # Each process spills into its own directory: the blocks a process changes are its own.
    spill = _spill_dir(workdir)
    shutil.rmtree(spill, ignore_errors=True)  # what a killed run left
    weight_bytes = run.params * DTYPE_BYTES[cfg.dtype]
    budget = memory_budget_bytes(cfg.memory_budget)
    mode = weights_mode(cfg.weights, cfg.method, weight_bytes, budget, cfg.sparsity)
    lazy = None
    if mode == "disk" and (cfg.method == "tyr" or dist.is_main()):
        lazy = load_lazy(run.opened, getattr(torch, cfg.dtype), spill)
        if lazy is None and cfg.weights == "disk":
            raise UserError(
                f"--weights disk: {run.opened.name} cannot be read block by block",
                "it needs a local safetensors checkpoint with the modules' own tensor names;"
                " use --weights memory",
            )
    if cfg.weights == "auto" and cfg.method == "tyr":
        where = "read block by block from disk" if lazy is not None else "in memory"
        log.info("weights (%.2f GB) %s", weight_bytes / 1e9, where)
    if lazy is not None:
        return lazy.module, lazy
    return load_weights(run.opened, getattr(torch, cfg.dtype)), None


def _spill_dir(workdir: Path) -> Path:
    """Where this process writes the blocks it changes (a lazy model's spill files)."""
    return workdir / ("stream" if dist.rank() == 0 else f"stream.rank{dist.rank()}")


def _log_model(run: _Opened, shape: Shape, dense_block: int) -> None:
    log.info(
        "model %s: %d blocks, %d q / %d kv heads, d_ff %d; %.1fM block params; preset %s",
        run.opened.name,
        shape.n_layers,
        shape.n_q,
        shape.n_kv,
        shape.intermediate,
        dense_block / 1e6,
        run.preset,
    )


def _perplexity(
    run: _Opened,
    model: nn.Module,
    lazy: LazyModel | None,
    heldout: torch.Tensor,
    shape: Shape,
    workdir: Path,
    desc: str,
) -> float:
    """Held-out perplexity, its activations in memory or, past the budget, in the work directory."""
    cfg = run.cfg
    needed = activation_bytes(heldout.numel(), shape.hidden, 0, cfg.dtype)
    return perplexity(
        model,
        run.opened.spec,
        heldout,
        batch_size=run.sizes.batch_size,
        device=cfg.device,
        desc=desc,
        lazy=lazy,
        offload=_offload(cfg, needed, "held-out activations"),
        offload_root=workdir,
    )


def _dense_ppl(
    run: _Opened,
    model: nn.Module,
    lazy: LazyModel | None,
    heldout: torch.Tensor,
    shape: Shape,
    workdir: Path,
    clock: _Clock,
) -> record.Ppl:
    """The dense model's held-out perplexity, computed once per model and setting (cached)."""
    cfg, t = run.cfg, time.perf_counter()
    key = {
        "model": fingerprint(model, lazy),
        "source": cfg.eval_data,
        "tokens": heldout.numel(),
        "seq_len": run.seq_len,
        "dtype": cfg.dtype,
        "metric": "ppl/1",
    }
    dense = cached_ppl(
        key, lambda: _perplexity(run, model, lazy, heldout, shape, workdir, "dense perplexity")
    )
    clock.add("eval", t)
    return {"source": cfg.eval_data, "tokens": heldout.numel(), "seq_len": run.seq_len, "dense": dense}


def _prune(
    run: _Opened,
    model: nn.Module,
    lazy: LazyModel | None,
    shape: Shape,
    calib: torch.Tensor,
    workdir: Path,
    clock: _Clock,
) -> tuple[list[LayerPlan | None], list[dict[str, Any]] | None]:
    """The method: per-block plans and, for `tyr`, the search log. The search is shared by
    every rank; the uniform prune is rank 0's alone (the others get no plans)."""
    cfg, spec, t = run.cfg, run.opened.spec, time.perf_counter()
    needed = activation_bytes(calib.numel(), shape.hidden, shape.intermediate, cfg.dtype)
    offload = _offload(cfg, needed, "calibration activations")
    if cfg.method == "tyr":
        plans, search_log = _search(run, model, lazy, shape, calib, workdir, offload)
        supernet_s = sum(r["supernet_seconds"] for r in search_log)
        clock.spans["supernet"] = round(supernet_s, 3)
        clock.spans["search"] = round(time.perf_counter() - t - supernet_s, 3)
        return plans, search_log
    if not dist.is_main():
        return [], None
    batches = list(calib.split(run.sizes.batch_size))
    inputs = capture(model, spec, batches, cfg.device, offload, workdir, lazy=lazy)
    t = clock.add("calibration", t)
    try:
        opt = SolverOptions(
            saliency=cfg.saliency, schedule=cfg.schedule, gqa=cfg.gqa, solver=cfg.solver, damp=cfg.damp
        )
        plans = prune_uniform(model, spec, shape, inputs, cfg.sparsity, opt, cfg.device, lazy)
    finally:
        inputs.close()
    clock.add("prune", t)
    return plans, None


def _offload(cfg: PruneConfig, needed: int, what: str) -> str:
    """Where activations of `needed` bytes go (`--offload auto`: memory while they take at most
    `--memory-budget` GB, by default half of the memory available now; else the work directory)."""
    budget = memory_budget_bytes(cfg.memory_budget)
    mode = offload_mode(cfg.offload, needed, budget)
    if cfg.offload == "auto":
        where = "in memory" if mode == "cpu" else "in the work directory"
        log.info("%s (%.2f GB) %s; budget %.2f GB", what, needed / 1e9, where, budget / 1e9)
    return mode


def _search(
    run: _Opened,
    model: nn.Module,
    lazy: LazyModel | None,
    shape: Shape,
    calib: torch.Tensor,
    workdir: Path,
    offload: str,
) -> tuple[list[LayerPlan | None], list[dict[str, Any]]]:
    """The global search (--method tyr), or the genome given by --genome; stage sizes are
    clipped to the calibration pool."""
    cfg, sizes, widths = run.cfg, run.sizes, run.widths
    pool = calib.numel()
    stages = sizes.stage_tokens
    if max(stages) > pool:
        log.warning("selection stages %s exceed the %d calibration tokens; clipping", stages, pool)
        stages = tuple(min(s, pool) for s in stages)
    if widths is not None:
        log.info("applying the genome of %s: one supernet level per sub-layer, no search", cfg.genome)
    opt = SearchOptions(
        iterations=1 if widths else sizes.iterations,
        generations=sizes.generations,
        offspring=sizes.offspring,
        stage_tokens=stages,
        survivors=sizes.survivors,
        levels=1 if widths else sizes.levels,
        kl_topk=sizes.kl_topk,
        teacher_cache=cfg.teacher_cache,
        seed=cfg.seed,
        budget=cfg.budget,
        supernet=SupernetOptions(
            saliency=cfg.saliency,
            schedule=cfg.schedule,
            gqa=cfg.gqa,
            damp=cfg.damp,
            accumulation=cfg.accumulation,
        ),
    )
    identity = {
        "model": fingerprint(model, lazy),
        "calib": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
        "sparsity": cfg.sparsity,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
    }

    def searched(o: SearchOptions, root: Path, given: Widths | None) -> tuple[list[LayerPlan | None], Any]:
        spec = run.opened.spec
        return search_prune(
            model, spec, shape, cfg.sparsity, calib, o, root, identity,
            device=cfg.device, batch_size=sizes.batch_size, offload=offload, widths=given, lazy=lazy,
        )  # fmt: skip

    plans, log_rows = searched(opt, workdir, widths)
    if cfg.final_pass == "reprune" and widths is None:  # docs/algorithm.md §8: the --genome path
        log.info("final pass: pruning again at the searched widths along the chosen path")
        kept = [p for p in plans if p is not None]
        chosen = Widths(
            tuple(len(p.heads.kept_q) for p in kept),
            tuple(len(p.heads.kept_kv) for p in kept),
            tuple(len(p.kept_neurons) for p in kept),
        )
        plans, _ = searched(replace(opt, iterations=1, levels=1), workdir / "final", chosen)
    return plans, log_rows


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"
