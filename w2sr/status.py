"""`w2sr status RUN_DIR`: every stage of a run or a sweep, and where it stands.

Read from the run dir alone (done records, leases, metrics, sealed shards and results, the
sweep's stage logs), so it answers while the work goes on and after it ended, from any machine
that can read the run dir, and starts nothing. A sweep's run dir is known by its `sweep.yaml`;
any other by the `config.yaml` its latest command wrote, planned as `w2sr run` would run it (its
three training sets, GRPO when the config asks for it, every model's evaluation).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

import yaml

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig, validate
from w2sr.evaluation.results import plan_tasks
from w2sr.recipe import COMPLETE, DONE, FAILED, SKIPPED
from w2sr.reporting.tables import columns
from w2sr.rundir import DONE as DONE_RECORD
from w2sr.rundir import METRICS, RUN, RunDir
from w2sr.sweep.config import StudentAxis, SweepConfig, TeacherAxis
from w2sr.sweep.plan import Cell, Node, graph, plan, readiness
from w2sr.sweep.runner import failure, start_order, stop_tree

RUNNING, READY, WAITING = "running", "ready", "waiting"
STATES = (DONE, RUNNING, FAILED, READY, WAITING, SKIPPED)


@dataclass
class StageState:
    """One stage of the run and what it is doing."""

    stage: str  # its folder, or for an evaluation `eval/<label>/<hash>`
    command: str
    state: str  # done, running, failed, ready (its needs are done), waiting, skipped
    detail: str  # time and cost; owner, progress and since when; the error; what it waits on
    worker_seconds: float = 0.0  # spent so far, killed attempts included (stages, not evals)


def status(uri: str) -> list[StageState]:
    """Every stage of the run dir's run or sweep, in the order a sweep would start them."""
    run = RunDir(uri, create=False)
    nodes = _nodes(run, uri)
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
    return list(states.values())


def table(states: list[StageState]) -> str:
    """`status` for people: a line per stage, then the study's progress."""
    rows = [("STAGE", "COMMAND", "STATE", "DETAIL")]
    rows += [(s.stage, s.command, s.state, s.detail) for s in states]
    return "\n".join([*columns(rows), progress(states)])


def progress(states: list[StageState]) -> str:
    """How many stages are in each state, and the worker-hours spent so far."""
    counts = dict.fromkeys(STATES, 0)
    for s in states:
        counts[s.state] += 1
    spent = sum(s.worker_seconds for s in states) / 3600
    parts = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    finished = counts[DONE] + counts[SKIPPED]
    return f"{finished} of {len(states)} stages finished ({parts}); {spent:.3f} worker-hours spent"


def as_json(states: list[StageState]) -> str:
    return json.dumps([vars(s) for s in states], indent=2)


def _nodes(run: RunDir, uri: str) -> dict[str, Node]:
    if run.exists(*layout.SWEEP_CONFIG):
        data = yaml.safe_load(run.read_text(*layout.SWEEP_CONFIG))
        return plan(SweepConfig.model_validate({**data, "run_dir": uri}))[1]
    if not run.exists(layout.CONFIG):
        raise ConfigError(
            f"{uri}: no {layout.CONFIG} or {'/'.join(layout.SWEEP_CONFIG)}; not a run directory "
            "a w2sr command has written to"
        )
    cfg = validate({**yaml.safe_load(run.read_text(layout.CONFIG)), "run_dir": uri})
    return graph(_run_cells(cfg))


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
    if node.command == "eval":
        return StageState(node.key, node.command, DONE, f"{node.label}: every result written")
    record = run.read_json(node.key, DONE_RECORD)
    wall, spent = record.get("wall_seconds"), record.get("worker_seconds", 0.0)
    took = f"{_duration(wall)}, " if wall is not None else ""
    return StageState(node.key, node.command, DONE, f"{took}{spent / 3600:.3f} worker-hours", spent)


def _pending(
    run: RunDir, node: Node, nodes: dict[str, Node], ready: dict[str, tuple[str, str | None]]
) -> StageState:
    spent = 0.0
    if node.command != "eval" and run.exists(node.key, RUN):
        spent = run.read_json(node.key, RUN).get("worker_seconds", 0.0)
    lease = run.lease(_lease_folder(node))
    if lease is not None:
        since = time.time() - lease.get("since", lease["heartbeat"])
        detail = f"{_progress(run, node)}for {_duration(since)}, by {lease['owner']}"
        return StageState(node.key, node.command, RUNNING, detail, spent)
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


def _progress(run: RunDir, node: Node) -> str:
    """How far a running stage is, from what it has written: ""  when that says nothing."""
    cfg = node.config
    if node.command in ("train", "grpo") and run.exists(node.key, METRICS):
        lines = run.read_text(node.key, METRICS).splitlines()
        step = json.loads(lines[-1])["step"] if lines else 0
        total = cfg.grpo.steps if node.command == "grpo" and cfg.grpo else cfg.train.max_steps
        return f"step {step}{f' of {total}' if total else ''}, "
    if node.command == "generate":
        return f"{len(run.list(node.key, suffix='.parquet'))} shards sealed, "
    if node.command == "eval" and node.label:
        tasks, _ = plan_tasks(cfg, labels=(node.label,))
        written = sum(run.exists(*task.file) for task in tasks)
        return f"{written} of {len(tasks)} results, "
    return ""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def stop(uri: str, stage: str) -> str:
    """Stop the process holding `stage`'s lease, when it runs on this machine; what it wrote
    stays for the next run to resume."""
    run = RunDir(uri, create=False)
    nodes = _nodes(run, uri)
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
