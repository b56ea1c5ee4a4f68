"""The console's progress bars: redrawn in place on a terminal, one line in a file, none when a
stage runs outside a quiet command."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from w2sr.console import Console, StageFailed, progress
from w2sr.rundir import RunDir


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_stage(run_dir, err: io.StringIO, failing: bool = False) -> None:
    console = Console(verbose=False)
    console.open()
    console.err = err
    try:
        stage = console.stage(RunDir(str(run_dir)), "generate", "traces")
        with stage, progress(40, "requests", "teacher") as bar:
            for _ in range(40):
                bar.update(1)
                if failing and bar.n == 10:
                    raise ValueError("the engine died")
    finally:
        console.close()


def test_a_terminal_sees_the_bar_redrawn_with_its_rate_and_time_left(tmp_path):
    err = Terminal()
    run_stage(tmp_path, err)
    shown = err.getvalue()
    assert shown.count("\r") >= 2  # drawn, then redrawn in place
    last = shown.split("\r")[-1].splitlines()[0]
    assert re.fullmatch(r"generate: teacher: 100%\|.+\| 40/40 \[00:00<00:00, .+requests/s\]", last)


def test_a_file_gets_the_bar_as_one_line_when_the_work_is_done(tmp_path):
    err = io.StringIO()
    run_stage(tmp_path, err)
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert lines[0].startswith("generate: started")
    assert re.fullmatch(r"generate: teacher: 100%\|.+\| 40/40 \[.+requests/s\]", lines[1])
    assert re.fullmatch(r"generate: done in \d+ s", lines[2])


def test_a_failure_shows_its_error_not_where_the_bar_stopped(tmp_path):
    err = io.StringIO()
    with pytest.raises(StageFailed):
        run_stage(tmp_path, err, failing=True)
    text = err.getvalue()
    assert "10/40" not in text and "generate: failed after" in text and "the engine died" in text


def test_outside_a_quiet_command_there_is_no_bar(capsys):
    with progress(5, "steps") as bar:
        bar.update(5)
    assert bar.disable
    assert capsys.readouterr() == ("", "")


def test_a_command_called_in_process_closes_the_streams_it_opened(tmp_path):
    """As a notebook or a test calls `main`: the console's copies of the terminal are closed
    by the console, not left to the garbage collector (which warns of each in development mode)."""
    (tmp_path / "file").write_text("in the way")
    demo = Path(__file__).parents[1] / "jobs" / "demo.yaml"
    code = (
        "import gc; from w2sr.cli import main; "
        f"[main(['select', {str(demo)!r}, 'run_dir={tmp_path}/file/run']) for _ in range(3)]; "
        "gc.collect()"
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.stderr.count("w2sr: run_dir:") == 3
    assert "ResourceWarning" not in done.stderr, done.stderr


def test_an_engine_dying_because_it_is_shut_down_logs_no_error():
    """vLLM's record of its output task failing with `EngineDeadError` is dropped once its client
    has said it shuts down, and kept otherwise: an engine that dies at work still says so."""
    from vllm.v1.engine.exceptions import EngineDeadError

    from w2sr.engines.logs import CLIENT, ENGINE, ShutDownOnPurpose

    def record(name: str, message: str, error: BaseException | None = None) -> logging.LogRecord:
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord(name, logging.ERROR, __file__, 1, message, (), exc_info)

    quiet = ShutDownOnPurpose()
    failed = record(ENGINE, "AsyncLLM output_handler failed.", EngineDeadError())
    assert quiet.filter(failed)  # at work: kept
    assert quiet.filter(record(CLIENT, "[shutdown] MPClient: cleaning up background resources"))
    assert not quiet.filter(failed)  # shutting down: dropped
    assert quiet.filter(record(ENGINE, "AsyncLLM output_handler failed.", ValueError("bad")))


def test_every_worker_of_a_commands_session_has_the_engines_log_filter(ray_session):
    @ray_session.remote
    def filters() -> list[str]:
        from w2sr.engines.logs import ENGINE

        return [type(f).__name__ for f in logging.getLogger(ENGINE).filters]

    assert ray_session.get(filters.remote()) == ["ShutDownOnPurpose"]
