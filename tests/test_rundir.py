"""A stage's claim, spending and done record; leases as they run: renewed, retried when a renewal
fails, lost by an owner that could not renew or was taken over, won by exactly one of two claims;
a metrics log torn by a crash; an evaluation that finds its model's lease held."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from w2sr import layout, rundir
from w2sr.config import validate
from w2sr.evaluation.results import plan_tasks
from w2sr.lineage import Artifact
from w2sr.rundir import DONE, LEASE, RUN, LeaseHeld, LeaseLost, MetricsLog, RunDir
from w2sr.stages.evaluate import evaluate


def block(path: Path) -> None:
    """Make every write of the file at `path` fail: a folder takes its place (as root, a
    read-only folder would not stop a write)."""
    while True:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            path.mkdir()
            return
        except FileExistsError:  # a renewal wrote the file back in between
            continue


def heartbeat_age(path: Path) -> float:
    return time.time() - json.loads(path.read_text())["heartbeat"]


OTHER = {"owner": "other-host:12:abcd", "heartbeat": time.time(), "ttl_s": 60.0}
TRACES = Artifact("traces/a", "a")


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run dir whose claims do not wait for a racing claimant: there is none in this process."""
    monkeypatch.setattr(rundir, "LEASE_SETTLE_S", 0.0)
    return RunDir(str(tmp_path))


def other_holds(run: RunDir, folder: str) -> dict:
    """Another live submission's lease on `folder`."""
    held = {**OTHER, "heartbeat": time.time()}
    run.write_json(held, folder, LEASE)
    return held


def test_a_stage_that_ends_is_done_with_its_facts_and_released(run):
    with run.stage(TRACES) as claim:
        assert not claim.record and claim.prior_seconds == 0.0
        assert run.read_json("traces/a", LEASE)["owner"].startswith(socket.gethostname())
        run.write_text("x", "traces/a", "shard-00000.parquet")
        claim.spent(3.0)
        claim.facts = {"traces": 4, "worker_seconds": 3.0}
    assert run.read_json("traces/a", DONE) == {
        "fingerprint": "a",
        "traces": 4,
        "worker_seconds": 3.0,
    }
    assert claim.record == run.read_json("traces/a", DONE)
    assert run.done("traces/a", "a") == claim.record
    assert not run.exists("traces/a", LEASE)


def test_a_stage_that_fails_is_not_done_keeps_its_spending_and_is_released(run):
    with pytest.raises(ValueError, match="the engine died"), run.stage(TRACES) as claim:
        claim.spent(12.5)
        claim.facts = {"traces": 4}
        raise ValueError("the engine died")
    assert not run.exists("traces/a", DONE) and run.done("traces/a", "a") is None
    assert not run.exists("traces/a", LEASE)
    assert run.read_json("traces/a", RUN) == {"fingerprint": "a", "worker_seconds": 12.5}
    assert not claim.record


def test_a_resumed_stage_counts_what_earlier_attempts_spent(run):
    with pytest.raises(RuntimeError), run.stage(TRACES) as claim:
        run.write_text("x", "traces/a", "shard-00000.parquet")
        claim.spent(12.5)
        raise RuntimeError("killed")
    with run.stage(TRACES) as claim:
        assert claim.prior_seconds == 12.5  # the rerun counts it
        assert run.exists("traces/a", "shard-00000.parquet")  # and resumes the work it left
        claim.spent(claim.prior_seconds + 2.0)
        claim.facts = {"worker_seconds": claim.prior_seconds + 2.0}
    assert run.read_json("traces/a", RUN)["worker_seconds"] == 14.5
    assert run.done("traces/a", "a")["worker_seconds"] == 14.5


def test_a_folder_holding_another_fingerprints_work_is_refused_and_left_as_it_is(run):
    run.write_json({"fingerprint": "b", "worker_seconds": 7.0}, "traces/a", RUN)
    run.write_text("x", "traces/a", "shard-00000.parquet")
    refused = pytest.raises(RuntimeError, match="traces/a holds work of fingerprint b, not a")
    with refused, run.stage(TRACES):
        raise AssertionError("the block ran")
    assert run.read_json("traces/a", RUN) == {"fingerprint": "b", "worker_seconds": 7.0}
    assert run.exists("traces/a", "shard-00000.parquet") and not run.exists("traces/a", LEASE)


def test_a_stage_another_submission_holds_is_refused_and_left_to_it(run):
    held = other_holds(run, "traces/a")
    refused = pytest.raises(LeaseHeld, match="traces/a is being worked on by other-host:12:abcd")
    with refused, run.stage(TRACES):
        raise AssertionError("the block ran")
    assert run.read_json("traces/a", LEASE) == held
    assert not run.exists("traces/a", RUN) and not run.exists("traces/a", DONE)
    run.write_json({**held, "heartbeat": time.time() - 61}, "traces/a", LEASE)  # lapsed
    with run.stage(TRACES):
        assert run.read_json("traces/a", LEASE)["owner"].startswith(socket.gethostname())
    assert run.done("traces/a", "a") == {"fingerprint": "a"}


def test_a_complete_stage_is_neither_claimed_nor_written(run):
    run.write_json({"fingerprint": "a", "traces": 4}, "traces/a", DONE)
    held = other_holds(run, "traces/a")  # were it claimed, this lease would refuse it
    with run.stage(TRACES) as claim:
        assert claim.record == {"fingerprint": "a", "traces": 4}
        claim.facts = {"traces": 5}
    assert run.read_json("traces/a", DONE) == {"fingerprint": "a", "traces": 4}
    assert run.read_json("traces/a", LEASE) == held and not run.exists("traces/a", RUN)


def test_a_stage_finished_by_another_while_it_was_claimed_is_not_done_again(run, monkeypatch):
    claim_folder = RunDir._claim

    def claim_after_the_other_finished(self, stage, ttl_s=rundir.LEASE_TTL_S):
        self.write_json({"fingerprint": "a", "by": "the other"}, stage, DONE)
        claim_folder(self, stage, ttl_s)

    monkeypatch.setattr(RunDir, "_claim", claim_after_the_other_finished)
    with run.stage(TRACES) as claim:
        assert claim.record == {"fingerprint": "a", "by": "the other"}
    assert run.read_json("traces/a", DONE) == {"fingerprint": "a", "by": "the other"}
    assert not run.exists("traces/a", LEASE) and not run.exists("traces/a", RUN)


def test_a_waiting_claim_takes_what_the_holder_finished_or_the_work_it_gave_up(run, monkeypatch):
    """For inputs many stages prepare at once (the problem set): the second waits for the first."""
    monkeypatch.setattr(rundir, "LEASE_POLL_S", 0.05)

    def then(seconds: float, *writes) -> threading.Timer:
        def act():
            for write in writes:
                write()

        timer = threading.Timer(seconds, act)
        timer.start()
        return timer

    other_holds(run, "problems/a")
    problems = Artifact("problems/a", "a")
    finished = then(
        0.3,
        lambda: run.write_json({"fingerprint": "a", "problems": 7}, "problems/a", DONE),
        lambda: run.delete("problems/a", LEASE),
    )
    with run.stage(problems, wait=True) as claim:
        assert claim.record == {"fingerprint": "a", "problems": 7}
    finished.join()
    other_holds(run, "problems/b")
    with pytest.raises(LeaseHeld), run.stage(Artifact("problems/b", "b")):  # without `wait`
        raise AssertionError("the block ran")

    gave_up = then(0.3, lambda: run.delete("problems/b", LEASE))  # failed, released
    start = time.time()
    with run.stage(Artifact("problems/b", "b"), wait=True) as claim:
        assert not claim.record and time.time() - start >= 0.3
        claim.facts = {"problems": 8}
    gave_up.join()
    assert run.done("problems/b", "b") == {"fingerprint": "b", "problems": 8}


def test_a_lease_is_renewed_and_a_renewal_that_fails_is_retried(tmp_path):
    run = RunDir(str(tmp_path))
    lease = tmp_path / "traces" / LEASE
    run._claim("traces", ttl_s=2.0)
    try:
        for _ in range(2):  # two ttls: renewed all along
            time.sleep(2.0)
            assert heartbeat_age(lease) < 2.0
        block(lease)  # the store out of reach for a quarter of the ttl
        time.sleep(0.5)
        lease.rmdir()
        time.sleep(1.0)
        assert heartbeat_age(lease) < 2.0  # renewed again, not abandoned after one failure
        run.write_text("x", "traces", "shard-00000.parquet")  # still the owner
    finally:
        run._release("traces")
    assert not lease.exists()


def test_an_owner_that_cannot_renew_for_longer_than_its_lease_stops_at_its_next_write(tmp_path):
    run = RunDir(str(tmp_path))
    run._claim("traces", ttl_s=1.0)
    run.spent("traces", "a", 1.0)
    lease = tmp_path / "traces" / LEASE
    block(lease)
    time.sleep(1.5)
    lost = r"traces: this process lost its lease on the stage \(not renewed for .*its 1s; last err"
    with pytest.raises(LeaseLost, match=lost):
        run.write_parquet(pa.table({"x": [1]}), "traces", "shard-00000.parquet")
    with pytest.raises(LeaseLost, match=lost):
        run.spent("traces", "a", 2.0)
    with pytest.raises(LeaseLost, match=lost), run.staged_folder("traces", "model"):
        pass
    with pytest.raises(LeaseLost, match=lost):
        run.mark_done("traces", "a")
    assert not run.exists("traces", "shard-00000.parquet") and not run.exists("traces", DONE)
    assert run.read_json("traces", "_RUN.json")["worker_seconds"] == 1.0

    lease.rmdir()  # meanwhile another submission took the stage
    other = {"owner": "other-host:12:abcd", "heartbeat": time.time(), "ttl_s": 60.0}
    lease.write_text(json.dumps(other))
    run._release("traces")
    assert run.read_json("traces", LEASE) == other  # a lost lease is not ours to delete


OWNER = """
import sys, time
from w2sr.rundir import LeaseLost, RunDir
run = RunDir(sys.argv[1])
run._claim("traces", ttl_s=float(sys.argv[2]))
print("claimed", flush=True)
try:
    while True:
        run.write_text("x", "traces", "progress.txt")
        time.sleep(0.05)
except LeaseLost as error:
    print(error, flush=True)
    sys.exit(3)
"""


def test_an_owner_whose_lease_another_process_took_stops_with_a_clear_error(tmp_path):
    """The owner is frozen (SIGSTOP: a VM pause, a stalled node) past its lease, another process
    takes the stage; woken, the owner stops at its next write and leaves the new lease alone."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path), "2.0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout.readline().strip() == "claimed"
        os.kill(owner.pid, signal.SIGSTOP)
        time.sleep(3.0)
        run = RunDir(str(tmp_path))
        run._claim("traces")  # lapsed: not renewed for longer than its ttl
        ours = run.read_json("traces", LEASE)
        os.kill(owner.pid, signal.SIGCONT)
        assert owner.wait(timeout=60) == 3
        said = owner.stdout.read()
        assert f"{tmp_path}/traces: this process lost its lease on the stage" in said
        time.sleep(1.0)  # a renewal the owner still made would show by now
        assert run.read_json("traces", LEASE) == ours
        run._release("traces")
    finally:
        if owner.poll() is None:
            os.kill(owner.pid, signal.SIGCONT)
            owner.kill()
        owner.wait()


CLAIMANT = """
import os, sys, time
from w2sr.rundir import LeaseHeld, RunDir
run = RunDir(sys.argv[1])
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    run._claim("traces")
except LeaseHeld:
    print("held", flush=True)
    sys.exit(0)
print("won", flush=True)
time.sleep(3.0)  # held while the others decide
run._release("traces")
"""


@pytest.mark.parametrize("store", ["local", "s3"])
def test_of_three_claims_at_once_exactly_one_wins(store, tmp_path, request):
    """On a local disk and on an object store, which has no create-if-absent."""
    if store == "s3":
        run_dir = f"{request.getfixturevalue('s3_bucket')}/run-{uuid.uuid4().hex[:8]}"
    else:
        run_dir = str(tmp_path / "run")
    go = tmp_path / "go"
    claimants = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMANT, run_dir, str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        assert [c.stdout.readline().strip() for c in claimants] == ["ready"] * 3
        go.touch()
        said = sorted(c.stdout.readline().strip() for c in claimants)
        assert said == ["held", "held", "won"]
        assert [c.wait(timeout=60) for c in claimants] == [0, 0, 0]
    finally:
        for claimant in claimants:
            claimant.kill()
            claimant.wait()
    assert not RunDir(run_dir).exists("traces", LEASE)


def test_leased_folders_are_released_also_when_one_is_held(tmp_path):
    run = RunDir(str(tmp_path))
    with run.leased(["eval/a", "eval/b"]):
        owners = {run.read_json(f, LEASE)["owner"] for f in ("eval/a", "eval/b")}
        assert {o.rsplit(":", 1)[0] for o in owners} == {f"{socket.gethostname()}:{os.getpid()}"}
    assert not run.exists("eval/a", LEASE) and not run.exists("eval/b", LEASE)
    other = {"owner": "other-host:12:abcd", "heartbeat": time.time(), "ttl_s": 60.0}
    run.write_json(other, "eval/b", LEASE)
    held = pytest.raises(LeaseHeld, match="eval/b is being worked on by other-host")
    with held, run.leased(["eval/a", "eval/b"]):
        pass
    assert not run.exists("eval/a", LEASE) and run.read_json("eval/b", LEASE) == other


def test_a_metrics_log_torn_by_a_crash_is_cut_to_its_whole_records(tmp_path):
    run = RunDir(str(tmp_path))
    log_file = tmp_path / "students" / "all" / "fp" / "metrics.jsonl"
    log_file.parent.mkdir(parents=True)
    whole = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2))
    log_file.write_text(whole + '{"step": 3, "lo')  # the node died mid-append
    MetricsLog(run, "students/all/fp").write({"step": 3, "loss": 0.5})
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 0.5


def test_an_evaluation_whose_model_another_owner_evaluates_stops_and_keeps_its_parts(
    tmp_path, monkeypatch
):
    """Two evaluations of one model (two sweeps, a sweep and `w2sr eval`): the second stops with
    LeaseHeld (exit status 3 from the command) before it removes the first one's parts."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    cfg = validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "org/teacher",
            "eval": {"benchmarks": [{"name": "offline", "limit": 1}], "samples": 1},
        }
    )
    [task], _ = plan_tasks(cfg)
    run = RunDir(cfg.run_dir)
    name = task.file[-1].removesuffix(".parquet")
    parts = (layout.EVAL, "teacher", layout.PARTS, name, "part-0.parquet")
    run.write_parquet(pa.table({"prompt_id": ["p"], "sample_index": [0]}), *parts)
    other = {"owner": "other-host:12:abcd", "heartbeat": time.time(), "ttl_s": 60.0}
    run.write_json(other, layout.EVAL, "teacher", LEASE)
    with pytest.raises(LeaseHeld, match="eval/teacher is being worked on by other-host:12:abcd"):
        evaluate(cfg)
    assert run.exists(*parts) and run.read_json(layout.EVAL, "teacher", LEASE) == other
