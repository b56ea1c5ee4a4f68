"""Run dirs on object storage, against a real S3 API on 127.0.0.1 (`moto_server`): atomic files,
appends without append, folders published without a folder move, leases, an export cut short
that hides nothing finished, and built-in models published for every node."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from artifacts import trained_student

from w2sr import layout
from w2sr.config import validate
from w2sr.identity import content_digest, model_identity
from w2sr.lineage import Lineage
from w2sr.models import ModelSpec
from w2sr.registry import model_table
from w2sr.rundir import LEASE, LeaseHeld, MetricsLog, RunDir


@pytest.fixture
def s3_run(s3_bucket) -> str:
    return f"{s3_bucket}/run-{uuid.uuid4().hex[:8]}"


def test_s3_cannot_move_a_folder_so_nothing_relies_on_it(s3_run):
    """The server is real: a folder move fails there as it does on S3."""
    run = RunDir(s3_run)
    run.write_text("{}", "a", "config.json")
    with pytest.raises(OSError):
        run.fs.move(run.path("a"), run.path("b"))


def test_files_metrics_and_folders_reach_the_store(s3_run, tmp_path):
    run = RunDir(s3_run)
    table = pa.table({"x": [1, 2, 3]})
    run.write_parquet(table, "traces", "fp", "shard-00000.parquet")
    assert run.read_parquet("traces", "fp", "shard-00000.parquet").equals(table)
    assert run.list("traces", "fp") == ["shard-00000.parquet"]
    assert run.size("traces", "fp") == run.size("traces", "fp", "shard-00000.parquet") > 0
    run.write_json({"a": 1}, "traces", "fp", "_DONE.json")
    assert run.read_json("traces", "fp", "_DONE.json") == {"a": 1}

    record = {"step": 1, "loss": 2.0}
    first = MetricsLog(run, "students/all/fp", flush_seconds=3600)
    first.write(record)
    assert not run.exists("students/all/fp", "metrics.jsonl")  # not before a flush
    first.write({**record, "step": 2})
    first.flush()
    second = MetricsLog(run, "students/all/fp")  # a new attempt keeps the old lines
    second.write({**record, "step": 3})
    second.flush()
    lines = run.read_text("students/all/fp", "metrics.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]

    with run.staged_folder("students", "all", "fp", "model") as out:
        Path(out, "config.json").write_text("{}")
        Path(out, "nested").mkdir()
        Path(out, "nested", "weights.bin").write_bytes(b"w" * 1000)
        assert not run.exists("students", "all", "fp", "model")
    assert run.read_text("students", "all", "fp", "model", "config.json") == "{}"
    assert run.size("students", "all", "fp", "model", "nested", "weights.bin") == 1000
    assert sorted(run.list("students", "all", "fp")) == ["metrics.jsonl", "model"]

    run.delete("traces", "fp")
    assert not run.exists("traces", "fp", "shard-00000.parquet")
    info = run.fs.get_file_info(pafs.FileSelector(run.path(), recursive=True))
    assert not [i.path for i in info if ".tmp-" in i.path]  # no temporary file left behind


def test_a_lease_on_the_store_stops_a_second_submission(s3_run):
    import time

    run = RunDir(s3_run)
    other = {"owner": "other-host:12:abcd", "heartbeat": time.time(), "ttl_s": 60.0}
    run.write_json(other, "traces/fp", LEASE)
    with pytest.raises(LeaseHeld, match="other-host:12:abcd"):
        run.begin("traces/fp", "fp")
    run.write_json({**other, "heartbeat": time.time() - 61}, "traces/fp", LEASE)
    assert run.begin("traces/fp", "fp") == 0.0
    run.mark_done("traces/fp", "fp")
    assert not run.exists("traces/fp", LEASE)


def test_an_export_cut_short_leaves_the_previous_student_intact(s3_run):
    """A new config's export that dies midway (some of its files copied, no done record) hides
    nothing: the previous student stays whole and is still the one its config finds, the new
    one is not trained for its config, and its rerun publishes it."""
    data = {"run_dir": s3_run, "teacher": "org/teacher", "student": "org/student"}
    old, new = validate(data), validate({**data, "train": {"max_steps": 3}})
    folder = trained_student(old, "all", wall_seconds=1.0)
    run = RunDir(s3_run)
    run.write_bytes(b"old weights", folder, layout.MODEL, "model.safetensors")
    cut = Lineage(new).student("all").folder
    run.write_bytes(b"half of the new", cut, layout.MODEL, "model.safetensors")  # then killed

    models, _ = model_table(old)
    assert models["w2sr"].spec == f"{s3_run}/{folder}/{layout.MODEL}"
    assert run.read_bytes(folder, layout.MODEL, "model.safetensors") == b"old weights"
    models, skipped = model_table(new)
    assert "w2sr" not in models and "not trained for this config" in skipped["w2sr"]

    with run.staged_folder(cut, layout.MODEL) as out:  # the rerun's export
        Path(out, "config.json").write_text("{}")
        Path(out, "model.safetensors").write_bytes(b"new weights")
    run.mark_done(cut, Lineage(new).student("all").fingerprint)
    models, _ = model_table(new)
    assert models["w2sr"].spec == f"{s3_run}/{cut}/{layout.MODEL}"
    assert run.read_bytes(cut, layout.MODEL, "model.safetensors") == b"new weights"
    assert run.read_bytes(folder, layout.MODEL, "model.safetensors") == b"old weights"


def test_a_builtin_model_is_published_once_for_every_node(s3_run, tmp_path, monkeypatch):
    """On an object-store run dir a built-in is built on the driver and published into the run
    dir under its builder's digest; a worker's node copy has the same files; a second stage
    publishes nothing again. On a local run dir nothing is published."""
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    run = RunDir(s3_run)
    spec = ModelSpec.parse("builtin:tiny-random")
    location = spec.for_cluster(run)
    digest = model_identity(spec.text)
    folder = layout.builtin("tiny-random", digest)
    assert location == f"{s3_run}/{folder}/{layout.MODEL}"
    assert run.done(folder, digest)["spec"] == "builtin:tiny-random"
    record = run.fs.get_file_info(run.path(folder, "_DONE.json"))
    assert spec.for_cluster(run) == location
    assert run.fs.get_file_info(run.path(folder, "_DONE.json")).mtime == record.mtime

    copy = ModelSpec.parse(location).local()  # what a Ray Train worker or a rollout engine loads
    assert Path(copy) != Path(spec.local())
    assert content_digest(copy) == content_digest(spec.local())
    assert ModelSpec.parse(location).local() == copy  # once per node

    local = RunDir(str(tmp_path / "run"))
    assert spec.for_cluster(local) == spec.local()
    assert not local.exists(layout.BUILTINS)


def test_a_metrics_log_on_the_store_drops_a_torn_last_line(s3_run):
    run = RunDir(s3_run)
    whole = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2))
    run.write_text(whole + '{"step": 3, "lo', "rl", "fp", "metrics.jsonl")
    metrics = MetricsLog(run, "rl/fp")
    metrics.write({"step": 3, "loss": 0.5})
    metrics.flush()
    records = [json.loads(line) for line in run.read_text("rl/fp", "metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 0.5


def test_a_file_is_uploaded_to_its_key_never_copied_there(s3_bucket):
    """S3 refuses a CopyObject over 5 GiB, and a move on S3 is one: each file is uploaded to its
    own key (in parts, when large), and an error while it is made leaves no object. A versioned
    bucket keeps every object ever written, so it shows that no other key was written."""
    s3 = boto3.client("s3")  # the test server, through the fixture's environment
    bucket = f"w2sr-versions-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    run = RunDir(f"s3://{bucket}/run")
    data = os.urandom(12 << 20)  # more than one part of pyarrow's multipart upload
    run.write_bytes(data, "traces", "fp", "shard-00000.parquet")
    assert run.read_bytes("traces", "fp", "shard-00000.parquet") == data
    etag = s3.head_object(Bucket=bucket, Key="run/traces/fp/shard-00000.parquet")["ETag"]
    parts = etag.strip('"').partition("-")[2]  # a multipart upload's ETag ends in -<parts>
    assert parts and int(parts) > 1

    table = pa.table({"x": [1, 2]})

    def tables():
        yield table
        raise RuntimeError("the second table could not be made")

    with pytest.raises(RuntimeError, match="could not be made"):
        run.write_parquet_stream(tables(), table.schema, "prompts", "fp", "prompts.parquet")
    versions = s3.list_object_versions(Bucket=bucket, Prefix="run/")
    files = [v["Key"] for v in versions.get("Versions", []) if not v["Key"].endswith("/")]
    deleted = [m["Key"] for m in versions.get("DeleteMarkers", []) if not m["Key"].endswith("/")]
    assert files == ["run/traces/fp/shard-00000.parquet"] and deleted == []
