"""Load a tyr export as a user without tyr would: another Python (a fresh virtualenv holding only
torch, transformers and safetensors), `from_pretrained(DIR, trust_remote_code=True)`.

Compares its logits with `tyr.load(DIR)` on a fixed prompt, generates tokens with the KV cache,
and checks the parameter count against `result.json`.

    python -m venv /tmp/fresh && /tmp/fresh/bin/pip install torch transformers safetensors
    python benchmarks/fresh_venv_load.py --dir pruned --python /tmp/fresh/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import tyr
from tyr import arch

CHILD = r"""
import json, sys
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import tyr  # noqa: F401
    has_tyr = True
except ImportError:
    has_tyr = False
d, io = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d)
ids = load_file(io + "/ids.safetensors")["ids"]
with torch.no_grad():
    logits = model(ids).logits
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**chat, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True)
new = out[0, chat["input_ids"].shape[1]:]
seen = {id(p): p.numel() for p in model.parameters()}
save_file({"logits": logits.contiguous()}, io + "/logits.safetensors")
json.dump({
    "class": type(model).__name__, "transformers": transformers.__version__, "torch": torch.__version__,
    "tyr_importable": has_tyr, "params": sum(seen.values()), "new_tokens": int(new.numel()),
    "text": tok.decode(new, skip_special_tokens=True),
}, open(io + "/child.json", "w"))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="a tyr prune --out directory")
    ap.add_argument("--python", required=True, help="the interpreter of a virtualenv without tyr")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = Path(args.dir)
    result = json.loads((out / "result.json").read_text())
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as io:
        save_file({"ids": ids}, f"{io}/ids.safetensors")
        subprocess.run([args.python, "-c", CHILD, str(out), io], check=True, cwd=io)
        child = json.loads(Path(f"{io}/child.json").read_text())
        remote = load_file(f"{io}/logits.safetensors")["logits"]
    model = tyr.load(out)
    with torch.no_grad():
        ref = model(ids).logits
    report = {
        **child,
        "max_abs_logit_diff": float((remote - ref).abs().max()),
        "params_pruned_total": result["params"]["pruned_total"],
        "params_tyr_load": arch.count_total_params(model),
        "sparsity_achieved": result["sparsity_achieved"],
    }
    report["ok"] = (
        not child["tyr_importable"]
        and report["max_abs_logit_diff"] <= 1e-4
        and child["new_tokens"] == 20
        and child["params"] == report["params_pruned_total"] == report["params_tyr_load"]
    )
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
