"""`w2sr status RUN_DIR`: every stage of a run or a sweep, and where it stands.

Read from the run dir alone (done records, leases, metrics, sealed shards and results, the
sweep's stage logs), so it answers while the work goes on and after it ended, from any machine
that can read the run dir, and starts nothing. A sweep's run dir is known by its `sweep.yaml`;
any other by the `config.yaml` its latest command wrote, planned as `w2sr run` would run it (its
three training sets, GRPO when the config asks for it, every model's evaluation).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import pyarrow.compute as pc
import yaml

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig, validate
from w2sr.console import flush_streams
from w2sr.evaluation.results import plan_tasks
from w2sr.lineage import Lineage
from w2sr.recipe import COMPLETE, DONE, FAILED, SKIPPED
from w2sr.reporting.tables import columns
from w2sr.rundir import DONE as DONE_RECORD
from w2sr.rundir import RUN, RunDir, last_record
from w2sr.sweep.config import StudentAxis, SweepConfig, TeacherAxis
from w2sr.sweep.plan import Cell, Node, graph, plan, readiness
from w2sr.sweep.runner import failure, start_order, stop_tree

RUNNING, READY, WAITING = "running", "ready", "waiting"
STATES = (DONE, RUNNING, FAILED, READY, WAITING, SKIPPED)
REDRAW_S = 2.0  # at least; five times what reading the run dir took, when that is longer


@dataclass
class StageState:
    """One stage of the run and what it is doing."""

    stage: str  # its folder, or for an evaluation `eval/<label>/<hash>`
    command: str
    state: str  # done, running, failed, ready (its needs are done), waiting, skipped
    detail: str  # time and cost; owner, progress and since when; the error; what it waits on
    worker_seconds: float = 0.0  # spent so far, killed attempts included (stages, not evals)
    seconds: float | None = None  # done: how long it took; running: about how long it has left


@dataclass
class Study:
    """A run dir's stages, and how many of them a sweep runs at once (a run: one)."""

    stages: list[StageState]
    at_once: int


def status(uri: str) -> Study:
    """Every stage of the run dir's run or sweep, in the order a sweep would start them."""
    run = RunDir(uri, create=False)
    nodes, at_once = _nodes(run, uri)
    ready = readiness(nodes, run)
    states: dict[str, StageState] = {}
    for key in start_order(nodes):
        node, (state, reason) = nodes[key], ready[key]
        if state == COMPLETE:
            states[key] = _done(run, node)
        elif state == SKIPPED:
            states[key] = StageState(key, node.command, SKIPPED, reason or "")
        else:
            states[key] = _pending(run, node, nodes, ready)
    return Study(list(states.values()), at_once)


def table(study: Study, room: int | None = None) -> str:
    """`status` for people: a line per stage, then the study's progress and time left. In `room`
    lines: finished stages are left out first, then waiting ones, and counted."""
    shown = study.stages
    if room is not None and len(shown) + 3 > room:
        unfinished = [s for s in shown if s.state not in (DONE, SKIPPED)]
        unfinished.sort(key=lambda s: STATES.index(s.state))  # running and failed first
        shown = unfinished[: max(1, room - 4)]
    rows = [("STAGE", "COMMAND", "STATE", "DETAIL")]
    rows += [(s.stage, s.command, s.state, s.detail) for s in shown]
    hidden = len(study.stages) - len(shown)
    note = [f"... and {hidden} more stages (`w2sr status` lists them all)"] if hidden else []
    return "\n".join([*columns(rows), *note, progress(study), time_left(study)])


def progress(study: Study) -> str:
    """How many stages are in each state, and the worker-hours spent so far."""
    states = study.stages
    counts = dict.fromkeys(STATES, 0)
    for s in states:
        counts[s.state] += 1
    spent = sum(s.worker_seconds for s in states) / 3600
    parts = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    finished = counts[DONE] + counts[SKIPPED]
    return f"{finished} of {len(states)} stages finished ({parts}); {spent:.3f} worker-hours spent"


def time_left(study: Study) -> str:
    """About how long the unfinished stages take: a running stage's own estimate, any other the
    median time of the finished stages of its command in this run dir, spread over the stages
    that run at once. Unknown while a command has no finished stage to go by."""
    took: dict[str, list[float]] = {}
    for s in study.stages:
        if s.state == DONE and s.seconds is not None:
            took.setdefault(s.command, []).append(s.seconds)
    left, unknown = 0.0, set()
    for s in study.stages:
        if s.state in (DONE, SKIPPED):
            continue
        guess = s.seconds if s.state == RUNNING else None
        if guess is None and s.command in took:
            guess = statistics.median(took[s.command])
        if guess is None:
            unknown.add(s.command)
        else:
            left += guess
    if unknown:
        names = sorted(unknown)
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        return f"time left: unknown: no {listed} stage has finished yet"
    if not left:
        return "time left: none"
    return f"time left: about {_duration(left / study.at_once)} ({study.at_once} at once)"


def as_json(study: Study) -> str:
    return json.dumps([vars(s) for s in study.stages], indent=2)


@contextlib.contextmanager
def live(uri: str, fds: tuple[int, ...] = (2, 1)) -> Iterator[None]:
    """The status table of `uri`, redrawn in place on the terminal at `fds[0]` while the block
    runs (a sweep). Everything else written meanwhile to those of `fds` that are that terminal
    (the log, Ray's forwarded lines, the libraries') passes through a pipe and is printed above
    the table, so that nothing breaks it. On anything but a terminal, nothing: the log says how
    the study goes."""
    if not os.isatty(fds[0]):
        yield
        return
    view = _Live(uri, os.fdopen(os.dup(fds[0]), "w", buffering=1, errors="replace"))
    captured = [fd for fd in fds if os.isatty(fd)]
    saved = {fd: os.dup(fd) for fd in captured}
    read_end, write_end = os.pipe()
    flush_streams()
    for fd in captured:
        os.dup2(write_end, fd)
    os.close(write_end)
    ended = threading.Event()

    def follow() -> None:
        with os.fdopen(read_end, errors="replace") as written:
            for line in written:
                view.above(line.rstrip("\n"))

    def redraw() -> None:
        last = took
        while not ended.wait(max(REDRAW_S, 5 * last)):
            last = view.draw()

    took = view.draw()
    threads = [threading.Thread(target=t, name=f"w2sr-{t.__name__}", daemon=True)
               for t in (follow, redraw)]  # fmt: skip
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        ended.set()
        flush_streams()
        for fd, terminal in saved.items():  # the pipe's last writers: the follower reads its end
            os.dup2(terminal, fd)
            os.close(terminal)
        for thread in threads:
            thread.join(timeout=5.0)
        view.draw()
        view.close()


class _Live:
    """The table on the terminal, and the lines that go above it."""

    def __init__(self, uri: str, terminal: IO[str]):
        self.uri, self.terminal = uri, terminal
        self.text, self.shown = "", 0  # what is drawn, and its lines
        self.drawing = threading.Lock()

    def draw(self) -> float:
        """Read the run dir and draw its table; returns the seconds that took."""
        start = time.time()
        try:
            study = status(self.uri)
        except ConfigError:  # no sweep.yaml yet
            return time.time() - start
        width, height = shutil.get_terminal_size()
        lines = table(study, room=height - 2).splitlines()
        with self.drawing:
            if not self.terminal.closed:
                self.text = "\n".join(line[: width - 1] for line in lines) + "\n"  # no wraps
                self._erase()
                self._show()
        return time.time() - start

    def above(self, line: str) -> None:
        with self.drawing:
            if not self.terminal.closed:
                self._erase()
                self.terminal.write(line + "\n")
                self._show()

    def close(self) -> None:
        with self.drawing:
            self.terminal.close()

    def _erase(self) -> None:
        if self.shown:  # to the first line of the table, and everything below it cleared
            self.terminal.write(f"\x1b[{self.shown}F\x1b[J")
        self.shown = 0

    def _show(self) -> None:
        self.terminal.write(self.text)
        self.terminal.flush()
        self.shown = self.text.count("\n")


def _nodes(run: RunDir, uri: str) -> tuple[dict[str, Node], int]:
    """The run dir's stages, and how many of them run at once."""
    if run.exists(*layout.SWEEP_CONFIG):
        data = yaml.safe_load(run.read_text(*layout.SWEEP_CONFIG))
        sweep = SweepConfig.model_validate({**data, "run_dir": uri})
        return plan(sweep)[1], sweep.max_concurrent_stages
    if not run.exists(layout.CONFIG):
        raise ConfigError(
            f"{uri}: no {layout.CONFIG} or {'/'.join(layout.SWEEP_CONFIG)}; not a run directory "
            "a w2sr command has written to"
        )
    cfg = validate({**yaml.safe_load(run.read_text(layout.CONFIG)), "run_dir": uri})
    return graph(_run_cells(cfg)), 1


def _run_cells(cfg: ExperimentConfig) -> list[Cell]:
    """A run's recipe as cells: one per training set, as `w2sr run` trains each."""
    teacher = TeacherAxis(label="teacher", model=cfg.teacher)
    student = StudentAxis(label="student", model=cfg.student or "none")  # a label only
    return [
        Cell(
            teacher,
            student,
            variant.name,
            cfg.train.seed,
            cfg.select.match,
            cfg.model_copy(
                update={"train": cfg.train.model_copy(update={"variant": variant.name})}
            ),
        )
        for variant in layout.VARIANTS
    ]


def _done(run: RunDir, node: Node) -> StageState:
    if node.command == "eval":  # how long it took, when a sweep ran it: its console's last line
        ended = re.findall(r": done in (\d+) s$", _sweep_log(run, node), re.M)
        seconds = float(ended[-1]) if ended else None
        detail = f"{_duration(seconds)}, " if seconds is not None else ""
        detail += f"{node.label}: every result written"
        return StageState(node.key, node.command, DONE, detail, seconds=seconds)
    record = run.read_json(node.key, DONE_RECORD)
    wall, spent = record.get("wall_seconds"), record.get("worker_seconds", 0.0)
    took = f"{_duration(wall)}, " if wall is not None else ""
    detail = f"{took}{spent / 3600:.3f} worker-hours"
    return StageState(node.key, node.command, DONE, detail, spent, wall)


def _sweep_log(run: RunDir, node: Node) -> str:
    parts = layout.sweep_log(node.key)
    return run.read_text(*parts) if run.exists(*parts) else ""


def _pending(
    run: RunDir, node: Node, nodes: dict[str, Node], ready: dict[str, tuple[str, str | None]]
) -> StageState:
    spent = 0.0
    if node.command != "eval" and run.exists(node.key, RUN):
        spent = run.read_json(node.key, RUN).get("worker_seconds", 0.0)
    lease = run.lease(_lease_folder(node))
    if lease is not None:
        since = time.time() - lease.get("since", lease["heartbeat"])
        done, total, what = _progress(run, node)
        left = since * (total - done) / done if done and total else None
        shown = f"{done} of {total} {what}, " if total else ""
        shown += f"about {_duration(left)} left, " if left is not None else ""
        detail = f"{shown}for {_duration(since)}, by {lease['owner']}"
        return StageState(node.key, node.command, RUNNING, detail, spent, left)
    if run.exists(*layout.sweep_log(node.key)):  # a sweep ran it, and it did not finish
        log_path = run.path(*layout.sweep_log(node.key))
        error = failure(run.read_text(*layout.sweep_log(node.key))).splitlines()
        last = error[-1] if error else "no output"
        return StageState(node.key, node.command, FAILED, f"{last} (log: {log_path})", spent)
    open_needs = [n for n in node.needs if ready[n][0] != COMPLETE]
    if open_needs:
        on = ", ".join(f"{nodes[n].command} {n}" for n in open_needs)
        return StageState(node.key, node.command, WAITING, f"on {on}", spent)
    return StageState(node.key, node.command, READY, "what it needs is done", spent)


def _lease_folder(node: Node) -> str:
    """Where the stage's lease is: its folder, or for an evaluation its model's."""
    return layout.eval_folder(node.label) if node.label else node.key


def _progress(run: RunDir, node: Node) -> tuple[int, int, str]:
    """How far a running stage is, from what it has written: (done, out of, what); out of 0
    when what it wrote says nothing yet."""
    cfg = node.config
    if node.command in ("train", "grpo"):
        record = last_record(run, node.key)
        return record.get("step", 0), record.get("total_steps", 0), "steps"
    if node.command == "generate":
        prompts = Lineage(cfg).prompts.folder
        if not run.exists(prompts, layout.PROMPT_SET):
            return 0, 0, "shards"
        shards = run.read_parquet(prompts, layout.PROMPT_SET, columns=["shard"])
        total = pc.count_distinct(shards["shard"]).as_py()
        return len(run.list(node.key, suffix=".parquet")), total, "shards"
    if node.command == "eval" and node.label:
        tasks, _ = plan_tasks(cfg, labels=(node.label,))
        return sum(run.exists(*task.file) for task in tasks), len(tasks), "results"
    return 0, 0, ""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def stop(uri: str, stage: str) -> str:
    """Stop the process holding `stage`'s lease, when it runs on this machine; what it wrote
    stays for the next run to resume."""
    run = RunDir(uri, create=False)
    nodes, _ = _nodes(run, uri)
    if stage not in nodes:
        raise ConfigError(f"{stage}: not a stage of {uri} (`w2sr status {uri}` lists them)")
    lease = run.lease(_lease_folder(nodes[stage]))
    if lease is None:
        raise ConfigError(f"{stage} is not running: nothing holds a live lease on it")
    host, pid, _ = lease["owner"].rsplit(":", 2)
    if host != socket.gethostname():
        raise ConfigError(
            f"{stage} runs on {host} (process {pid}): run `w2sr stop` there, or stop its Ray job "
            "with `ray job stop`"
        )
    stop_tree(int(pid))
    return f"stopped {stage} (process {pid}); its next run resumes it"
