"""Data sources, token batches and verified assets (with a locally built stand-in wheel)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_text, tiny_tokenizer

from tyr.data import text as data
from tyr.errors import UserError
from tyr.infra import assets


def test_token_batches_first_and_seeded():
    ids = torch.arange(100)
    first = data.token_batches(ids, 30, 10)
    assert first.shape == (3, 10) and first[1].tolist() == list(range(10, 20))
    a = data.token_batches(ids, 30, 10, seed=1)
    assert torch.equal(a, data.token_batches(ids, 30, 10, seed=1))
    assert not torch.equal(a, data.token_batches(ids, 30, 10, seed=2))
    assert len({tuple(r.tolist()) for r in a}) == 3  # distinct windows
    with pytest.raises(UserError, match="fewer than"):
        data.token_batches(ids, 200, 10)


def test_tokenize_prefix_has_no_special_tokens_and_matches_the_whole():
    tok = tiny_tokenizer()
    text = tiny_text(500)
    whole = data.tokenize(tok, text)
    part = data.tokenize(tok, text, 40)
    assert len(whole) == 500 and len(part) >= 40
    assert torch.equal(part, whole[: len(part)])


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_text_files(tmp_path, kind):
    docs = ["first doc", "second doc"]
    path = tmp_path / f"c.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(docs))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    else:
        pq.write_table(pa.table({"text": docs}), path)
    assert data.load_text(str(path)) == "first doc\n\nsecond doc"


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(UserError, match="unsupported"):
        data.load_text(str(tmp_path / "x.csv"))
    (tmp_path / "y.jsonl").write_text(json.dumps({"body": "a"}))
    with pytest.raises(UserError, match="no text column"):
        data.load_text(str(tmp_path / "y.jsonl"))


def _fake_wiki_wheel(folder, monkeypatch):
    entries = {f"Title {i}": {"title": f"T{i}", "extract": f"article {i} " * 5} for i in range(20)}
    entries["Empty"] = {"title": "E", "extract": ""}
    wheel = folder / "fake_wiki-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(data.WIKI_MEMBER, json.dumps(entries))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setitem(assets.ASSETS, "wiki", assets.Asset("fake-wiki", "0.0.0", wheel.name, sha))
    data._wiki_full.cache_clear()
    return entries


def test_wiki_split_from_a_verified_wheel(tmp_path, monkeypatch):
    entries = _fake_wiki_wheel(tmp_path, monkeypatch)
    monkeypatch.setenv("TYR_ASSETS", str(tmp_path))
    full = "\n\n".join(e["extract"] for e in entries.values() if e["extract"])
    calib, held = data.load_text("wiki"), data.load_text("wiki:heldout")
    assert calib + held == full and len(calib) == len(full) * 9 // 10
    assert data.load_text("wiki:calib") == calib
    data._wiki_full.cache_clear()


def test_a_corrupt_wheel_is_refused(tmp_path, monkeypatch):
    _fake_wiki_wheel(tmp_path, monkeypatch)
    bad = assets.ASSETS["wiki"]
    monkeypatch.setitem(assets.ASSETS, "wiki", assets.Asset(bad.package, bad.version, bad.wheel, "0" * 64))
    monkeypatch.setenv("TYR_ASSETS", str(tmp_path))
    with pytest.raises(UserError, match="sha256"):
        assets.wheel("wiki")
    data._wiki_full.cache_clear()
