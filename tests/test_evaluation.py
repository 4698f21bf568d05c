"""Zero-shot evaluation: task formats, lm-eval scoring, the shared-context scorer, `tyr eval`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, pruned_pair, tiny_model, tiny_tokenizer

import tyr
from tyr.cli import main
from tyr.data import tasks
from tyr.eval.zeroshot import _split, evaluate, score_doc
from tyr.export import save_pruned


def test_prompt_formats_follow_lm_eval(task_wheel):
    doc = {name: next(iter(tasks.docs(name, None))) for name in tasks.TASKS}
    assert (
        doc["arc_easy"].requests[1] == ("Question: w1 w2 w3\nAnswer:", " w5 w6") and doc["arc_easy"].gold == 1
    )
    assert doc["arc_challenge"].gold == 1
    assert doc["boolq"].requests == (("w5 w6 w7\nQuestion: w3 w4?\nAnswer:", " no"),) + (
        ("w5 w6 w7\nQuestion: w3 w4?\nAnswer:", " yes"),
    )
    assert doc["boolq"].gold == 1
    hs = doc["hellaswag"]
    assert hs.requests[0] == ("w1: w2 w3. W4", " w5. w6") and hs.requests[1][1] == " w7 w8" and hs.gold == 2
    assert doc["openbookqa"].requests[0] == ("w11 w12", " w1") and doc["openbookqa"].gold == 0
    assert doc["rte"].requests[0] == ("w1 w2.\nQuestion: w3 True or False?\nAnswer:", " True")
    assert doc["rte"].gold == 1
    assert doc["winogrande"].requests == (("w1 w2 w5", " w3 w4."), ("w1 w2 w6", " w3 w4."))
    assert doc["winogrande"].gold == 1
    assert doc["piqa"].requests[1] == ("Question: w1\nAnswer:", " w4") and doc["piqa"].gold == 1
    # MMLU: a seeded shuffle over subjects, 5 dev shots of the question's own subject.
    mmlu = list(tasks.docs("mmlu", None))
    assert len(mmlu) == 5 and [d.requests[0][1] for d in mmlu[:1]] == [" A"]
    context = mmlu[0].requests[0][0]
    subject = "anatomy" if "about anatomy" in context else "virology"
    assert context.startswith(
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    )
    assert context.count("\nAnswer:") == 6 and context.endswith("\nD. w6\nAnswer:")
    if subject == "anatomy":
        # the first five dev questions (answers A B C D A), never the sixth
        assert context.count("w7\nA. w8\nB. w9\nC. w10\nD. w11\nAnswer: ") == 5
        assert [context[i + 9] for i in range(len(context)) if context.startswith("\nAnswer: ", i)] == list(
            "ABCDA"
        )
    assert [d.gold for d in mmlu] == [d.gold for d in tasks.docs("mmlu", None)]  # deterministic


def test_resolve_tasks():
    assert tasks.resolve_tasks("paper7") == list(tasks.PAPER7)
    assert tasks.resolve_tasks("all") == list(tasks.TASKS)
    assert tasks.resolve_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    with pytest.raises(tyr.UserError, match="unknown task 'nope'"):
        tasks.resolve_tasks("arc_easy,nope")


def _naive(model, tok, doc) -> list[float]:
    out = []
    for c, o in doc.requests:
        ctx, cont = _split(tok, c, o)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        out.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_context_scores_equal_separate_scoring(family):
    tok = tiny_tokenizer()
    doc = tasks.Doc(
        (("w1 w2 w3", " w4 w5"), ("w1 w2 w3", " w7"), ("w1 w2 w3 ", "w9 w10 w11 w12"), ("w5 w6", " w1 w2")), 0
    )
    for model in (tiny_model(family), pruned_pair(family, "free", sparsity=0.6)[1]):
        got, ref = score_doc(model, tok, doc), _naive(model, tok, doc)
        assert got == pytest.approx(ref, abs=1e-4)


def test_trailing_space_moves_to_the_continuation():
    tok = tiny_tokenizer()
    assert _split(tok, "w1 w2 ", "w3") == _split(tok, "w1 w2", " w3")


def test_evaluate_and_cli(task_wheel, tmp_path, calib_txt, capsys):
    _, sliced, plans, shape = pruned_pair("llama", "free")
    out = tmp_path / "pruned"
    save_pruned(sliced, tiny_tokenizer(), plans, shape, out)
    data = evaluate(out, tasks="all", limit=2, ppl=str(calib_txt), ppl_tokens=64, seq_len=16)
    assert data["schema"] == "tyr.eval/1" and set(data["tasks"]) == set(tasks.TASKS)
    for name, r in data["tasks"].items():
        assert r["n"] == (2 if name == "mmlu" else 1) and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
        assert r["shots"] == (5 if name == "mmlu" else 0)
    paper = [data["tasks"][n]["acc"] for n in tasks.PAPER7]
    assert data["mean_acc_paper7"] == pytest.approx(sum(paper) / 7)
    assert data["ppl"]["tokens"] == 64 and data["ppl"]["value"] > 1

    dest = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(out),
                "--tasks",
                "arc_easy,piqa",
                "--limit",
                "1",
                "--ppl",
                "none",
                "--json",
                str(dest),
            ]
        )
        == 0
    )
    saved = json.loads(dest.read_text())
    assert (
        set(saved["tasks"]) == {"arc_easy", "piqa"}
        and saved["mean_acc_paper7"] is None
        and "ppl" not in saved
    )
    assert main(["eval", str(out), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


LOCAL_TASK = """task: tiny_arc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices.text}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_adapter_agrees_with_our_scoring(tmp_path, monkeypatch):
    """lm-evaluation-harness on an in-memory pruned model with a local task (no network), and
    our scorer gives the same per-option log-likelihoods and accuracies on the same questions."""
    from tyr.eval import lm_eval_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    rows = [
        {
            "question": f"w{i} w{i + 1} w{i + 2}",
            "choices": {"text": [f"w{i + 3}", f"w{i + 5} w{i + 1}", "w9"], "label": ["A", "B", "C"]},
            "answerKey": "ABC"[i % 3],
        }
        for i in range(6)
    ]
    data = tmp_path / "tiny_arc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "tiny_arc.yaml").write_text(LOCAL_TASK.format(data=data))
    _, sliced, _, _ = pruned_pair("llama", "free")
    tok = tiny_tokenizer()
    tok.eos_token = "<unk>"
    out = lm_eval_harness(sliced, tok, ["tiny_arc"], include_path=tasks_dir)
    res = out["results"]["tiny_arc"]

    from tyr.data.tasks import _arc

    ours = [score_doc(sliced, tok, _arc(r)) for r in rows]
    theirs = {s["doc_id"]: [float(x[0]) for x in s["filtered_resps"]] for s in out["samples"]["tiny_arc"]}
    for i, lls in enumerate(ours):
        assert lls == pytest.approx(theirs[i], abs=1e-4)
    acc = (
        sum(
            max(range(3), key=lambda j: lls[j]) == "ABC".index(r["answerKey"])
            for lls, r in zip(ours, rows, strict=True)
        )
        / 6
    )
    assert res["acc,none"] == pytest.approx(acc)
    lengths = [[len(t) for t in r["choices"]["text"]] for r in rows]
    acc_norm = (
        sum(
            max(range(3), key=lambda j: lls[j] / n[j]) == "ABC".index(r["answerKey"])
            for lls, n, r in zip(ours, lengths, rows, strict=True)
        )
        / 6
    )
    assert res["acc_norm,none"] == pytest.approx(acc_norm)
