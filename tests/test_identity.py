"""Fingerprints follow content: new weights at the same path, or a prompts file edited in place,
never reuse what was made from the old ones."""

from __future__ import annotations

import json
import os

from w2sr.config import validate
from w2sr.identity import content_digest, model_identity
from w2sr.lineage import prompts


def test_a_folder_is_known_by_its_content_not_its_timestamps(tmp_path, monkeypatch):
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights-1")
    first = model_identity(str(folder))
    os.utime(folder / "model.safetensors", ns=(1, 1))  # touched, same bytes
    assert model_identity(str(folder)) == first
    (folder / "model.safetensors").write_bytes(b"weights-2")  # new weights, same path
    assert model_identity(str(folder)) != first
    assert model_identity("org/not-in-the-hub-cache") == "org/not-in-the-hub-cache"


def test_digests_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "prompts.jsonl"
    path.write_text("a")
    digest = content_digest(path)
    cache = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert [entry[2] for entry in cache.values()] and content_digest(path) == digest


def test_a_prompts_file_edited_in_place_changes_the_prompt_set(tmp_path, monkeypatch):
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    source = {"type": "file", "path": str(path)}
    cfg = validate(
        {"run_dir": str(tmp_path / "run"), "teacher": "org/t", "prompts": {"source": source}}
    )
    before = prompts(cfg).fingerprint
    assert prompts(cfg).fingerprint == before
    path.write_text(json.dumps({"problem": "1+2", "answer": "3"}) + "\n")
    assert prompts(cfg).fingerprint != before
