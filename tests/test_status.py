"""`w2sr status` and `w2sr stop` on run dirs in each state a stage can be in, made with the run
dir's own records (done records, leases held by a real process, a sweep's stage logs); no Ray.
The sweep's end-to-end test reads the status of a live sweep (test_sweep.py)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from test_sweep import STUDENT, sweep_file

from w2sr import layout
from w2sr.cli import main
from w2sr.config import load_config
from w2sr.lineage import Lineage
from w2sr.recipe import EXIT_OK, EXIT_USAGE
from w2sr.rundir import METRICS, RunDir
from w2sr.status import StageState, Study, live, status, table, time_left
from w2sr.sweep.config import load_sweep
from w2sr.sweep.plan import plan

ROOT = Path(__file__).parents[1]


def _sweep_run_dir(tmp_path: Path) -> tuple[RunDir, dict]:
    """A sweep's run dir as `w2sr sweep` leaves it before its first stage: its sweep.yaml."""
    run = RunDir(str(tmp_path / "run"))
    path = sweep_file(tmp_path, run.uri, [{"label": "a", "model": STUDENT}], STUDENT)
    cfg = load_sweep(path)
    run.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), *layout.SWEEP_CONFIG)
    return run, plan(cfg)[1]


def _hold(run: RunDir, stage: str) -> subprocess.Popen[str]:
    """A process of its own that holds the stage's lease, as a stage's driver does."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from w2sr.rundir import RunDir; "
         "RunDir(sys.argv[1]).begin(sys.argv[2], 'fp'); print('held', flush=True); "
         "time.sleep(600)", run.uri, stage],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def _by_stage(uri: str) -> dict:
    return {s.stage: s for s in status(uri).stages}


def test_status_follows_a_stage_from_waiting_to_running_failed_stopped_and_done(tmp_path, capsys):
    run, nodes = _sweep_run_dir(tmp_path)
    (traces,) = [key for key, node in nodes.items() if node.command == "generate"]
    (select,) = [key for key, node in nodes.items() if node.command == "select"]

    states = _by_stage(run.uri)
    assert set(states) == set(nodes)
    assert states[traces].state == "ready"
    assert states[select].state == "waiting" and traces in states[select].detail
    ready = {k for k, s in states.items() if s.state == "ready"}
    assert ready == {traces, *(k for k in nodes if k.startswith(("eval/teacher/", "eval/base/")))}
    assert {s.state for k, s in states.items() if k not in ready} == {"waiting"}

    # A sweep ran it and it failed: its log says how.
    log = "starting\nTraceback (most recent call last):\n  File ...\nRuntimeError: boom\n"
    run.write_text(log, *layout.sweep_log(traces))
    failed = _by_stage(run.uri)[traces]
    assert failed.state == "failed" and failed.detail.startswith("RuntimeError: boom (log: ")

    # Run again: a process of its own holds the stage's lease.
    holder = _hold(run, traces)
    try:
        running = _by_stage(run.uri)[traces]
        assert running.state == "running"
        assert running.detail.startswith("for 0m0")  # no prompt set yet: no progress
        assert f":{holder.pid}:" in running.detail  # its owner: host, process, claim

        assert main(["stop", run.uri, traces]) == EXIT_OK
        assert holder.wait(timeout=30) == -signal.SIGTERM
        assert f"stopped {traces} (process {holder.pid})" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert _by_stage(run.uri)[traces].state == "failed"  # its lease went with it
    assert main(["stop", run.uri, traces]) == EXIT_USAGE
    assert "is not running" in capsys.readouterr().err

    # Done: its time and cost, and what waited on it is ready.
    fingerprint = Lineage(nodes[traces].config).traces.fingerprint
    run.mark_done(traces, fingerprint, wall_seconds=65.2, worker_seconds=36.0)
    states = _by_stage(run.uri)
    assert (states[traces].state, states[traces].detail) == ("done", "1m05s, 0.010 worker-hours")
    assert states[select].state == "ready"
    assert main(["status", run.uri]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["STAGE", "COMMAND", "STATE", "DETAIL"]
    assert len(out) == len(nodes) + 3
    assert out[-2] == (
        f"1 of {len(nodes)} stages finished (1 done, 3 ready, {len(nodes) - 4} waiting); "
        "0.010 worker-hours spent"
    )
    assert out[-1] == "time left: unknown: no eval, select or train stage has finished yet"


def test_a_running_training_stage_says_how_far_it_is_and_about_how_long_it_has_left(tmp_path):
    run, nodes = _sweep_run_dir(tmp_path)
    (train, *_) = [key for key, node in nodes.items() if node.command == "train"]
    records = [{"step": step, "total_steps": 8, "loss": 1.0} for step in (1, 2)]
    run.write_text("".join(json.dumps(r) + "\n" for r in records), train, METRICS)
    holder = _hold(run, train)
    try:
        time.sleep(1.0)
        running = _by_stage(run.uri)[train]
    finally:
        holder.kill()
        holder.wait()
    assert running.state == "running"
    assert re.match(r"2 of 8 steps, about 0m0\ds left, for 0m0[12]s, by ", running.detail)
    assert 3 <= running.seconds <= 9  # three times what the two steps took


def test_time_left_goes_by_each_commands_finished_stages_and_the_stages_run_at_once():
    def stage(command: str, state: str, seconds: float | None = None) -> StageState:
        return StageState(f"{command}/{state}", command, state, "", seconds=seconds)

    stages = [
        stage("train", "done", 100),
        stage("train", "done", 300),
        stage("generate", "done", 9),
    ]
    stages += [stage("train", "running", 50), stage("train", "waiting"), stage("select", "skipped")]
    assert time_left(Study(stages, at_once=2)) == "time left: about 2m05s (2 at once)"  # (50+200)/2
    stages.append(stage("eval", "ready"))
    assert (
        time_left(Study(stages, at_once=2)) == "time left: unknown: no eval stage has finished yet"
    )


def test_a_run_dir_is_planned_as_w2sr_run_would_run_its_config(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    cfg = load_config(str(ROOT / "jobs" / "demo.yaml"), [f"run_dir={run.uri}"])
    run.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), layout.CONFIG)
    states = status(run.uri).stages
    commands = sorted(s.command for s in states)
    assert commands == ["eval"] * 6 + ["generate", "grpo", "select"] + ["train"] * 3
    trained = sorted(s.stage.split("/")[1] for s in states if s.command == "train")
    assert trained == ["all", "correct", "incorrect"]
    ready = sorted(s.command for s in states if s.state == "ready")
    assert ready == ["eval", "eval", "generate", "grpo"]  # the teacher, the base student, and RL


def test_status_of_a_folder_that_is_no_run_dir_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]
    assert main(["stop", str(tmp_path), "traces/0"]) == EXIT_USAGE


def screen(written: str) -> list[str]:
    """What a terminal shows after `written`: its lines, each `ESC[nF ESC[J` (up n lines,
    clear below) taking the last n away."""
    lines: list[str] = []
    for i, part in enumerate(re.split(r"\x1b\[(\d+)F\x1b\[J", written.replace("\r\n", "\n"))):
        if i % 2:
            del lines[len(lines) - int(part) :]
        else:
            lines += part.splitlines()
    return lines


def test_a_sweep_on_a_terminal_sees_the_table_redrawn_and_other_output_above_it(
    tmp_path, monkeypatch
):
    """On a pseudo-terminal: what others write to it while the table is up (Ray's lines, the
    log) goes above the table, which stays whole and ends as the run dir's final table."""
    monkeypatch.setenv("LINES", "100")
    monkeypatch.setenv("COLUMNS", "400")
    run, nodes = _sweep_run_dir(tmp_path)
    (traces,) = [key for key, node in nodes.items() if node.command == "generate"]
    terminal, err = pty.openpty()
    out = os.dup(err)  # as a sweep's descriptors 2 and 1 are, both the terminal
    os.set_blocking(terminal, False)
    shown = b""
    with live(run.uri, (err, out)):
        os.write(out, b"a line Ray forwarded\n")  # both are a pipe now
        run.mark_done(traces, Lineage(nodes[traces].config).traces.fingerprint, wall_seconds=6.0)
        time.sleep(0.2)
        os.write(err, b"2026-12-06 INFO w2sr.sweep.runner: finished\n")
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(terminal, 65536):
            shown += chunk
    for fd in (terminal, err, out):
        os.close(fd)
    written = shown.decode()
    assert written.count("STAGE") >= 3  # drawn, drawn again below each line, and at the end
    assert screen(written) == [
        "a line Ray forwarded",
        "2026-12-06 INFO w2sr.sweep.runner: finished",
        *table(status(run.uri)).splitlines(),  # the final table, once: traces done
    ]
    assert f"{traces}" in written and "1 of" in screen(written)[-2]


def test_a_table_too_long_for_the_terminal_leaves_finished_stages_out_first(tmp_path):
    run, nodes = _sweep_run_dir(tmp_path)
    (traces,) = [key for key, node in nodes.items() if node.command == "generate"]
    run.mark_done(traces, Lineage(nodes[traces].config).traces.fingerprint, wall_seconds=1.0)
    lines = table(status(run.uri), room=8).splitlines()
    assert len(lines) == 8 and traces not in "\n".join(lines)
    assert lines[-3] == f"... and {len(nodes) - 4} more stages (`w2sr status` lists them all)"


def test_live_on_anything_but_a_terminal_changes_nothing(tmp_path):
    run, _ = _sweep_run_dir(tmp_path)
    read_end, write_end = os.pipe()
    with live(run.uri, (write_end,)):
        os.write(write_end, b"a log line\n")
    os.close(write_end)
    assert os.read(read_end, 1000) == b"a log line\n"
