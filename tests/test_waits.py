"""Every wait has a bound and an error that names what it waited for.

A sweep stops a stage that runs past `stage_timeout_s`, with every process it started, and gives
up on a stage another live submission holds after `LEASE_WAIT_S`; GRPO's calls to its rollout
engines (generation, sleep and wake-up, weight loads) fail naming the call and the engines that
did not answer.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from w2sr import layout
from w2sr.config import validate
from w2sr.lineage import Lineage
from w2sr.rundir import DONE, LEASE, RunDir
from w2sr.sweep import runner
from w2sr.sweep.config import SweepConfig
from w2sr.sweep.plan import plan


def sweep(tmp: Path, address: str) -> SweepConfig:
    """One teacher and one student, folders with a config and a tokenizer file and nothing to
    load (nothing here gets that far), on the cluster at `address`, so that the runner starts no
    Ray of its own."""
    for name in ("a", "s"):
        (tmp / name).mkdir()
        for file in ("config.json", "tokenizer_config.json"):
            (tmp / name / file).write_text("{}")
    problems = tmp / "prompts.jsonl"
    problems.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    return SweepConfig.model_validate(
        {
            "base": {
                "prompts": {"source": {"type": "file", "path": str(problems)}},
                "ray": {"address": address},
            },
            "run_dir": str(tmp / "study"),
            "teachers": [{"label": "a", "model": str(tmp / "a")}],
            "students": [{"label": "s", "model": str(tmp / "s")}],
            "variants": ["all"],
        }
    )


def stage_processes() -> list[psutil.Process]:
    """The `w2sr` commands this test process started that are still running."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "w2sr.cli" in process.cmdline():
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture
def silent_cluster():
    """An address where something listens and never answers: a stage that joins it waits."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_stopping_a_stage_ends_every_process_it_started(tmp_path):
    """A stage's own processes (here one that ignores SIGTERM) go with it."""
    pids = tmp_path / "child.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not pids.exists() or not pids.read_text():
        assert time.time() < deadline and proc.poll() is None, "the stage did not start"
        time.sleep(0.1)
    child = psutil.Process(int(pids.read_text()))
    started = time.time()
    runner.stop(proc, grace_s=1.0)
    assert time.time() - started < 30
    assert proc.returncode == -signal.SIGTERM
    child.wait(timeout=10)  # it ignored SIGTERM: SIGKILL took it
    assert not child.is_running()


def test_a_stage_past_the_sweeps_timeout_is_stopped_and_failed_naming_it(
    tmp_path, monkeypatch, silent_cluster
):
    """The teacher's traces wait on a cluster that never answers: the runner stops them at the
    bound, counts them failed naming it, and blocks what needs them, instead of waiting."""
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    cfg = sweep(tmp_path, silent_cluster)
    _, nodes = plan(cfg)
    traces = next(key for key, node in nodes.items() if node.command == "generate")
    sets = next(key for key, node in nodes.items() if node.command == "select")
    run = RunDir(cfg.run_dir)
    started = time.time()
    outcomes = runner.run_graph(
        {key: nodes[key] for key in (traces, sets)}, run, 2, stage_timeout_s=3
    )
    assert time.time() - started < 120
    failed = outcomes[traces]
    assert failed.state == "failed"
    assert f"{traces} ran past the sweep's stage_timeout_s of 3s" in failed.error
    assert 3 <= failed.seconds < 3 + runner.STOP_GRACE_S + 10
    assert outcomes[sets].state == "blocked" and outcomes[sets].error == f"needs {traces}"
    log = run.read_text(*layout.sweep_log(traces))
    assert "stage_timeout_s of 3s" in log
    assert not stage_processes()


def test_a_stage_held_by_a_live_submission_is_given_up_after_the_bound(
    tmp_path, monkeypatch, caplog, silent_cluster
):
    """A live process holds the student's lease: its training is retried once, then reported
    blocked with the holder's message once `LEASE_WAIT_S` has passed."""
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "LEASE_WAIT_S", 1.0)
    monkeypatch.setattr(runner, "LEASE_RETRY_S", 0.0)
    cfg = sweep(tmp_path, silent_cluster)
    _, nodes = plan(cfg)
    keys = [next(k for k, n in nodes.items() if n.command == c) for c in ("generate", "select")]
    train = next(node for node in nodes.values() if node.command == "train")
    run = RunDir(cfg.run_dir)
    # The traces and the sets are complete: training is what runs.
    traces, sets = Lineage(train.config).traces, Lineage(train.config).sft
    run.write_json({"fingerprint": traces.fingerprint}, traces.folder, DONE)
    run.write_json({"fingerprint": sets.fingerprint}, sets.folder, DONE)
    run.write_json({"all": {"traces": 2}}, sets.folder, layout.SFT_SUMMARY)
    student = Lineage(train.config).student("all")
    assert train.key == student.folder
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from w2sr.rundir import RunDir\n"
         "RunDir(sys.argv[1]).begin(sys.argv[2], sys.argv[3])\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n",
         cfg.run_dir, student.folder, student.fingerprint],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        owner = run.read_json(student.folder, LEASE)["owner"]
        with caplog.at_level(logging.INFO, logger=runner.__name__):
            outcomes = runner.run_graph({**{k: nodes[k] for k in keys}, train.key: train}, run, 1)
        assert holder.poll() is None  # it held the lease throughout
    finally:
        holder.kill()
        holder.wait()
    blocked = outcomes[train.key]
    assert blocked.state == "blocked"
    assert f"{train.key} is still held by another submission" in blocked.error
    assert "LEASE_WAIT_S 1s" in blocked.error and owner in blocked.error
    retries = [r for r in caplog.records if "held by another submission; retrying" in r.message]
    assert len(retries) == 1  # retried once: the second refusal came after the bound
    assert not stage_processes()


def test_waits_on_rollout_engines_fail_naming_the_call_and_the_engine(ray_session, monkeypatch):
    import torch
    from ray.exceptions import GetTimeoutError

    from w2sr.engines import rollout
    from w2sr.engines.weight_sync import ObjectStoreSender
    from w2sr.learner.rollouts import Rollouts

    class Engine:
        """Stands in for a rollout engine: answers each call after `delay` seconds, as a healthy
        one does, or past the bound, as a hung one. Local, so that Ray ships it by value."""

        def __init__(self, delay: float):
            import torch  # noqa: F401  (loaded, as in an engine: weights arrive as tensors)

            self.delay = delay

        def generate(self, prompts, sampling, n, seeds):
            time.sleep(self.delay)
            done = {"token_ids": [1], "text": "2", "finish_reason": "stop"}
            return [[done] * n for _ in prompts]

        def sleep(self):
            time.sleep(self.delay)

        def wake_up(self):
            time.sleep(self.delay)

        def load_weights(self, named_tensors):
            time.sleep(self.delay)
            return len(named_tensors)

    for bound in ("GENERATE_TIMEOUT_S", "SLEEP_TIMEOUT_S", "SYNC_TIMEOUT_S"):
        monkeypatch.setattr(rollout, bound, 2.0)
    remote = ray_session.remote(num_cpus=0, max_concurrency=8)(Engine)
    engines = [remote.remote(0.0), remote.remote(60.0)]  # the second hangs
    ray_session.get([engine.__ray_ready__.remote() for engine in engines])  # both started
    cfg = validate(
        {
            "run_dir": "unused",
            "teacher": "org/a",
            "student": "org/s",
            "use_gpu": True,  # colocated engines on GPUs sleep while the learner updates
            "grpo": {"prompts_per_step": 4, "group_size": 2, "placement": "colocated"},
        }
    )
    rollouts = Rollouts(cfg, engines)
    prompts = [
        {"prompt_id": str(i), "prompt_token_ids": [1, 2], "prefill": "", "answer": "2"}
        for i in range(4)
    ]

    def sync():
        sender = ObjectStoreSender(engines)
        sender.send("lm_head.weight", torch.zeros(2))
        return sender.finish()

    try:
        for call, wait in [
            ("generate", lambda: rollouts.sample(prompts, 0)),
            ("sleep", rollouts.sleep),
            ("wake_up", rollouts.wake_up),
            ("load_weights", sync),
        ]:
            started = time.time()
            expected = f"rollout engine\\(s\\) 1 of 2 did not answer {call} within 2s"
            with pytest.raises(GetTimeoutError, match=expected):
                wait()
            assert time.time() - started < 30, call
    finally:
        for engine in engines:
            ray_session.kill(engine)
