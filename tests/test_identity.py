"""Fingerprints follow content: new weights at the same path, or a prompts file edited in place,
never reuse what was made from the old ones; a built-in model follows the source that builds it,
known without building it."""

from __future__ import annotations

import json
import os
import types

import pytest

from w2sr import layout, models
from w2sr.config import validate
from w2sr.identity import content_digest, model_identity
from w2sr.lineage import Lineage
from w2sr.models import Builtin, builtin_digest


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
    before = Lineage(cfg).prompts.fingerprint
    assert Lineage(cfg).prompts.fingerprint == before
    path.write_text(json.dumps({"problem": "1+2", "answer": "3"}) + "\n")
    assert Lineage(cfg).prompts.fingerprint != before


def _never_built(folder):
    raise AssertionError("a built-in was built to be known")


@pytest.fixture
def builder(tmp_path, monkeypatch):
    """A built-in `fake` whose builder is a module file of the test's own, never run."""
    module = types.ModuleType("fake_builder")
    module.__file__ = str(tmp_path / "fake_builder.py")
    (tmp_path / "fake_builder.py").write_text("HIDDEN = 128\n")
    monkeypatch.setitem(models.BUILTINS, "fake", Builtin(_never_built, (module,)))
    monkeypatch.setitem(models.BUILTINS, "fake-2", Builtin(_never_built, (module,)))
    return tmp_path / "fake_builder.py"


def test_a_builtin_is_known_by_its_builder_without_being_built(builder, tmp_path, monkeypatch):
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    first = model_identity("builtin:fake")
    assert first == builtin_digest("fake") and model_identity("builtin:fake") == first
    assert model_identity("builtin:fake-2") != first  # one builder, two models
    builder.write_text("HIDDEN = 256\n")  # a changed recipe: a new model
    assert model_identity("builtin:fake") != first
    assert models._builtin_folder("fake").name == model_identity("builtin:fake")
    assert not (tmp_path / "cache" / "models").exists()


def test_a_config_of_the_world_s_builtins_is_fingerprinted_without_building(tmp_path, monkeypatch):
    """What planning does for the demo: every fingerprint and published folder of a config whose
    models are all built-ins, with none built on this machine."""
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    cfg = validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "builtin:khop-teacher",
            "student": "builtin:khop-student",
            "prompts": {"source": {"type": "khop"}},
        }
    )
    lineage = Lineage(cfg)
    assert [a.fingerprint for a in lineage.artifacts]
    assert [a.folder for a in lineage.builtins] == [
        layout.builtin(name, builtin_digest(name)) for name in ("khop-teacher", "khop-student")
    ]
    assert not (tmp_path / "cache" / "models").exists()
