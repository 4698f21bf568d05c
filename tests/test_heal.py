"""`tyr heal`: the distillation loss goes down, the healed export reloads without tyr, LoRA
merges exactly, a killed run resumes to the same bytes, a run that gets worse stops and keeps
the start, bad input fails with one line, and the prune's calibration windows stay unused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import calib_ids, kill_when, load_without_tyr, pruned_pair, tiny_text
from safetensors.torch import load_file

import tyr
from tyr.cli import main
from tyr.config import HealConfig
from tyr.heal import batch_rows, distill_loss, lr_factor


def _prune_argv(tiny_dir: Path, calib_txt: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A uniform 50 % prune of the tiny model, evaluated on a held-out text of its own."""
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(tiny_text(1200, seed=5))
    return [
        "prune", str(tiny_dir), "--sparsity", "0.5", "--method", "uniform", "--out", str(tmp_path / "pruned"),
        "--calib", str(calib_txt), "--calib-tokens", "512", "--seq-len", "32",
        "--eval-data", str(heldout), "--eval-tokens", "256", *extra,
    ]  # fmt: skip


@pytest.fixture
def pruned(tiny_dir: Path, calib_txt: Path, tmp_path: Path) -> Path:
    assert main(_prune_argv(tiny_dir, calib_txt, tmp_path)) == 0
    return tmp_path / "pruned"


def _heal_argv(pruned: Path, out: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        "heal", str(pruned), "--out", str(out), "--workdir", str(workdir), "--tokens", "3072",
        "--batch-size", "4", "--micro-batch", "2", "--eval-every", "6", "--save-every", "3",
        "--curve-tokens", "128", "--lr", "0.003", *extra,
    ]  # fmt: skip


def test_distill_loss_is_zero_for_the_teacher_and_positive_otherwise():
    t = torch.randn(2, 7, 11)
    ids = torch.randint(0, 11, (2, 7))
    assert float(distill_loss(t.clone(), t, ids)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(t.clone(), t, ids, topk=4, temperature=2.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 7, 11, requires_grad=True)
    loss = distill_loss(s, t, ids, lm_weight=0.5)
    loss.backward()
    assert float(loss.detach()) > 0 and s.grad is not None and s.grad.abs().sum() > 0


def test_schedule_and_data_order():
    factors = [lr_factor(i, 20, 4) for i in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False)) and factors[-1] < 0.02
    rows = [r for step in range(5) for r in batch_rows(step, 3, 6, seed=1)]  # 15 rows over 6 windows
    assert rows[:6] == list(range(6))  # epoch 0: the windows' own order
    assert sorted(rows[6:12]) == list(range(6)) and rows[6:12] != list(range(6))  # a new permutation


def test_heal_lowers_the_loss_and_reloads_without_tyr(pruned, tmp_path):
    out = tmp_path / "healed"
    assert main(_heal_argv(pruned, out, tmp_path / "w")) == 0
    res = json.loads((out / "result.json").read_text())
    heal = res["heal"]
    curve = [p["ppl"] for p in heal["curve"]]
    assert heal["steps_run"] == 24 and len(curve) == 5  # the start and every 6 steps
    assert heal["ppl"]["after"] < heal["ppl"]["before"] and min(curve[1:]) < curve[0]
    assert heal["ppl"]["before"] == res["ppl"]["pruned"]  # the prune measured the same windows
    assert json.loads((out / "heal_log.json").read_text())["curve"] == heal["curve"]
    assert "## Healing" in (out / "README.md").read_text()
    assert res["layers"] == json.loads((pruned / "result.json").read_text())["layers"]
    ids = calib_ids(3, n=2, T=16)
    with torch.no_grad():
        ours = tyr.load(out)(ids).logits
        before = tyr.load(pruned)(ids).logits
    theirs = load_without_tyr(tmp_path, [out], ids)
    torch.testing.assert_close(theirs[f"{out}:logits"], ours, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, before)  # the weights did change
    assert main(_heal_argv(pruned, out, tmp_path / "w")) == 0  # finished: nothing to do
    from tyr.report import build_report

    md = build_report(out, speed={}).read_text()
    assert "## Healing" in md and f"{heal['ppl']['after']:.2f}" in md
    assert (out / "report" / "heal.png").stat().st_size > 0


def test_a_killed_heal_resumes_to_identical_bytes(pruned, tmp_path):
    ref = tmp_path / "ref"
    assert main(_heal_argv(pruned, ref, tmp_path / "w-ref")) == 0
    out, work = tmp_path / "out", tmp_path / "w"
    assert kill_when(_heal_argv(pruned, out, work), work / "state.pt")
    assert not out.exists()
    assert main(_heal_argv(pruned, out, work)) == 0
    assert json.loads((out / "result.json").read_text())["heal"]["resumed_at"] > 0
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_a_heal_that_gets_worse_stops_and_keeps_the_start(pruned, tmp_path):
    out = tmp_path / "healed"
    assert main([*_heal_argv(pruned, out, tmp_path / "w"), "--lr", "30", "--eval-every", "2"]) == 0
    heal = json.loads((out / "result.json").read_text())["heal"]
    assert heal["stopped_early"] and heal["best_step"] == 0 and heal["steps_run"] < 24
    a, b = load_file(out / "model.safetensors"), load_file(pruned / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_merge_gives_the_unmerged_logits():
    from tyr import arch
    from tyr.heal.run import _trainable

    _, sliced, _, _ = pruned_pair("llama", "free")
    spec = arch.spec_for(sliced)
    cfg = HealConfig(source="unused", out="unused", mode="lora", lora_rank=4)
    net, adapters = _trainable(sliced, spec, cfg)
    assert any("lora_" in n for n, p in net.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # B starts at zero; make the adapters matter
        ids = calib_ids(4, n=2, T=12)
        unmerged = net(ids).logits
        merged_model = adapters.merge_and_unload()
        merged = merged_model(ids).logits
    assert type(merged_model) is type(sliced)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_top_k_step_gathers_the_head_rows_with_the_full_logits_gradient(mode):
    """The top-k step's student logits come from the teacher's k head rows only; loss and
    gradients are those of the same KL taken from the full logits (the tied embedding too)."""
    from tyr import arch
    from tyr.heal.distill import TrainOptions, _step
    from tyr.heal.run import _trainable

    teacher, sliced, _, _ = pruned_pair("llama", "free")
    spec = arch.spec_for(sliced)
    with torch.no_grad():
        for p in sliced.parameters():  # a student that differs from its teacher
            p.add_(torch.randn_like(p), alpha=0.05)
    net, _ = _trainable(sliced, spec, HealConfig(source="unused", out="unused", mode=mode, lora_rank=4))
    ids = calib_ids(5, n=4, T=10)
    opt = TrainOptions(
        steps=1, batch_size=4, micro_batch=2, lr=1e-3, warmup=0.0, weight_decay=0.0, temperature=2.0,
        kl_topk=5, lm_weight=0.0, eval_every=1, save_every=1, seed=0,
    )  # fmt: skip
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    loss = _step(net, teacher, ids, opt, spec)
    gathered = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        t = teacher(ids).logits
    reference = distill_loss(net(ids).logits, t, ids, temperature=2.0, topk=5)
    reference.backward()
    assert loss == pytest.approx(float(reference), rel=1e-5)
    assert set(gathered) == {n for n, p in params.items() if p.grad is not None} and gathered
    for n, g in gathered.items():
        torch.testing.assert_close(g, params[n].grad, rtol=1e-4, atol=1e-6)


def test_lora_heal_keeps_the_shapes(pruned, tmp_path):
    out = tmp_path / "healed"
    assert main([*_heal_argv(pruned, out, tmp_path / "w"), "--mode", "lora", "--lora-rank", "4"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(pruned / "model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    heal = json.loads((out / "result.json").read_text())["heal"]
    assert heal["mode"] == "lora" and heal["ppl"]["after"] < heal["ppl"]["before"]


def test_training_windows_skip_the_prune_calibration(pruned):
    from tyr.data import load_text, token_batches, tokenize
    from tyr.heal.run import _training_windows
    from tyr.loader import open_model

    prune_cfg = json.loads((pruned / "result.json").read_text())["config"]
    tok = open_model(str(pruned)).tokenizer
    rows, desc = _training_windows(HealConfig(source=str(pruned), out="x"), prune_cfg, tok, 32)
    ids = tokenize(tok, load_text(prune_cfg["calib"], "calib"))
    calib = token_batches(ids, prune_cfg["calib_tokens"], 32, seed=prune_cfg["seed"])
    assert "without the prune's 512 calibration tokens" in desc
    assert rows.shape[0] == ids.numel() // 32 - calib.shape[0]
    used = {tuple(r.tolist()) for r in calib}
    assert not any(tuple(r.tolist()) in used for r in rows)


def test_bad_heal_input_fails_with_one_line(pruned, tiny_dir, tmp_path, capsys):
    assert main(["heal", str(tiny_dir), "--out", str(tmp_path / "o")]) == 2  # not a tyr output
    assert main(["heal", str(pruned), "--out", str(pruned)]) == 2  # a non-empty, other directory
    assert main(["heal", str(pruned), "--out", str(tmp_path / "o"), "--micro-batch", "9"]) == 2
    assert main(["heal", str(pruned), "--out", str(tmp_path / "o"), "--kl-topk", "-1"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tyr: error")]
    assert len(lines) == 4
    assert not (tmp_path / "o").exists()


def test_prune_then_heal_in_one_command(tiny_dir, calib_txt, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = _prune_argv(tiny_dir, calib_txt, tmp_path, "--heal", "1024")
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    healed = tmp_path / "pruned-healed"
    assert printed["out"] == str(healed) and printed["heal"]["tokens_run"] == 1024
    pruned_rec = json.loads((out / "result.json").read_text())
    healed_rec = json.loads((healed / "result.json").read_text())
    assert "heal" not in pruned_rec and healed_rec["heal"]["source"] == str(out.resolve())
    assert healed_rec["heal"]["ppl"]["before"] == pruned_rec["ppl"]["pruned"]
    assert main(argv) == 0  # both finished: nothing to do
