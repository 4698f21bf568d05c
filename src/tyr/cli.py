"""Command line: each subcommand parses into a config and makes one API call.

Exit codes: 0 success, 2 bad input or environment (one line on stderr), 1 internal error.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from tyr.config import (
    OFFLOADS,
    PRESET_NAMES,
    TEACHER_CACHES,
    WEIGHTS,
    HealConfig,
    PruneConfig,
    check_keys,
    load_config_file,
    options,
    parse_set,
)
from tyr.errors import UserError

__all__ = ["main"]

# Failures of the machine, not of tyr: exit code 2 with one line, like bad input.
_ENVIRONMENT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"tyr: error: {message}; see '{self.prog} --help'\n")


def _prune_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="prune a model", argument_default=argparse.SUPPRESS)
    p.add_argument(
        "model", nargs="?", help="hub id, HF directory or .gguf file (default: embedded SmolLM2-135M)"
    )
    for name, kind, text in options():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=kind, help=text)
    p.add_argument("--config", dest="config_file", help="YAML or JSON file of options")
    p.add_argument(
        "--set", dest="overrides", action="append", metavar="KEY=VALUE", help="override one option"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _heal_parser(sub: Any) -> None:
    p = sub.add_parser(
        "heal", help="distil a pruned model from its dense teacher", argument_default=argparse.SUPPRESS
    )
    p.add_argument("source", help="the --out directory of tyr prune")
    for name, kind, text in options(HealConfig, skip=("source",)):
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=kind, help=text)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="zero-shot accuracy and held-out perplexity of a model")
    p.add_argument("model", nargs="?", help="a tyr output directory, HF directory, .gguf or hub id")
    p.add_argument("--tasks", default="paper7", help="paper7 (default), all, or a comma-separated list")
    p.add_argument("--limit", type=int, default=300, help="questions per task (default 300)")
    p.add_argument("--ppl", default="wiki:heldout", help="perplexity source, or 'none'")
    p.add_argument("--ppl-tokens", type=int, default=65536, help="perplexity tokens")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", help="write the result (schema tyr.eval/1) here")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="a readable report of a pruned model: quality, speed, cost")
    p.add_argument("dir", help="the --out directory of tyr prune")
    p.add_argument("--usd-per-hour", type=float, help="price of this machine, for the cost rows")
    p.add_argument("--dense", help="the dense model to compare with (default: the one pruned)")
    p.add_argument("--eval-limit", type=int, default=100, help="questions per task of the quick eval")
    p.add_argument("--no-eval", action="store_true", help="do not run an eval when DIR has none")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _plan_parser(sub: Any) -> None:
    from tyr.report import GPUS

    p = sub.add_parser("plan", help="estimate a pruning run before doing it")
    p.add_argument("model", nargs="?", help="HF directory, config.json, .gguf or hub id (default: embedded)")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of block parameters to remove")
    p.add_argument("--method", default="tyr", help="tyr (default) or uniform")
    p.add_argument("--preset", default="auto", choices=PRESET_NAMES)
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument(
        "--teacher-cache", default="auto", choices=TEACHER_CACHES, help="as tyr prune's (default auto)"
    )
    p.add_argument("--offload", default="auto", choices=OFFLOADS, help="as tyr prune's (default auto)")
    p.add_argument(
        "--memory-budget", type=float, help="as tyr prune's: GB of host memory for activations and weights"
    )
    p.add_argument("--weights", default="auto", choices=WEIGHTS, help="as tyr prune's (default auto)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a size as tyr prune takes it (calib_tokens, seq_len, iterations, levels, ...); repeatable",
    )
    p.add_argument("--no-eval", action="store_true", help="as tyr prune's: no perplexities")
    p.add_argument("--ffn-unit", type=int, default=1, help="as tyr prune's (default 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="as tyr prune's (default cpu)")
    p.add_argument(
        "--gpu", default="h100", choices=tuple(GPUS), help="with --device cuda: the GPU of each process"
    )
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun), one GPU each with cuda")
    p.add_argument("--json", help="also write the estimates as JSON here")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _export_parser(sub: Any) -> None:
    from tyr.export import QUANTS

    p = sub.add_parser("export", help="write a pruned (or dense) model as GGUF for llama.cpp")
    p.add_argument(
        "model", nargs="?", help="the --out directory of tyr prune, or a dense model (default: embedded)"
    )
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--quant", default="f16", choices=QUANTS, help="weight type (default f16)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tyr", description="Structural pruning of decoder-only LLMs.")
    from tyr import __version__

    parser.add_argument("--version", action="version", version=f"tyr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _prune_parser(sub)
    _heal_parser(sub)
    _eval_parser(sub)
    _report_parser(sub)
    _plan_parser(sub)
    _export_parser(sub)
    return parser


def _prune(ns: argparse.Namespace, argv: list[str]) -> int:
    from tyr.api import run

    flags = vars(ns)
    values: dict[str, Any] = {}
    if "config_file" in flags:
        values.update(load_config_file(flags.pop("config_file")))
    overrides = parse_set(flags.pop("overrides", []))
    flags.pop("command", None)
    flags.pop("quiet", None)
    values.update(check_keys(flags, "the command line"))
    values.update(overrides)
    for key in ("sparsity", "out"):
        if key not in values:
            raise UserError(f"--{key} is required", "e.g. tyr prune --sparsity 0.5 --out pruned")
    cfg = PruneConfig(**values)
    result = run(cfg, command=shlex.join(["tyr", *argv]))
    if not result.data:  # a torchrun worker (rank > 0): rank 0 reports
        return 0
    summary = {k: result.data[k] for k in ("sparsity_target", "sparsity_achieved", "params", "ppl")}
    if "heal" in result.data:
        heal = result.data["heal"]
        summary["heal"] = {"source": heal["source"], **{k: heal[k] for k in ("tokens_run", "ppl")}}
    if cfg.gguf is not None:
        summary["gguf"] = str(Path(cfg.gguf).expanduser().resolve())
    print(json.dumps({"out": str(result.path), **summary}, indent=2))
    return 0


def _heal(ns: argparse.Namespace, argv: list[str]) -> int:
    from tyr.heal import run_heal

    flags = vars(ns)
    flags.pop("command", None)
    flags.pop("quiet", None)
    if "out" not in flags:
        raise UserError("--out is required", "e.g. tyr heal pruned --out healed")
    cfg = HealConfig(**check_keys(flags, "the command line", HealConfig))
    result = run_heal(cfg, command=shlex.join(["tyr", *argv]))
    heal = result.data["heal"]
    summary = {k: heal[k] for k in ("mode", "tokens_run", "best_step", "stopped_early", "ppl")}
    print(json.dumps({"out": str(result.path), **summary}, indent=2))
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from tyr.eval import evaluate

    ppl = None if ns.ppl == "none" else ns.ppl
    data = evaluate(
        ns.model,
        tasks=ns.tasks,
        limit=ns.limit,
        ppl=ppl,
        ppl_tokens=ns.ppl_tokens,
        device=ns.device,
        json_path=ns.json,
    )
    print(
        json.dumps(
            {k: data[k] for k in ("model", "tasks", "mean_acc_paper7", "mean_acc", "ppl") if k in data},
            indent=2,
        )
    )
    return 0


def _report(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tyr.report import build_report, ensure_evals

    out = Path(ns.dir)
    dense = ensure_evals(out, dense=ns.dense, limit=None if ns.no_eval else ns.eval_limit)
    path = build_report(out, usd_per_hour=ns.usd_per_hour, dense_dir=dense)
    print(path)
    return 0


def _export(ns: argparse.Namespace) -> int:
    from tyr.api import export_gguf

    print(json.dumps(export_gguf(ns.model, ns.gguf, quant=ns.quant).as_dict(), indent=2))
    return 0


def _plan(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tyr.report import estimate, format_plan

    est = estimate(
        ns.model,
        ns.sparsity,
        preset=ns.preset,
        method=ns.method,
        dtype=ns.dtype,
        teacher_cache=ns.teacher_cache,
        offload=ns.offload,
        memory_budget=ns.memory_budget,
        weights=ns.weights,
        sizes=parse_set(ns.set),
        no_eval=ns.no_eval,
        ffn_unit=ns.ffn_unit,
        device=ns.device,
        gpu=ns.gpu,
        nproc=ns.nproc,
    )
    print(format_plan(est))
    if ns.json:
        Path(ns.json).write_text(json.dumps(est, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(ns, "quiet", False) else logging.INFO,
        format="tyr: %(message)s",
        stream=sys.stderr,
    )
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        if ns.command == "prune":
            return _prune(ns, argv)
        if ns.command == "heal":
            return _heal(ns, argv)
        return {"eval": _eval, "report": _report, "plan": _plan, "export": _export}[ns.command](ns)
    except UserError as exc:
        print(f"tyr: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRORS:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        todo = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the permissions"
        print(
            f"tyr: error: {exc.strerror or os.strerror(exc.errno)}{where}; {todo} (or point --workdir, "
            "--out or TYR_HOME elsewhere) and rerun the same command: finished work is kept",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("tyr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tyr plan | head`: the reader left; not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (keeps the interpreter's final flush quiet)
        return 0
