"""``tyr report``: a human-readable account of a finished run, as Markdown with PNG plots.

Reads ``DIR/result.json`` (schema ``tyr.result/1``) and the zero-shot evaluations beside it
(``DIR/eval*.json``, schema ``tyr.eval/1``: ``eval.json`` is the pruned model's,
``eval_dense.json`` the dense one's; a file may also hold both as ``{"dense": ..., "pruned": ...}``),
measures or takes the deployment speed, and writes ``DIR/report/report.md`` with
``sparsity_per_block.png``, ``fitness.png`` (method ``tyr`` only) and ``accuracy.png`` (when an
evaluation exists) beside it. Derived quality numbers follow docs/protocol.md (retention, PPL ratio,
above-chance retention).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tyr import record
from tyr.data import PAPER7
from tyr.eval import SCHEMA as EVAL_SCHEMA
from tyr.report.fmt import DASH, fmt_bytes, fmt_params, fmt_pct, fmt_rate, fmt_ratio, fmt_seconds, fmt_usd
from tyr.report.plots import (
    fitness_points,
    matplotlib_ok,
    plot_accuracy,
    plot_fitness,
    plot_heal,
    plot_sparsity,
)
from tyr.report.quality import (
    TASK_NAMES,
    above_chance_retention,
    accuracies,
    in_order,
    mean_accuracy,
)
from tyr.report.speed import cost_per_million, measure_in_subprocess

__all__ = [
    "PLOTS",
    "build_report",
    "ensure_evals",
    "dense_source",
    "read_evals",
    "weights_bytes",
]

log = logging.getLogger("tyr")

PLOTS = {
    "sparsity": "sparsity_per_block.png",
    "fitness": "fitness.png",
    "accuracy": "accuracy.png",
    "heal": "heal.png",
}


# ---------------------------------------------------------------- reading


def _eval_files(out_dir: Path) -> list[Path]:
    """eval.json and eval_dense.json first (they win a tie), then any other eval*.json by name."""
    first = [out_dir / "eval.json", out_dir / "eval_dense.json"]
    rest = sorted(p for p in out_dir.glob("eval*.json") if p not in first)
    return [p for p in first if p.is_file()] + rest


def _is_eval(data: Any) -> bool:
    return (
        isinstance(data, dict) and data.get("schema") == EVAL_SCHEMA and isinstance(data.get("tasks"), dict)
    )


def read_evals(out_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """(dense evaluation, pruned evaluation, notes on the files read or skipped)."""
    found: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for path in _eval_files(out_dir):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            notes.append(f"`{path.name}` skipped: not valid JSON.")
            continue
        if _is_eval(data):
            parts = [("dense" if "dense" in path.stem else "pruned", data)]
        elif isinstance(data, dict) and any(_is_eval(data.get(k)) for k in ("dense", "pruned")):
            parts = [(k, data[k]) for k in ("dense", "pruned") if _is_eval(data.get(k))]
        else:
            notes.append(f"`{path.name}` skipped: not a {EVAL_SCHEMA} evaluation.")
            continue
        for role, ev in parts:
            if role in found:
                notes.append(f"`{path.name}`: a second {role} evaluation, ignored.")
            else:
                found[role] = ev
                notes.append(f"{role} evaluation from `{path.name}`.")
    return found.get("dense"), found.get("pruned"), notes


def weights_bytes(path: Path) -> int:
    """Bytes of the *.safetensors files of a checkpoint directory (0 when there are none)."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors") if p.is_file())


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# ---------------------------------------------------------------- sections


def _header(res: dict[str, Any], out_dir: Path) -> list[str]:
    method = res.get("method", "?")
    what = {
        "tyr": "global search: supernet of locally pruned candidates and evolutionary sparsity allocation",
        "uniform": "every block pruned by the same fraction",
    }.get(method, "")
    machine = res.get("machine") or {}
    lines = [
        f"# tyr report: {res.get('model', '?')}",
        "",
        f"- Method: `{method}`" + (f" ({what})" if what else ""),
        f"- Sparsity of decoder-block parameters: target {fmt_pct(res.get('sparsity_target'))},"
        f" achieved {fmt_pct(res.get('sparsity_achieved'))} (counted on the exported tensors)",
        f"- Directory: `{out_dir}`; tyr {res.get('tyr_version', '?')}",
    ]
    if machine:
        lines.append(f"- Pruned on: {machine.get('device', '?')}, {machine.get('cpus', '?')} CPU cores")
    return lines


def _ppl_label(what: str, ppl: dict[str, Any]) -> str:
    tokens = ppl.get("tokens") or 0
    return f"{what} ({ppl.get('source', '?')}, {tokens:,} tokens, seq {ppl.get('seq_len', '?')})"


def _ppl_rows(res: dict[str, Any], dense_ev: dict | None, pruned_ev: dict | None) -> list[list[str]]:
    """Held-out PPL of the run (result.json) and of the evaluations, when recorded."""
    rows = []
    ppl = res.get("ppl") or {}
    if ppl.get("dense") is not None or ppl.get("pruned") is not None:
        d, p = ppl.get("dense"), ppl.get("pruned")
        rows.append([_ppl_label("held-out PPL", ppl), _f2(d), _f2(p), fmt_ratio(_div(p, d))])
    ed = (dense_ev or {}).get("ppl") or {}
    ep = (pruned_ev or {}).get("ppl") or {}
    if ed.get("value") is not None or ep.get("value") is not None:
        d, p = ed.get("value"), ep.get("value")
        rows.append([_ppl_label("eval PPL", ep or ed), _f2(d), _f2(p), fmt_ratio(_div(p, d))])
    return rows


def _f2(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}"


def _comparison(
    res: dict[str, Any],
    out_dir: Path,
    dense_dir: str | None,
    dense_ev: dict[str, Any] | None,
    pruned_ev: dict[str, Any] | None,
) -> tuple[list[str], list[str]]:
    """The dense-vs-pruned table and its notes."""
    p = res["params"]
    notes: list[str] = []
    pruned_disk = weights_bytes(out_dir)
    dense_disk = weights_bytes(Path(dense_dir)) if dense_dir and Path(dense_dir).is_dir() else 0
    dense_disk_s = fmt_bytes(dense_disk) if dense_disk else DASH
    if not dense_disk and pruned_disk:
        # Same dtype and layout: bytes scale with the parameter count.
        dense_disk = round(pruned_disk * p["dense_total"] / p["pruned_total"])
        dense_disk_s = fmt_bytes(dense_disk) + " (est.)"
        notes.append(
            "Dense disk size estimated as the pruned weights' size × dense ÷ pruned total parameters "
            "(same dtype); give the dense checkpoint directory to measure it."
        )
    rows = [
        [
            "total parameters",
            fmt_params(p["dense_total"]),
            fmt_params(p["pruned_total"]),
            fmt_pct(p["pruned_total"] / p["dense_total"]),
        ],
        [
            "decoder-block parameters",
            fmt_params(p["dense_block"]),
            fmt_params(p["pruned_block"]),
            fmt_pct(p["pruned_block"] / p["dense_block"]),
        ],
        [
            "weights on disk (safetensors)",
            dense_disk_s,
            fmt_bytes(pruned_disk) if pruned_disk else DASH,
            fmt_pct(_div(pruned_disk, dense_disk)) if pruned_disk else DASH,
        ],
        *_ppl_rows(res, dense_ev, pruned_ev),
    ]
    da, pa = accuracies(dense_ev), accuracies(pruned_ev)
    for t in in_order(set(da) | set(pa)):
        info = ((pruned_ev or {}).get("tasks") or {}).get(t) or ((dense_ev or {}).get("tasks") or {}).get(t)
        detail = f"n={info.get('n', '?')}, {info.get('shots', 0)}-shot" if isinstance(info, dict) else ""
        d, pr = da.get(t), pa.get(t)
        rows.append([f"{TASK_NAMES.get(t, t)} acc ({detail})", fmt_pct(d), fmt_pct(pr), fmt_pct(_div(pr, d))])
    both = in_order(set(da) & set(pa))
    if both:
        label = "paper7" if set(both) == set(PAPER7) else ", ".join(TASK_NAMES.get(t, t) for t in both)
        d_mean, p_mean = mean_accuracy(da, both), mean_accuracy(pa, both)
        rows.append(
            [
                f"**mean accuracy** ({len(both)} tasks: {label})",
                fmt_pct(d_mean),
                fmt_pct(p_mean),
                f"**{fmt_pct(_div(p_mean, d_mean))}** retention",
            ]
        )
        ret, used, d_sum, p_sum = above_chance_retention(da, pa)
        if ret is None:
            rows.append(["above-chance retention", DASH, DASH, "n/a"])
            notes.append(
                "Above-chance retention: n/a, the dense model is within 5 points of chance on every task."
            )
        else:
            rows.append(
                [
                    f"above-chance retention ({len(used)} tasks)",
                    f"+{100 * d_sum:.1f} pts",
                    f"{100 * p_sum:+.1f} pts",
                    f"**{fmt_pct(ret)}**",
                ]
            )
            notes.append(
                "Retention = pruned ÷ dense mean accuracy. Above-chance retention (docs/protocol.md) = "
                "Σ(acc − chance) pruned ÷ Σ(acc − chance) dense over the tasks where dense is at least "
                "5 points above chance: " + ", ".join(TASK_NAMES.get(t, t) for t in used) + ". Chance: "
                "ARC-E/C, HellaSwag, OBQA, MMLU 25%; BoolQ, RTE, WinoGrande, PIQA 50%."
            )
    header = ["", "dense", "pruned", "pruned ÷ dense"]
    return _table(header, rows), notes


def _eval_notes(out_dir: Path, dense_ev: dict | None, pruned_ev: dict | None, notes: list[str]) -> list[str]:
    lines: list[str] = []
    if pruned_ev is None and dense_ev is None:
        lines.append(
            f"No zero-shot evaluation was run (no `eval*.json` in `{out_dir}`). Run one with "
            f"`tyr eval {out_dir} --json {out_dir}/eval.json`, and the dense baseline with "
            f"`tyr eval DENSE_MODEL --json {out_dir}/eval_dense.json`; then rerun `tyr report`."
        )
    elif dense_ev is None:
        lines.append(
            "No dense evaluation: retention needs one. Run "
            f"`tyr eval DENSE_MODEL --json {out_dir}/eval_dense.json` and rerun `tyr report`."
        )
    elif pruned_ev is None:
        lines.append(f"No pruned evaluation: run `tyr eval {out_dir} --json {out_dir}/eval.json`.")
    limits = {ev.get("limit") for ev in (dense_ev, pruned_ev) if ev is not None}
    for limit in sorted(x for x in limits if x is not None and x < 300):
        lines.append(
            f"A quick evaluation ({limit} questions per task; docs/protocol.md uses 300): "
            "differences of a few points are noise at this size."
        )
    return lines + notes


def dense_source(res: dict[str, Any]) -> str:
    """Where the pruned model's dense original is: a local directory, or its hub id."""
    from tyr.loader import resolve

    return str(resolve((res.get("config") or {}).get("model")))


def ensure_evals(out_dir: Path, *, dense: str | None = None, limit: int | None = 100) -> str:
    """The dense model to compare with; when `out_dir` holds no eval yet and `limit` is given,
    a quick one of the pruned and the dense model is run first (and said so)."""
    from tyr.eval import evaluate

    res: dict[str, Any] = dict(record.read(out_dir))
    dense = dense or dense_source(res)
    if limit is not None and not _eval_files(out_dir):
        log.warning(
            "%s holds no evaluation: running a quick one (%d questions per task, pruned and dense; "
            "`tyr eval` runs the full protocol)",
            out_dir,
            limit,
        )
        evaluate(out_dir, limit=limit, ppl=None, json_path=out_dir / "eval.json")
        evaluate(dense, limit=limit, ppl=None, json_path=out_dir / "eval_dense.json")
    return dense


def _measure_speed(
    res: dict[str, Any], out_dir: Path, dense_dir: str | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """Each model in its own fresh process, so that each peak memory is that model's alone."""
    import torch

    want = str((res.get("config") or {}).get("device", "cpu"))
    device = "cuda" if want == "cuda" and torch.cuda.is_available() else "cpu"
    found: dict[str, dict[str, Any] | None] = {"dense": None, "pruned": None}
    notes = ["Each model measured in a fresh process."]
    for role, path in (("pruned", str(out_dir)), ("dense", dense_dir)):
        if path is None:
            notes.append("The dense model was not measured: no dense checkpoint directory was given.")
            continue
        log.info("measuring the %s model's speed (%s)", role, path)
        try:
            found[role] = measure_in_subprocess(path, device=device)
        except RuntimeError as exc:
            notes.append(f"The {role} model could not be measured: {exc}")
    return found["dense"], found["pruned"], notes


def _speed_value(m: dict[str, Any] | None, key: str) -> float | None:
    return float(m[key]) if m is not None and m.get(key) is not None else None


def _deployment(
    dense: dict[str, Any] | None, pruned: dict[str, Any] | None, usd_per_hour: float | None, notes: list[str]
) -> list[str]:
    ref = pruned or dense
    if ref is None:
        return ["No speed measurement.", *("- " + n for n in notes)]
    device = str(ref.get("device", "cpu"))
    memory = "peak CUDA memory" if device == "cuda" else "peak memory (process RSS)"
    lines = [
        f"Batch 1 on this machine ({device}, {ref.get('threads', '?')} threads): prefill = one forward "
        f"over a {ref.get('prompt_tokens', '?')}-token prompt; decode = {ref.get('new_tokens', '?')} greedy "
        f"tokens after a {ref.get('decode_prompt', '?')}-token prompt (generate time minus its prefill); "
        f"best of {ref.get('repeats', '?')}.",
        "",
    ]
    rows = []
    for label, key in (
        ("prefill tokens/s", "prefill_tokens_per_s"),
        ("decode tokens/s", "decode_tokens_per_s"),
    ):
        d, p = _speed_value(dense, key), _speed_value(pruned, key)
        rows.append(
            [label, fmt_rate(d), fmt_rate(p), fmt_ratio(_div(p, d)) + (" speedup" if d and p else "")]
        )
    d_mem, p_mem = _speed_value(dense, "peak_rss_bytes"), _speed_value(pruned, "peak_rss_bytes")
    rows.append(
        [
            memory,
            fmt_bytes(d_mem) if d_mem else DASH,
            fmt_bytes(p_mem) if p_mem else DASH,
            fmt_pct(_div(p_mem, d_mem)),
        ]
    )
    if usd_per_hour is not None:
        for label, key in (("prefill", "prefill_tokens_per_s"), ("decode", "decode_tokens_per_s")):
            d, p = _speed_value(dense, key), _speed_value(pruned, key)
            d_cost = cost_per_million(d, usd_per_hour) if d else None
            p_cost = cost_per_million(p, usd_per_hour) if p else None
            rows.append(
                [
                    f"{label} USD per 1M tokens at ${usd_per_hour:g}/h",
                    fmt_usd(d_cost),
                    fmt_usd(p_cost),
                    fmt_pct(_div(p_cost, d_cost)),
                ]
            )
    else:
        notes = [*notes, "No price given: pass `--usd-per-hour X` for the cost per 1M tokens."]
    lines += _table(["", "dense", "pruned", "pruned vs dense"], rows)
    if usd_per_hour is not None:
        notes = [
            *notes,
            f"Cost = ${usd_per_hour:g} per hour ÷ (tokens/s × 3600) × 10⁶, one stream at batch 1 "
            "(batching more streams per machine lowers it).",
        ]
    if device != "cuda":
        notes = [
            *notes,
            "Peak RSS is the whole process's peak (interpreter, torch, weights, activations), "
            "so each model needs a process of its own for a fair comparison.",
        ]
    return lines + [""] + ["- " + n for n in notes]


def _gguf(out_dir: Path) -> list[str]:
    """The GGUF files `tyr export` wrote from this run and, when measured, llama.cpp's numbers."""
    data = record.read_gguf(out_dir)
    exports = data.get("exports") or {}
    if not exports:
        return []
    rows = [
        [name, e["quant"], f"{e['bytes'] / 1e6:.1f} MB", str(len(e["unquantized"])), str(e["padded_heads"])]
        for name, e in exports.items()
    ]
    lines = ["", "## llama.cpp (GGUF)", ""]
    lines += _table(["file", "weights", "size", "tensors kept wider", "zero query heads added"], rows)
    bench = data.get("llama_cpp")
    if not bench:
        return [
            *lines,
            "",
            "Not run in llama.cpp yet: `python benchmarks/serve_gguf.py --pruned DIR` measures it.",
        ]
    rows = [
        [
            r["file"],
            f"{r['bytes'] / 1e6:.1f} MB",
            f"{r['prefill_tok_s']:.0f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['peak_rss'] / 1e9:.2f} GB",
            f"{r['ppl']:.2f}",
        ]
        for r in bench["rows"]
    ]
    lines += [
        "",
        f"{bench['runtime']}, {bench['machine']['cpus']} CPU cores, batch 1, {bench['date']}; perplexity"
        f" of {bench['ppl_tokens']:,} held-out tokens from llama.cpp's logits (tyr's own model:"
        f" {bench['tyr_ppl']:.2f}).",
        "",
    ]
    return lines + _table(
        ["file", "size", "prefill tok/s (512)", "decode tok/s (128)", "peak RSS", "PPL"], rows
    )


def _heal(res: dict[str, Any], dest: Path, plots: bool) -> list[str]:
    """Dense, pruned and healed side by side, when this directory is the output of `tyr heal`."""
    heal = res.get("heal")
    if not heal:
        return []
    p, z = heal["ppl"], heal.get("zeroshot") or {}
    rows = [
        ["held-out PPL", f"{p['dense']:.2f}", f"{p['before']:.2f}", f"{p['after']:.2f}"],
        [
            "PPL ÷ dense",
            "1.00×",
            fmt_ratio(_div(p["before"], p["dense"])),
            fmt_ratio(_div(p["after"], p["dense"])),
        ],
    ]
    if z:
        rows.append(["paper-7 mean", *(fmt_pct(z.get(f"paper7_{w}")) for w in ("dense", "before", "after"))])
        rows.append(
            [
                "above-chance retention",
                "100 %",
                fmt_pct(z.get("above_chance_before")),
                fmt_pct(z.get("above_chance_after")),
            ]
        )
    lines = ["", "## Healing", ""]
    lines += _table(["", "dense", "pruned", "healed"], rows)
    stop = "; stopped early: the curve rose above the start" if heal["stopped_early"] else ""
    lines += [
        "",
        f"`tyr heal` ({heal['mode']}): {heal['steps_run']} steps, {heal['tokens_run']:,} tokens of"
        f" {heal['data']}, best curve point at step {heal['best_step']}{stop};"
        f" {fmt_seconds(float(heal['seconds']))}. Perplexity on {p['tokens']:,} tokens of {p['source']}.",
    ]
    if plots and len(heal.get("curve") or []) > 1:
        plot_heal(heal["curve"], dest / PLOTS["heal"])
        lines += ["", f"![held-out perplexity while healing]({PLOTS['heal']})"]
    return lines


def _layers(res: dict[str, Any]) -> list[str]:
    rows = [
        [
            str(r["index"]),
            str(r["q_heads"]),
            str(r["kv_heads"]),
            str(r["intermediate"]),
            fmt_pct(r["attn_sparsity"]),
            fmt_pct(r["mlp_sparsity"]),
        ]
        for r in res["layers"]
    ]
    return _table(
        ["block", "query heads", "KV heads", "FFN width", "attention sparsity", "FFN sparsity"], rows
    )


def _search(res: dict[str, Any]) -> list[str]:
    its = (res.get("search") or {}).get("iterations") or []
    rows = []
    for k, it in enumerate(its, 1):
        fit = it.get("parent_fitness") or []
        rows.append(
            [
                str(k),
                f"{it.get('step_attn', '?')} / {it.get('step_mlp', '?')}",
                str(len(fit)),
                f"{fit[0]:.4f}" if fit else DASH,
                f"{fit[-1]:.4f}" if fit else DASH,
                fmt_seconds(float(it["seconds"])) if it.get("seconds") is not None else DASH,
            ]
        )
    header = [
        "iteration",
        "step (attention units / channels)",
        "generations",
        "first parent KL",
        "final parent KL",
        "time",
    ]
    return _table(header, rows)


def _timings(res: dict[str, Any]) -> list[str]:
    t = res.get("timings") or {}
    rows = [[k, fmt_seconds(float(v))] for k, v in t.items() if k != "total" and v]
    if "total" in t:
        rows.append(["**total**", f"**{fmt_seconds(float(t['total']))}**"])
    return _table(["stage", "wall time"], rows) if rows else ["No timings recorded."]


# ---------------------------------------------------------------- the report


def build_report(
    out_dir: Path,
    *,
    usd_per_hour: float | None = None,
    speed: dict[str, Any] | None = None,
    dense_dir: str | None = None,
) -> Path:
    """Write ``out_dir/report/report.md`` and its PNGs; returns the Markdown file's path.

    `speed` = {"dense": measure-dict, "pruned": measure-dict} (either may be absent) skips the
    measurement; otherwise the pruned model (and the dense one when `dense_dir` is given) is
    measured, each in a fresh process. `usd_per_hour` prices the machine for the cost rows.
    """
    out_dir = Path(out_dir)
    res: dict[str, Any] = dict(record.read(out_dir))
    dense_ev, pruned_ev, eval_notes = read_evals(out_dir)
    dest = out_dir / "report"
    dest.mkdir(parents=True, exist_ok=True)
    for name in PLOTS.values():  # never leave a stale plot of an earlier report behind
        (dest / name).unlink(missing_ok=True)
    plots = matplotlib_ok()

    if speed is not None:
        speed_dense, speed_pruned = speed.get("dense"), speed.get("pruned")
        speed_notes = [] if speed_dense else ["The dense model was not measured."]
    else:
        speed_dense, speed_pruned, speed_notes = _measure_speed(res, out_dir, dense_dir)

    table, table_notes = _comparison(res, out_dir, dense_dir, dense_ev, pruned_ev)
    md = [*_header(res, out_dir), "", "## Dense vs pruned", "", *table, ""]
    md += ["- " + n for n in [*_eval_notes(out_dir, dense_ev, pruned_ev, eval_notes), *table_notes]]
    da, pa = accuracies(dense_ev), accuracies(pruned_ev)
    if (da or pa) and plots:
        plot_accuracy(da, pa, dest / PLOTS["accuracy"])
        md += ["", f"![accuracy per task, dense vs pruned]({PLOTS['accuracy']})"]

    md += _heal(res, dest, plots)
    md += ["", "## Deployment", "", *_deployment(speed_dense, speed_pruned, usd_per_hour, speed_notes)]
    md += _gguf(out_dir)

    md += ["", "## Sparsity per block", ""]
    if plots:
        plot_sparsity(res["layers"], float(res["sparsity_achieved"]), dest / PLOTS["sparsity"])
        md += [f"![attention and FFN sparsity per block]({PLOTS['sparsity']})", ""]
    md += _layers(res)

    md += ["", "## Search", ""]
    its = (res.get("search") or {}).get("iterations") or []
    if res.get("method") != "tyr":
        md.append(f"No search (method `{res.get('method')}`), so no fitness plot.")
    elif not its:
        md.append("The result records no search iterations, so no fitness plot.")
    else:
        md += _search(res)
        if plots and fitness_points(its):
            plot_fitness(its, dest / PLOTS["fitness"])
            md += ["", f"![parent fitness per generation]({PLOTS['fitness']})"]
        md.append("")
        md.append(
            "Fitness: top-k KL divergence of the pruned logits from the dense model's on fresh "
            "calibration minibatches (lower is better); each iteration re-centres with half the step."
        )

    md += ["", "## Timings of the run", "", *_timings(res)]
    if not plots:
        md += ["", "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."]
    path = dest / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
