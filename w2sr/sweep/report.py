"""The sweep's report: each cell read from the results of its (teacher, student, seed) group,
written by `w2sr.reporting.sweep` (the report of many runs, shared with `w2sr report FOLDER`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from w2sr.reporting.figures import SWEEP_SCALE
from w2sr.reporting.results import RunResults, teacher_scale
from w2sr.reporting.sweep import GRPO, OUTSIDE, Row, Scores, scores, write_sweep_report
from w2sr.rundir import RunDir
from w2sr.sweep.plan import Cell, matched_suffix


@dataclass
class CellRow:
    cell: Cell
    pass1: float | None
    ci: tuple[float, float] | None
    rgr: float | None
    rgr_ci: tuple[float, float] | None
    worker_hours: float | None
    scale: float | None  # teacher parameters, in billions
    results: RunResults | None = None  # its group's: the report's table of runs and figures


def cell_rows(cells: list[Cell], groups: dict[str, RunResults]) -> list[CellRow]:
    rows = []
    for cell in cells:
        results = groups.get(group_name(cell))
        rows.append(
            CellRow(cell, *scores(results, cell.student_label), _scale(cell, results), results)
        )
    return rows


def rl_reference(cell: Cell) -> str | None:
    """The kind of the cell's RL reference: GRPO, OUTSIDE, or None when it has none."""
    if cell.config.rl is not None:
        return OUTSIDE
    return GRPO if cell.config.grpo is not None else None


def group_name(cell: Cell) -> str:
    """The (teacher, student, seed, match) group a cell's results are read with."""
    matched = matched_suffix(cell.match)
    return f"{cell.teacher.label}.{cell.student.label}{matched}.s{cell.seed}"


def _scale(cell: Cell, results: RunResults | None) -> float | None:
    if cell.teacher.scale is not None:
        return cell.teacher.scale
    counted = teacher_scale(results) if results else None
    return counted / 1e9 if counted else None


def write_report(
    run: RunDir, rows: list[CellRow], facts: dict[str, Any], failures: list[dict[str, Any]]
) -> dict[str, Any]:
    runs = {group_name(r.cell): r.results for r in rows if r.results is not None}
    found = [_row(r) for r in rows]
    return write_sweep_report(run, found, runs, SWEEP_SCALE, facts, failures)


def _row(r: CellRow) -> Row:
    c = r.cell
    return Row(
        c.teacher.label,
        c.teacher.kind,
        r.scale * 1e9 if r.scale else None,
        c.student.label,
        c.labels[2],
        c.seed,
        c.match,
        group_name(c),
        rl_reference(c),
        c.config.rl,
        Scores(r.pass1, r.ci, r.rgr, r.rgr_ci, r.worker_hours),
    )


def tracked(r: CellRow) -> tuple[dict[str, str], dict[str, float]]:
    """A cell's parameters and metrics as its tracker run holds them (`w2sr.tracking`)."""
    c = r.cell
    params = {
        "cell": c.name,
        "teacher": c.teacher.label,
        "teacher_model": c.teacher.model,
        "teacher_kind": c.teacher.kind,
        "student": c.student.label,
        "student_model": c.student.model,
        "variant": c.variant,
        "seed": str(c.seed),
        "match": c.match,
    }
    metrics = {"pass_at_1": r.pass1, "rgr": r.rgr, "worker_hours": r.worker_hours}
    metrics["teacher_scale_billions"] = r.scale
    for name, interval in (("pass_at_1", r.ci), ("rgr", r.rgr_ci)):
        if interval is not None:
            metrics |= {f"{name}_ci_low": interval[0], f"{name}_ci_high": interval[1]}
    return params, {k: v for k, v in metrics.items() if v is not None}
