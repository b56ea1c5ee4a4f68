"""Model specs: each kind parsed once, and a model's first use on a node by many processes at once
(Ray Train workers, the engines of several stages): it is copied or built once, appears whole,
and is never replaced while read."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import uuid
from pathlib import Path

import pytest


def _contents(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()}


def test_a_spec_is_parsed_into_its_kind(tmp_path, monkeypatch):
    from w2sr.models import ModelSpec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    kinds = {
        "builtin:tiny-random": "builtin",
        "s3://bucket/run/students/all/0123/model": "store",
        "file:///srv/models/teacher": "store",
        str(tmp_path / "teacher"): "folder",
        "teacher": "folder",  # a relative path that is there
        "./not-yet-there": "folder",  # reported by the config's check, not fetched from a hub
        "~/models/teacher": "folder",
        "Qwen/Qwen2.5-Math-1.5B": "hub",
    }
    assert {text: ModelSpec.parse(text).kind for text in kinds} == kinds
    assert ModelSpec.parse("builtin:khop-teacher").name == "khop-teacher"
    assert ModelSpec.parse("Qwen/Qwen2.5-Math-1.5B").text == "Qwen/Qwen2.5-Math-1.5B"


def test_an_unknown_builtin_is_an_error_that_names_the_known_ones():
    from w2sr.models import ModelSpec

    with pytest.raises(ValueError, match=r"unknown built-in 'nope'; one of \[.*'tiny-random'"):
        ModelSpec.parse("builtin:nope")


def test_a_folder_needs_a_config_and_a_hub_id_is_left_for_the_loaders(tmp_path, monkeypatch):
    from w2sr.models import ModelSpec

    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="model folder model has no config.json"):
        ModelSpec.parse("model").local()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert ModelSpec.parse("model").local() == str(tmp_path / "model")  # absolute
    assert ModelSpec.parse("org/model").local() == "org/model"
    assert not (tmp_path / "cache").exists()  # nothing copied or built


def test_a_store_copy_is_named_by_the_identity_given_else_by_the_uri(tmp_path, monkeypatch):
    """A trained model's folder keeps its URI when retrained: its copy on this machine is named
    by what the weights are known by, so new weights are copied again."""
    from w2sr.models import ModelSpec

    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "published"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"weights-1")
    spec = ModelSpec.parse(f"file://{source}")

    by_uri, first = spec.local(), spec.local('{"time": 1}')
    (source / "model.safetensors").write_bytes(b"weights-2")  # retrained in place

    assert spec.local() == by_uri and spec.local('{"time": 1}') == first  # copied once each
    assert (Path(by_uri) / "model.safetensors").read_bytes() == b"weights-1"
    again = spec.local('{"time": 2}')
    assert (Path(again) / "model.safetensors").read_bytes() == b"weights-2"
    assert len({by_uri, first, again}) == 3


def test_what_a_cluster_loads_from_a_local_run_dir(tmp_path, monkeypatch):
    """A store URI as it is (each node copies it), anything else as this machine has it; a local
    run dir gets no published built-in."""
    from w2sr import layout, models
    from w2sr.models import Builtin, ModelSpec
    from w2sr.rundir import RunDir

    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))

    def build(folder: Path) -> Path:
        (folder / "config.json").write_text("{}")
        return folder

    monkeypatch.setitem(models.BUILTINS, "fake", Builtin(build, (models,)))
    run = RunDir(str(tmp_path / "run"))
    uri = "s3://bucket/run/students/all/0123/model"

    assert ModelSpec.parse(uri).for_cluster(run) == uri
    built = ModelSpec.parse("builtin:fake").for_cluster(run)
    assert built == ModelSpec.parse("builtin:fake").local()
    assert Path(built).parts[-2:] == ("fake", models.builtin_digest("fake"))
    assert not run.exists(layout.BUILTINS)


_start = None  # a worker process's barrier before its first call


def _wait_for_all(barrier) -> None:
    global _start
    _start = barrier


def _use(spec: str) -> tuple[str, int, dict[str, str]] | str:
    """What a worker does on its node: get the model's folder, then read every file of it (as an
    engine loading it would); the folder's path, inode and contents, or the error raised."""
    global _start
    from w2sr.models import ModelSpec

    if _start is not None:  # every process's first call at once: the first use is concurrent
        _start.wait()
        _start = None
    try:
        folder = ModelSpec.parse(spec).local()
        return folder, os.stat(folder).st_ino, _contents(folder)
    except Exception as error:  # counted by the test: every call must succeed
        return f"{type(error).__name__}: {error}"


def _use_all(specs: list[str], processes: int) -> list:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    with context.Pool(processes, _wait_for_all, (barrier,)) as pool:
        return pool.map(_use, specs, chunksize=1)


def _assert_one_whole_folder(results: list, expected: dict[str, str]) -> None:
    errors = [r for r in results if isinstance(r, str)]
    assert errors == [], f"{len(errors)} of {len(results)} calls failed: {errors[:3]}"
    assert {(folder, inode) for folder, inode, _ in results} == {results[0][:2]}  # never replaced
    incomplete = [files for _, _, files in results if files != expected]
    assert incomplete == [], f"{len(incomplete)} readers saw a partial model: {incomplete[:2]}"


def test_concurrent_node_copies_of_one_model_are_one_whole_folder(s3_bucket, tmp_path, monkeypatch):
    """160 first uses of one model in object storage by 16 processes of a node, the first 16 at
    once: none fails, and each finds the one folder, with every file whole."""
    import pyarrow.fs as pafs

    source = tmp_path / "published"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "qwen2"}')
    (source / "tokenizer.json").write_text("{}")
    (source / "model.safetensors").write_bytes(os.urandom(16 << 20))
    uri = f"{s3_bucket}/models-{uuid.uuid4().hex[:8]}"
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(source), path, destination_filesystem=fs)
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))  # the spawned workers' too

    results = _use_all([uri] * 160, processes=16)

    _assert_one_whole_folder(results, _contents(str(source)))
    folders = [p for p in Path(results[0][0]).parent.iterdir() if p.is_dir()]
    assert folders == [Path(results[0][0])]  # no copy left behind


def test_a_copy_cut_short_by_a_killed_process_is_cleared_by_the_next(tmp_path, monkeypatch):
    from w2sr.models import ModelSpec, cache_dir

    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "published"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(os.urandom(1 << 20))
    uri = f"file://{source}"
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]  # the folder a copy by the URI fills
    killed = cache_dir().parent / "artifacts" / f"{key}.k1ll3d"  # a killed copy's staging
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half")

    folder = Path(ModelSpec.parse(uri).local())

    assert _contents(str(folder)) == _contents(str(source))
    assert [p for p in folder.parent.iterdir() if p.is_dir()] == [folder]


def test_a_uri_without_a_model_is_an_error_not_an_empty_folder(tmp_path, monkeypatch):
    from w2sr.models import ModelSpec

    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelSpec.parse(f"file://{tmp_path / 'empty'}").local()
    assert not any(p.is_dir() for p in (tmp_path / "cache" / "artifacts").iterdir())


def test_concurrent_builds_of_a_builtin_are_one_whole_folder(tmp_path, monkeypatch):
    """Processes that need a built-in not yet built on their machine: one builds it, the others
    wait and find it whole."""
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))

    results = _use_all(["builtin:tiny-random"] * 8, processes=4)

    assert not isinstance(results[0], str), results[0]
    _assert_one_whole_folder(results, _contents(results[0][0]))
    assert "config.json" in results[0][2] and "model.safetensors" in results[0][2]


def test_a_second_publisher_of_a_builtin_deletes_nothing_the_first_wrote(
    s3_bucket, tmp_path, monkeypatch
):
    """Two stages publish one built-in to an object-store run dir at once: the second checked
    for the done record before the first wrote it. Whatever the second does then, it must not
    delete the first's files, or a stage loading the model once the done record exists finds
    files missing. The bucket keeps versions, so any delete shows as a delete marker."""
    import boto3

    from w2sr import layout
    from w2sr.identity import model_identity
    from w2sr.models import ModelSpec
    from w2sr.rundir import DONE, RunDir

    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")  # the test server, through the fixture's environment
    bucket = f"w2sr-publish-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    run = RunDir(f"s3://{bucket}/run")
    spec = ModelSpec.parse("builtin:tiny-random")
    digest = model_identity(spec.text)
    folder = layout.builtin("tiny-random", digest)
    location = spec.for_cluster(run)
    run.delete(folder, DONE)  # the first publisher's files are up, its done record not yet

    assert spec.for_cluster(run) == location  # the second one publishes

    model = f"run/{folder}/{layout.MODEL}/"
    versions = s3.list_object_versions(Bucket=bucket, Prefix=model)
    assert [m["Key"] for m in versions.get("DeleteMarkers", [])] == []
    expected = {p.name: p.stat().st_size for p in Path(spec.local()).iterdir()}
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=model)["Contents"]
    files = {o["Key"].removeprefix(model): o["Size"] for o in listed if o["Key"] != model}
    assert files == expected
    assert run.done(folder, digest)["spec"] == "builtin:tiny-random"


def test_a_model_that_cannot_be_had_here_is_one_line_naming_its_key(tmp_path, monkeypatch, capsys):
    """Before Ray starts: a hub id out of the local cache while the hub is offline, a folder
    that is no model folder, one without a tokenizer; a hub id in the cache passes."""
    from huggingface_hub import constants

    from w2sr.cli import main
    from w2sr.recipe import EXIT_USAGE

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    demo = Path(__file__).parents[1] / "jobs" / "demo.yaml"
    run_dir = f"run_dir={tmp_path / 'run'}"
    assert main(["generate", str(demo), run_dir, "teacher=some-org/teacher"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("w2sr: teacher: some-org/teacher is not in the local hub cache and ")
    assert line.endswith("or set teacher to a local model folder")

    (tmp_path / "empty").mkdir()
    assert main(["train", str(demo), run_dir, f"student={tmp_path / 'empty'}"]) == EXIT_USAGE
    assert (
        capsys.readouterr().err
        == f"w2sr: student: model folder {tmp_path / 'empty'} has no config.json\n"
    )
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert main(["train", str(demo), run_dir, f"student={tmp_path / 'empty'}"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"w2sr: student: model folder {tmp_path / 'empty'} has no tokenizer (")

    from w2sr.models import ModelSpec

    snapshot = cache / "models--some-org--teacher" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--some-org--teacher" / "refs").mkdir()
    (cache / "models--some-org--teacher" / "refs" / "main").write_text("abc123")
    ModelSpec.parse("some-org/teacher").check("teacher")  # cached: no error
