"""The report of many runs: the cells of `w2sr sweep`, or a folder of runs, one per teacher
(`w2sr report FOLDER`). A row per cell (a student trained on one set of one teacher's traces,
with one seed), RGR over teacher x student, the spread over seeds, every model's score per run,
the failures, and accuracy against teacher scale for reasoner and non-reasoner teachers (the
paper's Figures 3 and 4).

A cell's numbers are read from its run's results (in a sweep, those of its (teacher, student,
seed) group, summarized as one run's), so its pass@1 interval and its RGR interval come from the
same paired bootstrap as a single run's. With several seeds, a cell's interval over seeds adds
the spread between seeds to the mean bootstrap variance within them (the law of total
variance), so it covers SFT seed variance as well as problem sampling.

A cell's RL reference is its config's GRPO run, or the published checkpoint its student names
as `rl` (outside: RGR is reported, its cost is not).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from w2sr import layout
from w2sr.layout import DISPLAY_NAMES, STUDENT_LABELS
from w2sr.reporting.figures import ScalePoint, figure_rgr, figure_scale, figure_scale_benchmarks
from w2sr.reporting.results import AVG, RunResults, costs, display_name, teacher_scale
from w2sr.reporting.tables import count, interval, pct, rgr_or_dash, rgr_text, table
from w2sr.rundir import RunDir

Z95 = 1.959964
GRPO, OUTSIDE = "GRPO", "outside"  # the kinds of a cell's RL reference
FIGURE4 = ("teacher", "w2sr", "w2sr_p")  # the models of the per-benchmark scale figure


class Scores(NamedTuple):
    """A model's average pass@1 over the benchmarks, its RGR, their intervals and its cost."""

    pass1: float | None = None
    ci: tuple[float, float] | None = None
    rgr: float | None = None
    rgr_ci: tuple[float, float] | None = None
    worker_hours: float | None = None


@dataclass(frozen=True)
class Row:
    """One cell; its scores are None until its student has a result."""

    teacher: str
    kind: str | None  # reasoner or non_reasoner; None where the run does not say
    parameters: float | None  # the teacher's
    student: str
    label: str  # the student's model label: w2sr, w2sr_p or w2sr_n
    seed: int
    match: str  # `select.match` of its training set
    run: str  # the run (a sweep's group) whose results it is read from
    rl: str | None  # GRPO, OUTSIDE (`rl_spec` names it), or None: no RL reference
    rl_spec: str | None
    scores: Scores = Scores()


def scores(results: RunResults | None, label: str) -> Scores:
    """`label`'s scores in a run's results; all None while it has no result."""
    if results is None or AVG not in results.pass1.get(label, {}):
        return Scores()
    spent = costs(results).get(label)
    return Scores(
        results.pass1[label][AVG],
        results.ci[label][AVG],
        results.rgr.get(label, {}).get(AVG),
        results.rgr_ci.get(label, {}).get(AVG),
        spent["total"] / 3600 if spent else None,
    )


def run_rows(name: str, results: RunResults, match: str) -> list[Row]:
    """The cells of one run of a folder of runs (`name`: its folder): one per student it
    evaluated, with the run's base student as the student and its folder as the teacher."""
    models = results.summary["models"]
    rl = (OUTSIDE if results.outside_rl else GRPO) if "rl" in models else None
    spec = results.source("rl")["spec"] if rl == OUTSIDE else None
    student = (models.get("base") or {}).get("spec") or "–"
    seed = int(results.settings["seed"])
    return [
        Row(
            name,
            None,
            teacher_scale(results),
            student,
            label,
            seed,
            match,
            name,
            rl,
            spec,
            scores(results, label),
        )  # fmt: skip
        for label in STUDENT_LABELS
        if label in models
    ]


def write_sweep_report(
    root: RunDir,
    rows: list[Row],
    runs: dict[str, RunResults],
    figure: str,
    facts: dict[str, Any] | None = None,
    failures: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """report/report.md and the figures of `root`: `runs` (name -> results) are those the rows
    are read from, `figure` names the teacher-scale figure, `facts` and `failures` are what a
    sweep ran (none for a folder of runs)."""
    parts = [f"# W2SR sweep: {root.uri}"]
    if facts is not None:
        parts += ["", _facts(facts)]
    if rows:
        parts += [
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
        first = rows[0].match
        sets = "" if first == "none" else f", training sets {first}-matched"
        parts += ["", f"## RGR of W2SR over teacher x student (%), mean over seeds{sets}", "", rgr]
    outside = {r.student: r.rl_spec for r in rows if r.rl == OUTSIDE}
    if outside:
        parts += ["", "RL references not trained in this sweep (published checkpoints):", ""]
        parts += [f"- student {student}: `{spec}`" for student, spec in outside.items()]
    seeds = _seed_table(rows)
    if seeds:
        parts += ["", "## Over seeds", "", seeds]
    if runs:
        parts += [
            "",
            "## Runs",
            "",
            "Average pass@1 (%) over each run's benchmarks, and RGR (%) on that average.",
            "",
            _run_table(root, rows, runs),
        ]
        if any(results.outside_rl for results in runs.values()):
            parts += [
                "",
                "RL: the run's GRPO student, or, marked (outside), the published checkpoint its "
                "config names as `rl` (listed above).",
            ]
    if failures:
        parts += ["", "## Failures", ""]
        for failure in failures:
            cells = ", ".join(failure["cells"])
            error = [f"  {line}" for line in failure["error"].splitlines()]
            parts += [f"- `{failure['stage']}` ({failure['command']}), needed by {cells}:"]
            parts += ["", "  ```", *error, "  ```"]
    primary = _primary(rows)
    panels = {
        bench: [p for p in _points(primary, runs, bench) if p.label in FIGURE4]
        for bench in sorted({b for results in runs.values() for b in results.benches})
    }
    matrix = rgr_matrix(rows)
    figures = [
        f
        for f in (
            figure_rgr(root, *matrix) if matrix else None,
            figure_scale(root, _points(primary, runs, AVG), _references(primary, runs), figure),
            figure_scale_benchmarks(root, panels),
        )
        if f
    ]
    if figures:
        parts += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    root.write_text("\n".join(parts) + "\n", *layout.REPORT_FILE)
    return {"report": root.path(*layout.REPORT_FILE), "figures": figures, "runs": list(runs)}


def _facts(facts: dict[str, Any]) -> str:
    return (
        f"{facts['cells']} cells, {facts['stages']} stages ({facts['ran']} run now, "
        f"{facts['complete']} complete before, {facts['failed']} failed, {facts['blocked']} "
        f"blocked) in {facts['wall_seconds']:.0f} s; stages ran {facts['parallelism']:.2f} at a "
        f"time on average, at most {facts['max_concurrent']}."
    )


def _parameters(parameters: float | None) -> str:
    return count(round(parameters)) if parameters else "–"


def _cell_table(rows: list[Row]) -> str:
    matched = any(r.match != "none" for r in rows)
    header = ["Teacher", "Kind", "Parameters", "Student", "Variant", *(["Matched"] * matched)]
    header += ["Seed", "Pass@1", "95% CI", "RL", "RGR", "RGR 95% CI", "Cost (worker-h)"]
    body = []
    for r in rows:
        s = r.scores
        rgr = s.pass1 is not None and r.rl is not None
        body.append(
            [
                r.teacher,
                r.kind or "–",
                _parameters(r.parameters),
                r.student,
                display_name(r.label),
                *([r.match] * matched),
                str(r.seed),
                pct(s.pass1),
                interval(s.ci) if s.pass1 is not None else "–",
                r.rl or "–",
                rgr_text(s.rgr) if rgr else "–",
                interval(s.rgr_ci) if rgr else "–",
                f"{s.worker_hours:.3f}" if s.worker_hours is not None else "–",
            ]
        )
    return table(header, body)


def _primary(rows: list[Row]) -> list[Row]:
    """The rows of the first `match` value: a teacher x student table or a scale figure shows
    one training-set size rule, not an average over them."""
    return [r for r in rows if r.match == rows[0].match]


def _rgr_table(rows: list[Row]) -> str | None:
    found = rgr_matrix(rows)
    if found is None:
        return None
    teachers, students, matrix = found
    body = [
        [teacher, *(rgr_text(v) if isinstance(v, float) else v for v in values)]
        for teacher, values in zip(teachers, matrix, strict=True)
    ]
    return table(["Teacher \\ student", *students], body)


def rgr_matrix(rows: list[Row]) -> tuple[list[str], list[str], list[list[float | str]]] | None:
    """W2SR's RGR over teacher x student, the mean over a pair's seeds; "undefined" where RL is
    no better than the base student, "–" where no cell of the pair has an RL reference (or a
    result yet)."""
    found = [
        r
        for r in _primary(rows)
        if r.label == "w2sr" and r.scores.pass1 is not None and r.rl is not None
    ]
    if not found:
        return None
    teachers = list(dict.fromkeys(r.teacher for r in found))
    students = list(dict.fromkeys(r.student for r in found))
    matrix: list[list[float | str]] = []
    for teacher in teachers:
        line: list[float | str] = []
        for student in students:
            values = [r.scores.rgr for r in found if (r.teacher, r.student) == (teacher, student)]
            defined = [v for v in values if v is not None]
            if not values:
                line.append("–")
            else:
                line.append(statistics.mean(defined) if defined else "undefined")
        matrix.append(line)
    return teachers, students, matrix


def pooled_interval(
    values: list[float], cis: list[tuple[float, float]]
) -> tuple[float, float, float]:
    """The mean of several estimates (a cell's seeds) and a 95% interval from the variance
    within each (its interval's) and between them."""
    within = [((hi - lo) / (2 * Z95)) ** 2 for lo, hi in cis]
    between = statistics.variance(values) if len(values) > 1 else 0.0
    mean, sd = statistics.mean(values), float(np.sqrt(statistics.mean(within) + between))
    return mean, mean - Z95 * sd, mean + Z95 * sd


def _seed_table(rows: list[Row]) -> str | None:
    by_cell: dict[tuple[str, str, str, str], list[tuple[float, tuple[float, float]]]] = {}
    for r in rows:
        if r.scores.pass1 is not None and r.scores.ci is not None:
            key = (r.teacher, r.student, r.label, r.match)
            by_cell.setdefault(key, []).append((r.scores.pass1, r.scores.ci))
    if all(len(group) < 2 for group in by_cell.values()):
        return None
    header = ["Teacher", "Student", "Variant", "Matched", "Seeds", "Mean pass@1", "SD over seeds"]
    header += ["95% CI (seeds and problems)"]
    body = []
    for (teacher, student, label, match), group in by_cell.items():
        values = [value for value, _ in group]
        mean, lo, hi = pooled_interval(values, [ci for _, ci in group])
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        body.append([teacher, student, display_name(label), match, str(len(group)), pct(mean),
                     pct(sd), interval((lo, hi))])  # fmt: skip
    return table(header, body)


def _run_table(root: RunDir, rows: list[Row], runs: dict[str, RunResults]) -> str:
    """Every model's average pass@1 and each student's RGR, a run per row, smallest teacher
    first; a run with its own report links to it."""
    outside = any(results.outside_rl for results in runs.values())
    header = ["Run", "Teacher model", "Parameters"]
    header += [display_name(x) for x in DISPLAY_NAMES if x != "rl"]
    header += ["RL" if outside else display_name("rl")]
    header += [f"RGR {display_name(v)}" for v in STUDENT_LABELS]
    sizes = {r.run: r.parameters for r in rows if r.parameters}
    size = {name: sizes.get(name) or teacher_scale(results) for name, results in runs.items()}
    body = []
    for name, results in sorted(runs.items(), key=lambda item: size[item[0]] or 0):
        rl = pct(results.pass1.get("rl", {}).get(AVG))
        own = root.exists(name, *layout.REPORT_FILE)
        body.append(
            [
                f"[{name}]({'/'.join((name, *layout.REPORT_FILE))})" if own else name,
                f"`{results.summary['models'].get('teacher', {}).get('spec', '–')}`",
                _parameters(size[name]) if size[name] else "unknown",
                *[pct(results.pass1.get(x, {}).get(AVG)) for x in DISPLAY_NAMES if x != "rl"],
                f"{rl} (outside)" if results.outside_rl else rl,
                *[rgr_or_dash(results, v) for v in STUDENT_LABELS],
            ]
        )
    return table(header, body)


def _points(rows: list[Row], runs: dict[str, RunResults], column: str) -> list[ScalePoint]:
    """Each student's accuracy on `column` (a benchmark, or the average) and its teacher's,
    against the teacher's size; the points at one (model, kind, size) pooled as over seeds."""
    found: dict[tuple[str, str | None, float], list[tuple[float, tuple[float, float] | None]]]
    found = {}
    teachers = set()
    for r in rows:
        results = runs.get(r.run)
        if not r.parameters:
            continue
        if column == AVG and r.scores.pass1 is not None:
            point = (r.scores.pass1, r.scores.ci)
            found.setdefault((r.label, r.kind, r.parameters), []).append(point)
        elif results and column in results.pass1.get(r.label, {}):
            point = (results.pass1[r.label][column], results.ci[r.label][column])
            found.setdefault((r.label, r.kind, r.parameters), []).append(point)
        if results and r.teacher not in teachers and column in results.pass1.get("teacher", {}):
            teachers.add(r.teacher)  # a teacher is evaluated once, whatever its cells
            point = (results.pass1["teacher"][column], results.ci["teacher"][column])
            found.setdefault(("teacher", r.kind, r.parameters), []).append(point)
    out = []
    for (label, kind, parameters), group in found.items():
        values = [value for value, _ in group]
        cis = [ci for _, ci in group if ci is not None]
        if len(group) == 1:
            ci = group[0][1]
        else:
            ci = pooled_interval(values, cis)[1:] if len(cis) == len(group) else None
        out.append(ScalePoint(label, kind, parameters, statistics.mean(values), ci))
    order = ["teacher", *STUDENT_LABELS]
    return sorted(out, key=lambda p: order.index(p.label))


def _references(rows: list[Row], runs: dict[str, RunResults]) -> dict[str, tuple[str, float]]:
    """The base student's and RL's average accuracy, as lines beside the teachers, when every
    cell trains the same student; an RL reference of one kind says which."""
    if len({r.student for r in rows}) != 1:
        return {}
    shown = [runs[name] for name in dict.fromkeys(r.run for r in rows) if name in runs]
    out = {}
    for label in ("base", "rl"):
        found = [results for results in shown if AVG in results.pass1.get(label, {})]
        if found:
            names = {results.name(label) for results in found}
            value = float(np.mean([results.pass1[label][AVG] for results in found]))
            out[label] = (names.pop() if len(names) == 1 else "RL", value)
    return out
