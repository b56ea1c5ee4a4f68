"""The run directory's layout: completion by key set and the fingerprint recipe."""

from __future__ import annotations

import pytest

from w2sr.layout import check_keys, fingerprint


def test_a_replay_that_repeats_one_sample_and_loses_another_is_not_complete():
    expected = {("p1", 0), ("p1", 1), ("p2", 0)}
    check_keys("traces", [("p2", 0), ("p1", 1), ("p1", 0)], expected)
    with pytest.raises(RuntimeError) as error:
        check_keys("traces", [("p1", 0), ("p1", 0), ("p2", 0)], expected)  # as many rows
    assert "missing 1 (first: [('p1', 1)])" in str(error.value)
    assert "duplicated 1 (first: [('p1', 0)])" in str(error.value)
    with pytest.raises(RuntimeError, match=r"unexpected 1 \(first: \[\('p3', 0\)\]\)"):
        check_keys("traces", [("p1", 0), ("p1", 1), ("p2", 0), ("p3", 0)], expected)


def test_a_fingerprint_follows_its_fields_and_its_inputs():
    base = fingerprint({"lr": 1e-3}, "traces-a")
    assert base == fingerprint({"lr": 1e-3}, "traces-a")
    assert base != fingerprint({"lr": 2e-3}, "traces-a")
    assert base != fingerprint({"lr": 1e-3}, "traces-b")


def test_a_stage_claim_keeps_what_earlier_attempts_spent(tmp_path):
    from w2sr.rundir import RunDir

    run = RunDir(str(tmp_path))
    assert run.begin("traces", "a") == 0.0
    run.write_text("x", "traces", "shard-00000.parquet")
    run.spent("traces", "a", 12.5)  # then the attempt is killed
    assert run.begin("traces", "a") == 12.5  # the rerun counts it
    assert run.exists("traces", "shard-00000.parquet")
    with pytest.raises(RuntimeError, match="holds work of fingerprint a, not b"):
        run.begin("traces", "b")  # a folder is one fingerprint's; another's is never mixed in
    assert run.exists("traces", "shard-00000.parquet")


def test_a_second_submission_on_a_stage_stops_until_the_lease_lapses(tmp_path):
    import socket
    import subprocess
    import time

    import pytest

    from w2sr.rundir import LEASE, LeaseHeld, RunDir

    run = RunDir(str(tmp_path))
    other = {"owner": "other-host:12:abcd", "heartbeat": time.time(), "ttl_s": 60.0}
    run.write_json(other, "traces", LEASE)
    with pytest.raises(LeaseHeld, match="being worked on by other-host:12:abcd"):
        run.begin("traces", "a")
    run.write_json({**other, "heartbeat": time.time() - 61}, "traces", LEASE)  # lapsed
    run.begin("traces", "a")
    assert run.read_json("traces", LEASE)["owner"].startswith(socket.gethostname())
    run.mark_done("traces", "a")
    assert not run.exists("traces", LEASE)

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process of this machine that is gone holds nothing
    dead = {**other, "owner": f"{socket.gethostname()}:{gone.pid}:dead"}
    run.write_json(dead, "students/all", LEASE)
    run.begin("students/all", "b")
    run.mark_done("students/all", "b")
