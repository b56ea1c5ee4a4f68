"""Running a sweep's graph: each stage a `w2sr` command of its own on one Ray cluster, as many at
once as the cap and the cluster allow.

A stage runs in its own process so that a crash fails that stage alone: the cells that need it
are reported blocked, every other cell finishes. Each command joins the same cluster (the one
`ray job submit` runs in, `ray.address`, or a local one this process starts) and asks it for its
own engines and workers, so an autoscaling cluster grows to the queued work. On a local session,
whose size is fixed, a stage starts only when the CPUs it asks for are free. A rerun of a killed
sweep skips every complete stage.

Every wait is bounded. A stage that runs past the sweep's `stage_timeout_s` is stopped with every
process it started and counted failed; what it wrote stays for a rerun. A stage whose lease
another submission holds (exit status 3) is retried for `LEASE_WAIT_S`, long enough for the lease
of a killed holder to lapse; a holder still renewing by then is at work, and the stage is
reported blocked with the holder's message instead of waiting for as long as that work takes.

Starting a stage is a `Launcher`'s (`Subprocesses` here); the scheduling above is `run_graph`'s,
the same whatever starts the stages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
import yaml

from w2sr import layout
from w2sr.recipe import (
    BLOCKED,
    COMPLETE,
    DONE,
    EXIT_LEASE_HELD,
    EXIT_OK,
    FAILED,
    SKIPPED,
    TO_RUN,
    sections,
)
from w2sr.rundir import LEASE_TTL_S, RunDir
from w2sr.session import check_reachable, resource_request, start_local
from w2sr.sweep.plan import Node, readiness, skip_reason

log = logging.getLogger(__name__)

LEASE_RETRY_S = 10.0
LEASE_WAIT_S = 5 * LEASE_TTL_S  # a killed holder's lease lapses one TTL after its last renewal
STOP_GRACE_S = 10.0  # between SIGTERM and SIGKILL when a stage is stopped
POLL_S = 0.5
# A stage's weight in a chain of stages: GRPO (rollouts and updates for every step) outlasts any
# other stage several times over at the paper's scale; the others count one each.
CHAIN_WEIGHT = {"grpo": 4.0}


@dataclass
class Outcome:
    """What became of one node."""

    state: str  # COMPLETE (before this sweep), DONE, FAILED, BLOCKED (a need failed), SKIPPED
    seconds: float = 0.0
    started: float | None = None
    ended: float | None = None
    error: str | None = None


class Launched(Protocol):
    """A stage a `Launcher` started."""

    def poll(self) -> int | None:
        """Its exit status once it has ended, else None."""
        ...

    def stop(self) -> None:
        """End it and everything it started."""
        ...

    def output(self) -> str:
        """What it printed."""
        ...


class Launcher(Protocol):
    """How the sweep starts its stages: `Subprocesses` in production. The scheduling (order,
    caps, failures, leases, timeouts, resume) is `run_graph`'s and the same for any launcher."""

    def capacity(self, nodes: dict[str, Node]) -> float | None:
        """The CPUs the stages share on a session of fixed size, or None on a cluster whose
        autoscaler decides; asked once, before the first stage starts."""
        ...

    def launch(self, node: Node) -> Launched:
        """Start `w2sr COMMAND` for the node's config (and its `label`'s model, for an eval)."""
        ...


def run_graph(
    nodes: dict[str, Node],
    run: RunDir,
    max_concurrent: int,
    stage_timeout_s: float | None = None,
    launcher: Launcher | None = None,
) -> dict[str, Outcome]:
    """Run every incomplete node once its needs are done; returns each node's outcome. A stage
    still running `stage_timeout_s` after it started is stopped and counted failed. Stages are
    `w2sr` processes (`Subprocesses`) unless `launcher` says otherwise."""
    outcomes = {
        key: Outcome(state, error=reason)
        for key, (state, reason) in readiness(nodes, run).items()
        if state != TO_RUN
    }
    pending = [key for key in start_order(nodes) if key not in outcomes]
    log.info("%d of %d stages to run", len(pending), len(nodes))
    if not pending:
        return outcomes
    running: dict[str, tuple[Launched, float]] = {}
    retry_at: dict[str, float] = {}
    held_since: dict[str, float] = {}  # when a stage was first found held by another submission
    unskipped: set[str] = set()  # ready stages found to have work: no file is read for them again
    with tempfile.TemporaryDirectory(prefix="w2sr-sweep-") as scratch:
        launcher = launcher or Subprocesses(Path(scratch))
        capacity = launcher.capacity(nodes)
        while pending or running:
            for key in list(pending):
                node = nodes[key]
                states = [outcomes.get(n) for n in node.needs]
                if any(o and o.state in (FAILED, BLOCKED) for o in states):
                    failed = [
                        n
                        for n, o in zip(node.needs, states, strict=True)
                        if o and o.state in (FAILED, BLOCKED)
                    ]
                    outcomes[key] = Outcome(BLOCKED, error=f"needs {', '.join(failed)}")
                    pending.remove(key)
                    continue
                if any(o and o.state == SKIPPED for o in states):
                    outcomes[key] = Outcome(SKIPPED, error="what it needs was skipped")
                    pending.remove(key)
                    continue
                ready = all(o and o.state in (COMPLETE, DONE) for o in states)
                if not ready or retry_at.get(key, 0) > time.time():
                    continue
                if key not in unskipped:  # read once: what it needs is done and stays so
                    reason = skip_reason(node, run)
                    if reason:
                        outcomes[key] = Outcome(SKIPPED, error=reason)
                        pending.remove(key)
                        continue
                    unskipped.add(key)
                if len(running) >= max_concurrent or not _fits(node, running, nodes, capacity):
                    continue
                running[key] = (launcher.launch(node), time.time())
                pending.remove(key)
                log.info("started %s %s; %s", node.command, key, _tally(outcomes, running, nodes))
            for key, (stage, started) in list(running.items()):
                overdue = None
                status = stage.poll()
                if status is None:
                    if stage_timeout_s is None or time.time() - started <= stage_timeout_s:
                        continue
                    stage.stop()
                    overdue = (
                        f"{key} ran past the sweep's stage_timeout_s of {stage_timeout_s:g}s and "
                        "was stopped; what it wrote is kept, and a rerun resumes it"
                    )
                del running[key]
                ended = time.time()
                text = stage.output()
                if overdue:
                    text += f"\nw2sr sweep: {overdue}\n"
                run.write_text(text, *layout.sweep_log(key))
                if overdue:
                    outcomes[key] = Outcome(FAILED, ended - started, started, ended, overdue)
                    log.error("%s", overdue)
                elif status == EXIT_OK:
                    outcomes[key] = Outcome(DONE, ended - started, started, ended)
                    tally = _tally(outcomes, running, nodes)
                    log.info("finished %s in %.0fs; %s", key, ended - started, tally)
                elif status == EXIT_LEASE_HELD:
                    first = held_since.setdefault(key, ended)
                    if ended - first < LEASE_WAIT_S:
                        retry_at[key] = ended + LEASE_RETRY_S
                        pending.append(key)
                        log.info("%s is held by another submission; retrying", key)
                        continue
                    error = (
                        f"{key} is still held by another submission after {ended - first:.0f}s "
                        f"of retries (LEASE_WAIT_S {LEASE_WAIT_S:g}s): {_held_by(text)}"
                    )
                    outcomes[key] = Outcome(BLOCKED, ended - started, started, ended, error)
                    log.error("%s", error)
                else:
                    error = failure(text)
                    outcomes[key] = Outcome(FAILED, ended - started, started, ended, error)
                    log.error("%s failed (exit %d):\n%s", key, status, error)
            time.sleep(POLL_S)
    return outcomes


def _tally(outcomes: dict[str, Outcome], running: Collection[str], nodes: dict[str, Node]) -> str:
    """The sweep's progress so far, from what this process knows (no file is read)."""
    states = [o.state for o in outcomes.values()]
    finished = sum(state in (COMPLETE, DONE, SKIPPED) for state in states)
    failed = sum(state in (FAILED, BLOCKED) for state in states)
    waiting = len(nodes) - len(outcomes) - len(running)
    return (
        f"{finished} of {len(nodes)} stages finished, {len(running)} running, {waiting} "
        f"waiting, {failed} failed or blocked"
    )


def start_order(nodes: dict[str, Node]) -> list[str]:
    """The nodes longest remaining chain first: by the weight of the longest chain of stages
    that starts at each (itself and what waits on it, `CHAIN_WEIGHT`), ties in plan order.

    So a stage at the head of a long chain (every generation, GRPO) takes a free slot before the
    evaluations of teachers and bases, which end chains. A stage's chain outweighs those of what
    needs it, so the order still respects `needs`.
    """
    waiting: dict[str, list[str]] = {key: [] for key in nodes}
    for key, node in nodes.items():
        for need in node.needs:
            waiting[need].append(key)
    chain: dict[str, float] = {}
    for key in reversed(list(nodes)):  # plan order has a node's needs before it
        after = max((chain[k] for k in waiting[key]), default=0.0)
        chain[key] = CHAIN_WEIGHT.get(nodes[key].command, 1.0) + after
    return sorted(nodes, key=lambda key: -chain[key])


class Subprocesses:
    """Each stage a `python -m w2sr.cli COMMAND CONFIG` process of its own, so that a crash fails
    that stage alone, joined to the sweep's cluster; its config and its log in `scratch`."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.address: str | None = None

    def capacity(self, nodes: dict[str, Node]) -> float | None:
        self.address, capacity = _cluster(nodes)
        return capacity

    def launch(self, node: Node) -> Process:
        slug = _slug(node.key)
        config = self.scratch / f"{slug}.yaml"
        config.write_text(yaml.safe_dump(node.config.model_dump(mode="json"), sort_keys=False))
        log_path = self.scratch / f"{slug}.log"
        cmd = [sys.executable, "-m", "w2sr.cli", node.command, str(config)]
        if node.label:
            cmd += ["--models", node.label]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.address:
            env["RAY_ADDRESS"] = self.address
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        return Process(proc, log_path)


@dataclass
class Process:
    """A stage's process and the file its output goes to."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        stop(self.proc)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """End a stage and every process it started (`stop_tree`). The stage shares the sweep's
    process group, so that a sweep killed with its group takes its stages along."""
    stop_tree(proc.pid, grace_s)
    proc.wait()


def stop_tree(pid: int, grace_s: float = STOP_GRACE_S) -> None:
    """End a process and its descendants: SIGTERM first (a Ray driver then disconnects, and Ray
    ends the workers and actors it owns), SIGKILL for what is left after `grace_s`."""
    try:
        parent = psutil.Process(pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:  # it ended on its own just now
        return
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    deadline = time.time() + grace_s
    _, alive = psutil.wait_procs(tree[1:], timeout=grace_s)
    # Not waited for through psutil, which would reap a child of ours before its Popen could.
    while _alive(parent) and time.time() < deadline:
        time.sleep(0.1)
    for process in [parent, *alive] if _alive(parent) else alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _held_by(log_text: str) -> str:
    """The holder's message a stage printed when it found its lease taken."""
    lines = [line for line in log_text.splitlines() if line.startswith("w2sr: ")]
    return lines[-1].removeprefix("w2sr: ") if lines else failure(log_text)


def failure(log_text: str) -> str:
    """What a failed stage's log says of its failure: its last traceback, else its last lines."""
    lines = log_text.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    return "\n".join(lines[starts[-1] :][-30:] if starts else lines[-15:])


def _cluster(nodes: dict[str, Node]) -> tuple[str | None, float | None]:
    """The address the stages join, and the CPUs of a session of fixed size (None: a cluster,
    whose autoscaler decides). Without a configured cluster, a local one is started here."""
    cfg = next(iter(nodes.values())).config
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
        return address, None
    import ray

    # vLLM's CPU thread binding pins every engine of a machine to the same cores: engines of
    # stages side by side would share one. Here the OS places them (the session inherits this).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    start_local(cfg.ray.num_cpus)
    address = ray.get_runtime_context().gcs_address
    return address, float(ray.cluster_resources().get("CPU", 0))


def _fits(
    node: Node, running: Collection[str], nodes: dict[str, Node], capacity: float | None
) -> bool:
    if capacity is None:
        return True
    busy = sum(_cpus(nodes[key]) for key in running)
    return busy + _cpus(node) <= capacity or not running  # alone, it was checked to fit


def _cpus(node: Node) -> float:
    return resource_request(node.config, sections(node.command)).get("CPU", 0.0)


def _slug(key: str) -> str:
    return key.replace("/", "_")
