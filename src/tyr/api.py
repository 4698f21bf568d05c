"""`tyr.prune`: load → calibrate → prune → export → evaluate, with an atomic output directory."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyr import __version__, arch, assets, dist
from tyr.config import DATA_KEYS, PruneConfig, check_keys, int_list, resolve_preset
from tyr.data import windows
from tyr.errors import UserError
from tyr.export import modeling_sha256, save_pruned, verify_export, write_card
from tyr.modeling import LayerPlan, apply_plans, plans_metadata
from tyr.models import fingerprint, load_lazy, load_weights, open_model
from tyr.perplexity import perplexity
from tyr.search.driver import SearchOptions, search_prune
from tyr.stream import capture
from tyr.supernet import SupernetOptions
from tyr.uniform import SolverOptions, prune_uniform
from tyr.workdir import atomic_json, check_options, fsync_tree, locked, pid_alive

__all__ = ["Result", "prune"]

log = logging.getLogger("tyr")
RESULT = "result.json"
SCHEMA = "tyr.result/1"


@dataclass
class Result:
    """A finished run: where it was written and the content of its result.json."""

    path: Path
    data: dict[str, Any]

    @property
    def sparsity_achieved(self) -> float:
        return float(self.data["sparsity_achieved"])

    @property
    def ppl(self) -> dict[str, Any] | None:
        return self.data.get("ppl")


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        keys = ("load", "calibration", "prune", "supernet", "search", "export", "eval")
        self.spans: dict[str, float] = dict.fromkeys(keys, 0.0)

    def add(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.spans[name] = round(self.spans.get(name, 0.0) + now - since, 3)
        return now


def _prepare_out(cfg: PruneConfig) -> tuple[Path, Path, Result | None]:
    """Validate --out before any work; returns (out, temporary sibling, finished result or None)."""
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {cfg.out} is a file", "give a directory path")
    if out.is_dir() and any(out.iterdir()):
        done = out / RESULT
        if done.is_file() and not cfg.overwrite:
            try:
                data = json.loads(done.read_text())
            except ValueError:
                data = {}  # unreadable: not a finished result of anything
            if isinstance(data, dict) and data.get("config_identity") == cfg.identity():
                return out, out, Result(out, data)
        if not cfg.overwrite:
            raise UserError(
                f"--out {cfg.out} is not empty and does not hold this configuration's result",
                "pass --overwrite or choose another directory",
            )
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise UserError(
            f"cannot write --out {cfg.out} ({exc.strerror})", "choose a writable directory"
        ) from exc
    return out, tmp, None


def _remove_stale(out: Path) -> None:
    """Remove the temporary siblings of `out` that a killed run left behind."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _finish_out(tmp: Path, out: Path) -> None:
    fsync_tree(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _dense_ppl_cached(key_parts: dict[str, Any], compute) -> float:
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    path = assets.tyr_home() / "ppl" / f"{key}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["ppl"])
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(path, {**key_parts, "ppl": value})
    return value


def _layer_rows(meta: list[dict], shape: arch.Shape) -> list[dict[str, Any]]:
    dense_a, dense_f = shape.attn_params(shape.n_q, shape.n_kv), shape.mlp_params(shape.intermediate)
    rows = []
    for i, m in enumerate(meta):
        kept_a = shape.attn_params(len(m["kept_q"]), len(m["kept_kv"]))
        rows.append(
            {
                "index": i,
                "q_heads": len(m["kept_q"]),
                "kv_heads": len(m["kept_kv"]),
                "q_to_kv": m["q_to_kv"],
                "intermediate": m["intermediate"],
                "attn_sparsity": round(1 - kept_a / dense_a, 6),
                "mlp_sparsity": round(1 - shape.mlp_params(m["intermediate"]) / dense_f, 6),
            }
        )
    return rows


def prune(
    model: str | None = None, *, sparsity: float, out: str | os.PathLike[str], **options: Any
) -> Result:
    """Prune `model` (hub id, HF directory, .gguf; None = the embedded SmolLM2-135M) so that
    `sparsity` of its decoder-block parameters are removed; write the result to `out`.

    Options are the keys of :class:`tyr.config.PruneConfig` (the CLI flags, underscored).
    """
    cfg = PruneConfig(model=model, sparsity=sparsity, out=str(out), **check_keys(options, "prune options"))
    return run(cfg)


def run(cfg: PruneConfig, command: str | None = None) -> Result:
    """Run a validated configuration; `command` is what the model card quotes as its origin
    (the CLI passes its command line; by default the equivalent `tyr.prune(...)` call)."""
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


def _run(asked: PruneConfig, clock: _Clock, out: Path, tmp: Path, workdir: Path, command: str) -> Result:
    """The run of `asked` (the options as given; presets are resolved here), holding `workdir`.
    On a torchrun worker (rank > 0), only the shared search: no evaluation, no files."""
    t = clock.start
    main = dist.is_main()
    cfg, explicit = asked, {k for k in DATA_KEYS if getattr(asked, k) is not None}
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible", "use --device cpu")
    opened = open_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tok, spec = opened.tokenizer, opened.spec
    cfg, preset = resolve_preset(cfg, opened.param_count())
    centres = _read_genome(cfg.genome, opened.config) if cfg.genome and cfg.method == "tyr" else None
    assert cfg.calib_tokens and cfg.seq_len and cfg.eval_tokens and cfg.batch_size
    seq_len = min(cfg.seq_len, int(getattr(opened.config, "max_position_embeddings", cfg.seq_len)))
    if seq_len < cfg.seq_len and "seq_len" in explicit:
        raise UserError(
            f"--seq-len {cfg.seq_len} exceeds the model's context of {seq_len} positions",
            f"give --seq-len {seq_len} or less",
        )
    if seq_len < cfg.seq_len:
        log.warning("seq_len %d exceeds the model's %d positions; using %d", cfg.seq_len, seq_len, seq_len)
    if dist.world() > 1 and main:
        log.info("%d processes share the supernet solves and the search", dist.world())
    t = clock.add("load", t)

    # Data first: a bad source fails before any weights are read.
    calib = windows(
        cfg.calib,
        "calib",
        tok,
        cfg.calib_tokens,
        seq_len,
        "calib_tokens" in explicit,
        cfg.seed if cfg.calib_sample == "random" else None,
    )
    heldout = None
    if not cfg.no_eval and main:
        heldout = windows(
            cfg.eval_data, "heldout", tok, cfg.eval_tokens, seq_len, "eval_tokens" in explicit, None
        )
    t = clock.add("calibration", t)

    # The uniform prune reads one block at a time from the checkpoint; the search holds the model.
    spill = workdir / "stream"
    shutil.rmtree(spill, ignore_errors=True)  # what a killed uniform run left
    model = load_lazy(opened, getattr(torch, cfg.dtype), spill) if cfg.method == "uniform" and main else None
    if model is None:
        model = load_weights(opened, getattr(torch, cfg.dtype))
    shape = arch.shape_of(model, spec)
    dense_block, dense_total = arch.count_block_params(model, spec), arch.count_total_params(model)
    if main:
        check_options(workdir, asked.work_options(), record=True)
    log.info(
        "model %s: %d blocks, %d q / %d kv heads, d_ff %d; %.1fM block params; preset %s",
        opened.name,
        shape.n_layers,
        shape.n_q,
        shape.n_kv,
        shape.intermediate,
        dense_block / 1e6,
        preset,
    )
    t = clock.add("load", t)

    ppl: dict[str, Any] | None = None
    if heldout is not None:
        key = {
            "model": fingerprint(model),
            "source": cfg.eval_data,
            "tokens": heldout.numel(),
            "seq_len": seq_len,
            "dtype": cfg.dtype,
            "metric": "ppl/1",
        }
        dense_ppl = _dense_ppl_cached(
            key,
            lambda: perplexity(
                model, spec, heldout, batch_size=cfg.batch_size, device=cfg.device, desc="dense perplexity"
            ),
        )
        ppl = {"source": cfg.eval_data, "tokens": heldout.numel(), "seq_len": seq_len, "dense": dense_ppl}
        t = clock.add("eval", t)

    search_log: list[dict[str, Any]] | None = None
    if not main and cfg.method != "tyr":
        return Result(out, {})  # the uniform prune is not shared; rank 0 does it alone
    if cfg.method == "tyr":
        plans, search_log = _search(cfg, model, spec, shape, calib, workdir, centres)
        if not main:
            return Result(out, {})
        supernet_s = sum(r["supernet_seconds"] for r in search_log)
        clock.spans["supernet"] = round(supernet_s, 3)
        clock.spans["search"] = round(time.perf_counter() - t - supernet_s, 3)
        t = time.perf_counter()
    else:
        inputs = capture(model, spec, list(calib.split(cfg.batch_size)), cfg.device, cfg.offload, workdir)
        t = clock.add("calibration", t)
        try:
            opt = SolverOptions(
                saliency=cfg.saliency, schedule=cfg.schedule, gqa=cfg.gqa, solver=cfg.solver, damp=cfg.damp
            )
            plans = prune_uniform(model, spec, shape, inputs, cfg.sparsity, opt, cfg.device)
        finally:
            inputs.close()
        t = clock.add("prune", t)

    apply_plans(model, plans, spec, shape)
    pruned_block, pruned_total = arch.count_block_params(model, spec), arch.count_total_params(model)
    save_pruned(model, tok, plans, shape, tmp)
    verify_export(model, tmp, calib[:1, : min(64, seq_len)])
    t = clock.add("export", t)

    if ppl is not None and heldout is not None:
        ppl["pruned"] = perplexity(
            model, spec, heldout, batch_size=cfg.batch_size, device=cfg.device, desc="pruned perplexity"
        )
        t = clock.add("eval", t)

    clock.spans["total"] = round(time.perf_counter() - clock.start, 3)
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "tyr_version": __version__,
        "model": opened.name,
        "method": cfg.method,
        "sparsity_target": cfg.sparsity,
        "sparsity_achieved": round(1 - pruned_block / dense_block, 6),
        "params": {
            "dense_block": dense_block,
            "pruned_block": pruned_block,
            "dense_total": dense_total,
            "pruned_total": pruned_total,
        },
        "layers": _layer_rows(plans_metadata(plans, shape), shape),
        "ppl": ppl,
        **({"search": {"iterations": search_log}} if search_log is not None else {}),
        "timings": clock.spans,
        "config": {
            **cfg.to_dict(),
            "seq_len": seq_len,
            "calib_tokens": int(calib.numel()),
            "eval_tokens": int(heldout.numel()) if heldout is not None else 0,
            "preset_resolved": preset,
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
    write_card(tmp, data, command, opened.provenance())
    atomic_json(tmp / RESULT, data, indent=2)
    _finish_out(tmp, out)
    shutil.rmtree(spill, ignore_errors=True)
    return Result(out, data)


def _search(
    cfg: PruneConfig,
    model: nn.Module,
    spec: arch.ArchSpec,
    shape: arch.Shape,
    calib: torch.Tensor,
    workdir: Path,
    centres: dict[str, list[int]] | None,
) -> tuple[list[LayerPlan | None], list[dict[str, Any]]]:
    """The global search (--method tyr), or one given genome (`centres`); stage sizes are
    clipped to the calibration pool."""
    pool = calib.numel()
    stages = int_list(cfg.stage_tokens)
    if max(stages) > pool:
        log.warning("selection stages %s exceed the %d calibration tokens; clipping", stages, pool)
        stages = tuple(min(s, pool) for s in stages)
    assert cfg.iterations and cfg.generations and cfg.offspring and cfg.kl_topk
    if centres is not None:
        log.info("applying the genome of %s: one supernet level per sub-layer, no search", cfg.genome)
    opt = SearchOptions(
        iterations=1 if centres else cfg.iterations,
        generations=cfg.generations,
        offspring=cfg.offspring,
        stage_tokens=stages,
        survivors=int_list(cfg.survivors),
        levels=1 if centres else cfg.levels,
        kl_topk=cfg.kl_topk,
        seed=cfg.seed,
        supernet=SupernetOptions(
            saliency=cfg.saliency,
            schedule=cfg.schedule,
            gqa=cfg.gqa,
            damp=cfg.damp,
            accumulation=cfg.accumulation,
        ),
    )
    identity = {
        "model": fingerprint(model),
        "calib": hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
        "sparsity": cfg.sparsity,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
    }
    return search_prune(
        model,
        spec,
        shape,
        cfg.sparsity,
        calib,
        opt,
        workdir,
        identity,
        device=cfg.device,
        batch_size=cfg.batch_size or 8,
        offload=cfg.offload,
        centres=centres,
    )


def _read_genome(path: str, config: Any) -> dict[str, list[int]]:
    """Units removed per block from `--genome`: {"attn": [...], "mlp": [...]} (attention in query
    heads), or a tyr result.json (its final search genome, or its per-layer widths). Checked
    against the model's config before any work."""
    L, n_q, d_ff = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    need = (
        f'give {{"attn": [{L} head counts 0..{n_q}], "mlp": [{L} neuron counts 0..{d_ff}]}}'
        " or a tyr result.json"
    )
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read --genome {path}: {exc}", "give a JSON file") from exc
    try:
        if isinstance(data, dict) and data.get("search"):
            last = data["search"]["iterations"][-1]
            steps = {"attn": last["step_attn"], "mlp": last["step_mlp"]}
            counts = [
                c + k * steps["attn" if i % 2 == 0 else "mlp"]
                for i, (c, k) in enumerate(zip(last["centres"], last["genome"], strict=True))
            ]
            genome = {"attn": counts[0::2], "mlp": counts[1::2]}
        elif isinstance(data, dict) and data.get("layers"):
            genome = {
                "attn": [n_q - r["q_heads"] for r in data["layers"]],
                "mlp": [d_ff - r["intermediate"] for r in data["layers"]],
            }
        else:
            genome = data
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(f"--genome {path} is a damaged tyr result ({exc!r})", need) from exc
    if not isinstance(genome, dict):
        raise UserError(f"--genome {path} is not a genome for this model", need)
    for key, n in (("attn", n_q), ("mlp", d_ff)):
        values = genome.get(key)
        if not isinstance(values, list) or len(values) != L:
            raise UserError(f"--genome {path}: {key!r} is not a list of {L} integers (one per block)", need)
        for b, x in enumerate(values):
            if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= n:
                raise UserError(f"--genome {path}: {key}[{b}] = {x!r} is outside 0..{n}", need)
    return {"attn": list(genome["attn"]), "mlp": list(genome["mlp"])}


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"
