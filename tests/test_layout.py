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
    assert run.begin("traces", "b") == 0.0  # another config starts afresh
    assert not run.exists("traces", "shard-00000.parquet")
