"""`w2sr sweep CONFIG`: the study as one job.

    w2sr sweep jobs/demo-sweep.yaml --plan     # the stage graph and what is complete; no Ray
    w2sr sweep jobs/demo-sweep.yaml            # run what is missing, then the sweep report

Artifacts (in the sweep's run dir, beside the stages' own):

    sweep/sweep.yaml                    the sweep config, as run
    sweep/lineage.json                  what its cells refer to, as computed when it started:
                                        what `w2sr gc` keeps for them
    sweep/logs/<stage>.log              each stage's output
    sweep/groups/<teacher>.<student>[.<match>-matched].s<seed>/summary.json
                                        the evaluation summary of one (teacher, student, seed)
    sweep/summary.json                  every stage's and cell's state, failures with their error
    report/report.md, report/*.png      the sweep report (`w2sr.sweep.report`)
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import time
from typing import Any

import yaml

from w2sr import layout
from w2sr.evaluation.results import plan_tasks, summary
from w2sr.gc import record
from w2sr.recipe import COMPLETE, SKIPPED, TO_RUN, sections
from w2sr.reporting.results import load_results
from w2sr.reporting.tables import columns
from w2sr.rundir import RunDir, first_writes
from w2sr.session import check_local_resources
from w2sr.sweep.config import SweepConfig
from w2sr.sweep.plan import Cell, Node, plan, readiness
from w2sr.sweep.report import cell_rows, group_name, tracked, write_report
from w2sr.sweep.runner import Outcome, run_graph, start_order
from w2sr.tracking import log_sweep, results_uri

log = logging.getLogger(__name__)


def describe_plan(sweep: SweepConfig) -> dict[str, Any]:
    """The stage graph, in the order its stages would start (`runner.start_order`): each stage,
    the cells that share it and its state (`plan.readiness`)."""
    cells, nodes = plan(sweep)
    states = readiness(nodes, RunDir(sweep.run_dir, create=False))
    stages = []
    for key in start_order(nodes):
        node, (state, reason) = nodes[key], states[key]
        stages.append({"stage": key, "command": node.command,
                       "state": f"{state}: {reason}" if reason else state,
                       "needs": list(node.needs), "cells": node.cells})  # fmt: skip
    counts = [state for state, _ in states.values()]
    return {
        "cells": [cell.name for cell in cells],
        "stages": stages,
        "complete": counts.count(COMPLETE),
        "skipped": counts.count(SKIPPED),
        "to_run": counts.count(TO_RUN),
    }


def plan_table(described: dict[str, Any]) -> str:
    """`describe_plan` for people: a line per stage, with the cells that share it."""
    every = len(described["cells"])
    rows = [("STAGE", "COMMAND", "STATE", "CELLS")]
    for stage in described["stages"]:
        shared = stage["cells"]
        who = f"all {every}" if len(shared) == every > 1 else ", ".join(shared)
        rows.append((stage["stage"], stage["command"], stage["state"], who))
    lines = columns(rows)
    lines.append(
        f"{len(described['stages'])} stages for {every} cells: {described['complete']} complete, "
        f"{described['skipped']} skipped, {described['to_run']} to run"
    )
    return "\n".join(lines)


def sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run every missing stage, then summarize each (teacher, student, seed) and report."""
    cells, nodes = plan(cfg)
    if not (cells[0].config.ray.address or os.environ.get("RAY_ADDRESS")):
        for node in nodes.values():  # a local session cannot grow: fail before Ray starts
            check_local_resources(node.config, sections(node.command))
    with first_writes(cfg.run_dir):
        run = RunDir(cfg.run_dir)
        run.write_text(
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), *layout.SWEEP_CONFIG
        )
    write_lineage(run, cells)
    started = time.time()
    outcomes = run_graph(nodes, run, cfg.max_concurrent_stages, cfg.stage_timeout_s)
    wall = time.time() - started
    groups = {}
    for name, members in _groups(cells).items():
        found = _summarize(run, members)
        if found is not None:
            run.write_json(found, *layout.sweep_group_summary(name))
            groups[name] = load_results(run, found)
    failures = [
        {"stage": key, "command": nodes[key].command, "cells": nodes[key].cells, "error": o.error}
        for key, o in outcomes.items()
        if o.state == "failed" or (o.state == "blocked" and not _waited_on_a_need(o))
    ]
    facts = _facts(cells, outcomes, wall)
    record = {
        "facts": facts,
        "stages": {key: {"command": nodes[key].command, **vars(o)} for key, o in outcomes.items()},
        "cells": {cell.name: _cell_state(cell, nodes, outcomes) for cell in cells},
        "failures": failures,
    }
    run.write_json(record, *layout.SWEEP_SUMMARY)
    rows = cell_rows(cells, groups)
    written = write_report(run, rows, facts, failures)
    if uri := results_uri(cells[0].config.model_dump(mode="json")):
        name = f"sweep-{cfg.run_dir.rstrip('/').rsplit('/', 1)[-1]}"
        log_sweep(uri, name, [tracked(row) for row in rows])
    return {**facts, "cells": record["cells"], "report": written["report"]}


def write_lineage(run: RunDir, cells: list[Cell]) -> None:
    """What every cell refers to, with identities as this machine resolves them now. Each stage's
    command records only its own cell's config beside `config.yaml`; this is what `w2sr gc`
    keeps for the others."""
    kept = functools.reduce(operator.or_, (record(cell.config) for cell in cells))
    run.write_json(kept.to_json(), *layout.SWEEP_LINEAGE)


def _waited_on_a_need(outcome: Outcome) -> bool:
    """A stage blocked because what it needs failed (reported there), not by a lease it never
    got, which is a failure of its own."""
    return (outcome.error or "").startswith("needs ")


def _groups(cells: list[Cell]) -> dict[str, list[Cell]]:
    out: dict[str, list[Cell]] = {}
    for cell in cells:
        out.setdefault(group_name(cell), []).append(cell)
    return out


def _summarize(run: RunDir, members: list[Cell]) -> dict[str, Any] | None:
    """One group's evaluation summary, of the models its cells compare; None when none has a
    result yet."""
    config = members[0].config
    labels = tuple(dict.fromkeys(label for cell in members for label in cell.labels))
    tasks, skipped = plan_tasks(config, labels=labels)
    done = [task for task in tasks if run.exists(*task.file)]
    if not done:
        return None
    skipped = {label: why for label, why in skipped.items() if label in labels}
    return summary(config, run, done, skipped)


def _cell_state(cell: Cell, nodes: dict[str, Node], outcomes: dict[str, Outcome]) -> str:
    mine = [key for key, node in nodes.items() if cell.name in node.cells]
    states = {outcomes[key].state for key in mine if key in outcomes}
    if "failed" in states or "blocked" in states:
        return "failed"
    if "skipped" in states:
        return "skipped"
    return "complete" if len(states) and states <= {"complete", "done"} else "incomplete"


def _facts(cells: list[Cell], outcomes: dict[str, Outcome], wall: float) -> dict[str, Any]:
    spans = [(o.started, o.ended) for o in outcomes.values() if o.started and o.ended]
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    states = [o.state for o in outcomes.values()]
    return {
        "cells": len(cells),
        "stages": len(outcomes),
        "ran": states.count("done") + states.count("failed"),
        "complete": states.count("complete"),
        "failed": states.count("failed"),
        "blocked": states.count("blocked"),
        "wall_seconds": round(wall, 1),
        "stage_seconds": round(sum(e - s for s, e in spans), 1),
        "parallelism": sum(e - s for s, e in spans) / wall if wall > 0 and spans else 0.0,
        "max_concurrent": most,
    }
