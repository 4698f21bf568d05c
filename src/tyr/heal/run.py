"""`tyr heal`: a pruned export → distilled from its dense teacher → a healed export beside it
(docs/healing.md). The output directory is written atomically and proves itself by reloading,
as `tyr prune`'s does; the work directory holds the training state, so a killed run resumes."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tyr import arch, record
from tyr.config import HealConfig, check_keys
from tyr.data import load_text, tokenize, unused_windows, window_picks, windows
from tyr.errors import UserError
from tyr.eval import cached_ppl, evaluate, perplexity
from tyr.export import MODELING, verify_export
from tyr.heal.distill import BEST, STATE, Outcome, TrainOptions, train
from tyr.infra import assets, atomic_json, check_options, finish_out, locked, prepare_out
from tyr.loader import fingerprint, load, load_weights, open_model
from tyr.record import Result
from tyr.report import above_chance_retention, accuracies, peak_rss_bytes

__all__ = ["heal", "run_heal", "LOG_FILE"]

log = logging.getLogger("tyr")

LOG_FILE = "heal_log.json"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the kept projections (arch names)


def heal(source: str | os.PathLike[str], *, out: str | os.PathLike[str], **options: Any) -> Result:
    """Distil the pruned model in `source` (the --out of `tyr prune`) from its dense teacher and
    write the healed model to `out`. Options are the keys of :class:`tyr.config.HealConfig`."""
    cfg = HealConfig(source=str(source), out=str(out), **check_keys(options, "heal options", HealConfig))
    return run_heal(cfg)


def run_heal(cfg: HealConfig, command: str | None = None) -> Result:
    source = Path(cfg.source).expanduser()
    src = record.read(source)
    if "heal" in src:
        log.info("%s is itself healed; healing it again from its teacher", source)
    identity = cfg.identity()
    out, tmp, done = prepare_out(cfg.out, cfg.overwrite, lambda o: record.read_if_finished(o, identity))
    if done is not None:
        log.info("%s already holds this result; nothing to do", out)
        return Result(out, dict(done))
    workdir = (
        Path(cfg.workdir).expanduser() if cfg.workdir else assets.tyr_home() / "heal" / cfg.work_identity()
    )
    try:
        with locked(workdir):
            check_options(workdir, cfg.work_options(), record=False)
            data = _heal(cfg, source, src, tmp, workdir, command or _api_call(cfg))
            data["config_identity"] = identity
            record.write(tmp, data)
            finish_out(tmp, out)
            for name in (STATE, BEST):  # the training state is spent once the output is in place
                (workdir / name).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Result(out, dict(data))


def _api_call(cfg: HealConfig) -> str:
    defaults = HealConfig(source=cfg.source, out=cfg.out)
    args = [repr(cfg.source), f"out={cfg.out!r}"]
    args += [
        f"{k}={v!r}"
        for k, v in cfg.to_dict().items()
        if k not in ("source", "out") and v != getattr(defaults, k)
    ]
    return f"tyr.heal({', '.join(args)})"


def _heal(
    cfg: HealConfig, source: Path, src: record.Record, tmp: Path, workdir: Path, command: str
) -> record.Record:
    t_start = time.perf_counter()
    prune_cfg = src["config"]
    teacher_name = cfg.teacher if cfg.teacher is not None else prune_cfg.get("model")
    opened = open_model(teacher_name, trust_remote_code=bool(prune_cfg.get("trust_remote_code")))
    tok, spec = opened.tokenizer, opened.spec
    seq_len = cfg.seq_len or int(prune_cfg["seq_len"])
    context = int(getattr(opened.config, "max_position_embeddings", seq_len))
    if seq_len > context:
        raise UserError(
            f"--seq-len {seq_len} exceeds the model's context of {context}", f"give {context} or less"
        )
    train_windows, data_desc = _training_windows(cfg, prune_cfg, tok, seq_len)
    eval_source, eval_windows = _eval_windows(cfg, src, tok, seq_len)
    curve_windows = eval_windows[: max(1, cfg.curve_tokens // seq_len)]

    dtype = torch.float32
    student = load(source, dtype=dtype)
    teacher = load_weights(opened, dtype)
    if arch.count_total_params(teacher) <= arch.count_total_params(student):
        log.warning("the teacher is not larger than the student; is --teacher the dense model?")
    if _vocab(teacher) != _vocab(student):
        raise UserError(
            "the teacher's vocabulary differs from the student's", "give the dense model as --teacher"
        )
    check_options(workdir, cfg.work_options(), record=True)
    teacher.requires_grad_(False).to(cfg.device)
    student.to(cfg.device)

    def ppl_of(model: nn.Module, rows: Tensor, desc: str) -> float:
        return perplexity(model, spec, rows, batch_size=8, device=cfg.device, desc=desc)

    key = {"source": eval_source, "tokens": eval_windows.numel(), "seq_len": seq_len, "dtype": "float32"}
    dense_ppl = cached_ppl(
        {**key, "model": fingerprint(teacher), "metric": "ppl/1"},
        lambda: ppl_of(teacher, eval_windows, "dense perplexity"),
    )
    before_ppl = _recorded(src, key, "pruned") or ppl_of(student, eval_windows, "pruned perplexity")
    shots: dict[str, Any] = {}
    if cfg.zeroshot:
        shots["dense"] = evaluate(teacher, tokenizer=tok, limit=cfg.zeroshot, ppl=None, device=cfg.device)
        shots["before"] = evaluate(student, tokenizer=tok, limit=cfg.zeroshot, ppl=None, device=cfg.device)

    net, adapters = _trainable(student, spec, cfg)
    steps = max(1, cfg.tokens // (cfg.batch_size * seq_len))
    opt = TrainOptions(
        steps=steps,
        batch_size=cfg.batch_size,
        micro_batch=cfg.micro_batch,
        lr=cfg.learning_rate,
        warmup=cfg.warmup,
        weight_decay=cfg.weight_decay,
        temperature=cfg.temperature,
        kl_topk=cfg.kl_topk or None,
        lm_weight=cfg.lm_weight,
        eval_every=cfg.eval_every,
        save_every=cfg.save_every,
        seed=cfg.seed,
        device=cfg.device,
    )
    log.info(
        "healing %s: %d steps of %d × %d tokens (%s), %s, lr %.2g; teacher %s",
        source,
        steps,
        cfg.batch_size,
        seq_len,
        data_desc,
        cfg.mode,
        opt.lr,
        opened.name,
    )
    hf_student: Any = student
    if cfg.grad_checkpointing:
        hf_student.gradient_checkpointing_enable()
    outcome = train(
        net, teacher, train_windows, opt, workdir, lambda: ppl_of(student, curve_windows, "curve"), spec
    )
    if cfg.grad_checkpointing:
        hf_student.gradient_checkpointing_disable()
    if adapters is not None:
        student = adapters.merge_and_unload()
    student.requires_grad_(False).eval()

    _save(student, tok, source, tmp)
    verify_export(student, tmp, eval_windows[:1, : min(64, seq_len)].to(cfg.device))
    after_ppl = ppl_of(student, eval_windows, "healed perplexity")
    if cfg.zeroshot:
        shots["after"] = evaluate(student, tokenizer=tok, limit=cfg.zeroshot, ppl=None, device=cfg.device)
    section = _section(cfg, outcome, opt, seq_len, data_desc, opened.name, command)
    section["ppl"] = {**_ppl_key(key), "dense": dense_ppl, "before": before_ppl, "after": after_ppl}
    if shots:
        section["zeroshot"] = _zeroshot(shots)
    section["seconds"] = round(time.perf_counter() - t_start, 3)
    section["peak_rss_bytes"] = peak_rss_bytes()
    atomic_json(tmp / LOG_FILE, {"curve": outcome.curve, "best_step": outcome.best_step}, indent=2)
    _card(tmp, source, section)
    log.info("held-out perplexity %.3f → %.3f (dense %.3f)", before_ppl, after_ppl, dense_ppl)
    healed: record.Record = {**src, "heal": section}
    return healed


def _training_windows(
    cfg: HealConfig, prune_cfg: dict[str, Any], tok: Any, seq_len: int
) -> tuple[Tensor, str]:
    """The training windows, in a seeded order, and what they are. The prune's own calibration
    source loses the windows the prune calibrated on (its calibration is recomputed from the
    recorded source, tokens, sequence length, sampling and seed)."""
    source = cfg.data if cfg.data is not None else prune_cfg["calib"]
    ids = tokenize(tok, load_text(source, "calib"))
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    desc = source
    if source == prune_cfg["calib"]:
        L0 = int(prune_cfg["seq_len"])
        n_seq = int(prune_cfg["calib_tokens"]) // L0
        sampled = prune_cfg.get("calib_sample", "first") == "random"
        for w in window_picks(ids.numel() // L0, n_seq, int(prune_cfg["seed"]) if sampled else None).tolist():
            used[w * L0 : (w + 1) * L0] = True
        desc = f"{source} without the prune's {n_seq * L0:,} calibration tokens"
    rows = unused_windows(ids, seq_len, used, cfg.seed)
    need = cfg.tokens // seq_len
    if rows.shape[0] < need:
        log.warning(
            "%s holds %d training windows; the %d tokens take %.1f passes over them",
            source,
            rows.shape[0],
            cfg.tokens,
            need / rows.shape[0],
        )
    return rows, desc


def _eval_windows(cfg: HealConfig, src: record.Record, tok: Any, seq_len: int) -> tuple[str, Tensor]:
    ppl = src.get("ppl") or {}
    source = cfg.eval_data or ppl.get("source") or "wiki:heldout"
    tokens = cfg.eval_tokens or ppl.get("tokens") or 32768
    return source, windows(source, "heldout", tok, tokens, seq_len, cfg.eval_tokens is not None, None)


def _recorded(src: record.Record, key: dict[str, Any], what: str) -> float | None:
    """The source's recorded perplexity when it was measured on the same windows."""
    ppl = src.get("ppl") or {}
    same = all(ppl.get(k) == key[k] for k in ("source", "tokens", "seq_len"))
    value = ppl.get(what) if same and src.get("config", {}).get("dtype", "float32") == "float32" else None
    return float(value) if value is not None else None  # type: ignore[arg-type]


def _vocab(model: nn.Module) -> tuple[int, ...]:
    hf: Any = model
    return tuple(hf.get_output_embeddings().weight.shape)


def _ppl_key(key: dict[str, Any]) -> dict[str, Any]:
    return {k: key[k] for k in ("source", "tokens", "seq_len")}


def _trainable(student: nn.Module, spec: arch.ArchSpec, cfg: HealConfig) -> tuple[nn.Module, Any]:
    """The module to train and, in LoRA mode, the peft wrapper that merges the adapters."""
    if cfg.mode == "full":
        student.requires_grad_(True)
        return student, None
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise UserError("--mode lora needs the peft package", "pip install 'tyr-pruner[lora]'") from exc
    names = spec.names()
    suffixes = {str(names[k]).split(".")[-1] for k in LORA_TARGETS if names.get(k)}
    targets = [
        n
        for n, m in student.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in suffixes and m.in_features and m.out_features
    ]
    torch.manual_seed(cfg.seed)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft's annotation says int; floats work
        lora_dropout=0.0,
        target_modules=targets,
    )
    wrapped = get_peft_model(student, config)
    return wrapped, wrapped


def _save(student: nn.Module, tok: Any, source: Path, dest: Path) -> None:
    """The healed weights with the source's config, modeling file and tokenizer."""
    hf: Any = student
    hf.save_pretrained(dest)
    for shard in dest.glob("*.safetensors"):
        shard.chmod(0o644)
    shutil.copyfile(source / "config.json", dest / "config.json")
    shutil.copyfile(source / MODELING, dest / MODELING)
    tok.save_pretrained(dest)


def _section(
    cfg: HealConfig, outcome: Outcome, opt: TrainOptions, seq_len: int, data: str, teacher: str, command: str
) -> dict[str, Any]:
    trained = outcome.curve[-1]["step"] if outcome.curve else 0
    return {
        "source": str(Path(cfg.source).expanduser().resolve()),
        "teacher": teacher,
        "data": data,
        "mode": cfg.mode,
        "config": {**replace(cfg, lr=opt.lr).to_dict(), "seq_len": seq_len, "steps": opt.steps},
        "steps_run": trained,
        "tokens_run": trained * opt.batch_size * seq_len,
        "best_step": outcome.best_step,
        "stopped_early": outcome.stopped_early,
        "resumed_at": outcome.resumed_at,
        "train_seconds": outcome.seconds,
        "curve": outcome.curve,
        "command": command,
    }


def _zeroshot(shots: dict[str, Any]) -> dict[str, Any]:
    """Paper-7 mean and above-chance retention of the dense, pruned and healed models."""
    dense = accuracies(shots["dense"])
    out: dict[str, Any] = {"limit": shots["dense"].get("limit"), "tasks": {}}
    for what, ev in shots.items():
        out["tasks"][what] = accuracies(ev)
        out[f"paper7_{what}"] = ev.get("mean_acc_paper7")
        if what != "dense":
            out[f"above_chance_{what}"] = above_chance_retention(dense, accuracies(ev))[0]
    return out


def _card(dest: Path, source: Path, section: dict[str, Any]) -> None:
    """The source's model card with a healing section."""
    card = (source / "README.md").read_text() if (source / "README.md").is_file() else ""
    p = section["ppl"]
    lines = [
        "",
        "## Healing",
        "",
        f"Distilled from the dense teacher ({section['teacher']}) with `tyr heal`"
        f" ({section['mode']}, {section['tokens_run']:,} tokens of {section['data']}):",
        f"held-out perplexity ({p['source']}, {p['tokens']:,} tokens) dense {p['dense']:.2f},"
        f" pruned {p['before']:.2f} → healed {p['after']:.2f}.",
        "",
        "```bash",
        section["command"],
        "```",
    ]
    (dest / "README.md").write_text(card.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
