"""The sweep's report: one row per cell, RGR over teacher x student, the spread over seeds, and
accuracy against teacher scale for reasoner and non-reasoner teachers (the paper's Figures 3
and 4).

Each (teacher, student, seed) group's results are read as one run's (`w2sr.reporting`), from the
summary the sweep writes for it, so a cell's pass@1 interval and its RGR interval come from the
same paired bootstrap as a single run's. With several seeds, a cell's interval over seeds adds
the spread between seeds to the mean bootstrap variance within them (the law of total
variance), so it covers SFT seed variance as well as problem sampling.

A cell's RL reference is the base config's GRPO run, or the published checkpoint its student
names as `rl` (outside: RGR is reported, its cost is not).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from w2sr import layout
from w2sr.reporting.figures import log_ticks, pyplot, save_figure
from w2sr.reporting.results import AVG, RunResults, costs, display_name, teacher_scale
from w2sr.reporting.tables import count, interval, pct, rgr_text, table
from w2sr.rundir import RunDir
from w2sr.sweep.plan import Cell, matched_suffix

Z95 = 1.959964


@dataclass
class CellRow:
    cell: Cell
    pass1: float | None
    ci: tuple[float, float] | None
    rgr: float | None
    rgr_ci: tuple[float, float] | None
    worker_hours: float | None
    scale: float | None  # teacher parameters, in billions


def cell_rows(cells: list[Cell], groups: dict[str, RunResults]) -> list[CellRow]:
    rows = []
    for cell in cells:
        results = groups.get(group_name(cell))
        label = cell.labels[2]
        if results is None or AVG not in results.pass1.get(label, {}):
            rows.append(CellRow(cell, None, None, None, None, None, _scale(cell, results)))
            continue
        spent = costs(results).get(label)
        rows.append(
            CellRow(
                cell,
                results.pass1[label][AVG],
                results.ci[label][AVG],
                results.rgr.get(label, {}).get(AVG),
                results.rgr_ci.get(label, {}).get(AVG),
                spent["total"] / 3600 if spent else None,
                _scale(cell, results),
            )
        )
    return rows


def rl_reference(cell: Cell) -> str | None:
    """The kind of the cell's RL reference: "GRPO", "outside", or None when it has none."""
    if cell.config.rl is not None:
        return "outside"
    return "GRPO" if cell.config.grpo is not None else None


def group_name(cell: Cell) -> str:
    """The (teacher, student, seed, match) group a cell's results are read with."""
    matched = matched_suffix(cell.match)
    return f"{cell.teacher.label}.{cell.student.label}{matched}.s{cell.seed}"


def _scale(cell: Cell, results: RunResults | None) -> float | None:
    if cell.teacher.scale is not None:
        return cell.teacher.scale
    counted = teacher_scale(results) if results else None
    return counted / 1e9 if counted else None


def _parameters(billions: float) -> str:
    return count(round(billions * 1e9))


def write_report(
    run: RunDir, rows: list[CellRow], facts: dict[str, Any], failures: list[dict[str, str]]
) -> dict[str, Any]:
    parts = [
        f"# W2SR sweep: {run.uri}",
        "",
        f"{facts['cells']} cells, {facts['stages']} stages ({facts['ran']} run now, "
        f"{facts['complete']} complete before, {facts['failed']} failed, {facts['blocked']} "
        f"blocked) in {facts['wall_seconds']:.0f} s; stages ran {facts['parallelism']:.2f} at a "
        f"time on average, at most {facts['max_concurrent']}.",
        "",
        "## Cells",
        "",
        "Average pass@1 (%) over the benchmarks, with its 95% interval; RL: the cell's RL "
        "reference, its GRPO run or an outside checkpoint (below); RGR (%) on that average; "
        "cost: worker-hours of the teacher's traces plus the student's SFT.",
        "",
        _cell_table(rows),
    ]
    rgr = _rgr_table(rows)
    if rgr:
        first = rows[0].cell.match
        sets = "" if first == "none" else f", training sets {first}-matched"
        parts += ["", f"## RGR of W2SR over teacher x student (%), mean over seeds{sets}", "", rgr]
    outside = _outside(rows)
    if outside:
        parts += ["", "RL references not trained in this sweep (published checkpoints):", ""]
        parts += [f"- student {student}: `{spec}`" for student, spec in outside.items()]
    seeds = _seed_table(rows)
    if seeds:
        parts += ["", "## Over seeds", "", seeds]
    if failures:
        parts += ["", "## Failures", ""]
        for failure in failures:
            cells = ", ".join(failure["cells"])
            error = [f"  {line}" for line in failure["error"].splitlines()]
            parts += [f"- `{failure['stage']}` ({failure['command']}), needed by {cells}:"]
            parts += ["", "  ```", *error, "  ```"]
    figure = _figure_scale(run, rows)
    if figure:
        parts += ["", "## Figures", "", f"![{figure}]({figure})"]
    run.write_text("\n".join(parts) + "\n", layout.REPORT, "report.md")
    return {"report": run.path(layout.REPORT, "report.md"), "figures": [figure] if figure else []}


def _cell_table(rows: list[CellRow]) -> str:
    matched = any(r.cell.match != "none" for r in rows)
    header = ["Teacher", "Kind", "Parameters", "Student", "Variant", *(["Matched"] * matched)]
    header += ["Seed", "Pass@1", "95% CI", "RL", "RGR", "RGR 95% CI", "Cost (worker-h)"]
    body = []
    for r in rows:
        c = r.cell
        rl = rl_reference(c)
        rgr = r.pass1 is not None and rl is not None
        body.append(
            [
                c.teacher.label,
                c.teacher.kind,
                _parameters(r.scale) if r.scale else "–",
                c.student.label,
                display_name(c.labels[2]),
                *([c.match] * matched),
                str(c.seed),
                pct(r.pass1),
                interval(r.ci) if r.pass1 is not None else "–",
                rl or "–",
                rgr_text(r.rgr) if rgr else "–",
                interval(r.rgr_ci) if rgr else "–",
                f"{r.worker_hours:.3f}" if r.worker_hours is not None else "–",
            ]
        )
    return table(header, body)


def _primary(rows: list[CellRow]) -> list[CellRow]:
    """The W2SR rows of the sweep's first `match` value: a teacher x student table or a scale
    figure shows one training-set size rule, not an average over them."""
    first = rows[0].cell.match if rows else "none"
    return [r for r in rows if r.cell.variant == "all" and r.cell.match == first]


def _rgr_table(rows: list[CellRow]) -> str | None:
    found = [r for r in _primary(rows) if r.pass1 is not None and rl_reference(r.cell)]
    if not found:
        return None
    teachers = list(dict.fromkeys(r.cell.teacher.label for r in found))
    students = list(dict.fromkeys(r.cell.student.label for r in found))
    body = []
    for teacher in teachers:
        line = [teacher]
        for student in students:
            values = [
                r.rgr
                for r in found
                if (r.cell.teacher.label, r.cell.student.label) == (teacher, student)
            ]
            defined = [v for v in values if v is not None]
            if not values:  # no cell of this pair has an RL reference (or a result yet)
                line.append("–")
            else:
                line.append(rgr_text(statistics.mean(defined)) if defined else "undefined")
        body.append(line)
    return table(["Teacher \\ student", *students], body)


def _outside(rows: list[CellRow]) -> dict[str, str]:
    """Student label -> the outside RL checkpoint its cells compare with."""
    return {
        r.cell.student.label: r.cell.config.rl for r in rows if rl_reference(r.cell) == "outside"
    }


def seed_interval(rows: list[CellRow]) -> tuple[float, float, float]:
    """Mean over seeds and a 95% interval from the within-seed and between-seed variances."""
    means = [r.pass1 for r in rows]
    within = [((r.ci[1] - r.ci[0]) / (2 * Z95)) ** 2 for r in rows]
    between = statistics.variance(means) if len(means) > 1 else 0.0
    mean, sd = statistics.mean(means), float(np.sqrt(statistics.mean(within) + between))
    return mean, mean - Z95 * sd, mean + Z95 * sd


def _seed_table(rows: list[CellRow]) -> str | None:
    by_cell: dict[tuple, list[CellRow]] = {}
    for r in rows:
        if r.pass1 is not None:
            c = r.cell
            key = (c.teacher.label, c.student.label, c.variant, c.match)
            by_cell.setdefault(key, []).append(r)
    if all(len(group) < 2 for group in by_cell.values()):
        return None
    header = ["Teacher", "Student", "Variant", "Matched", "Seeds", "Mean pass@1", "SD over seeds"]
    header += ["95% CI (seeds and problems)"]
    body = []
    for (teacher, student, _, match), group in by_cell.items():
        mean, lo, hi = seed_interval(group)
        sd = statistics.stdev([r.pass1 for r in group]) if len(group) > 1 else 0.0
        label = display_name(group[0].cell.labels[2])
        body.append([teacher, student, label, match, str(len(group)), pct(mean), pct(sd),
                     interval((lo, hi))])  # fmt: skip
    return table(header, body)


def _figure_scale(run: RunDir, rows: list[CellRow]) -> str | None:
    """W2SR's accuracy against its teacher's scale, one line per teacher kind (Figures 3, 4)."""
    points = [r for r in _primary(rows) if r.pass1 is not None and r.scale]
    if len({r.scale for r in points}) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for kind, marker in (("reasoner", "o"), ("non_reasoner", "s")):
        found = sorted((r for r in points if r.cell.teacher.kind == kind), key=lambda r: r.scale)
        if not found:
            continue
        scales = sorted({r.scale for r in found})
        means = [statistics.mean(r.pass1 for r in found if r.scale == s) * 100 for s in scales]
        ax.plot(scales, means, marker=marker, label=f"W2SR from {kind.replace('_', '-')}s")
    log_ticks(ax, [r.scale for r in points], _parameters)
    ax.set_xlabel("Teacher parameters")
    ax.set_ylabel("Avg pass@1 (%)")
    ax.set_title("W2SR against teacher scale")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(run, fig, "sweep_teacher_scale.png")
