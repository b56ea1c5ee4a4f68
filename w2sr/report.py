"""Stage `report`: report.md and the paper's figures, from what `w2sr eval` left in a run dir.

For one run (a folder with eval/summary.json):
- the paper-style table: pass@1 per benchmark and its macro average for the teacher, the base
  student, W2SR, W2SR-P, W2SR-N and RL, with RGR = (W2SR - base) / (RL - base) for each student
  variant, and 95% intervals from a bootstrap over problems (paired across models, stratified
  across benchmarks, so an average or a ratio gets the interval it deserves);
- pass@k and majority vote, answer and truncation rates;
- cognitive behaviours of the responses (w2sr.behaviors), teacher vs base student vs students;
- figures: the four bars of Figure 2 (teacher, student, W2SR, W2SR-P), and accuracy against
  training cost (Figure 5) when the stages recorded their costs.

For a sweep (a folder whose subfolders are runs, e.g. one per teacher), each run gets its report
and the sweep gets a summary table with accuracy against teacher scale (Figures 3 and 4).

An RGR whose RL gain is zero or negative is written "undefined", never as a number.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from w2sr import metrics
from w2sr.behaviors import BEHAVIORS, summarize_behaviors
from w2sr.config import RUN_LABELS
from w2sr.evaluate import TOO_LONG, problem_matrix
from w2sr.rundir import DONE, RunDir

log = logging.getLogger(__name__)

BENCH_NAMES = {
    "math500": "MATH-500",
    "aime24": "AIME24",
    "aime25": "AIME25",
    "amc23": "AMC23",
    "gsm8k": "GSM8K",
    "minerva_math": "Minerva",
    "olympiadbench": "OlympiadBench",
    "gpqa_diamond": "GPQA-D",
    "offline": "Offline",
}
NAMES = ("Teacher", "Base student", "W2SR", "W2SR-P", "W2SR-N", "RL (GRPO)")
MODEL_NAMES = dict(zip(RUN_LABELS, NAMES, strict=True))  # the paper's row order
VARIANTS = ("w2sr", "w2sr_p", "w2sr_n")
FIGURE2 = ("teacher", "base", "w2sr", "w2sr_p")
AVG = "avg"


def _name(label: str) -> str:
    return MODEL_NAMES.get(label, label)


def _bench(name: str) -> str:
    return BENCH_NAMES.get(name, name)


# --- the numbers of one run ------------------------------------------------------------------


@dataclass
class RunResults:
    run: RunDir
    summary: dict[str, Any]
    benches: list[str]
    labels: list[str]  # run labels in paper order, then extras
    pass1: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> bench|avg -> x
    ci: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    rgr: dict[str, dict[str, float | None]] = field(default_factory=dict)  # variant -> bench|avg
    rgr_ci: dict[str, dict[str, tuple[float, float] | None]] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        return self.summary["settings"]


def load_results(run: RunDir) -> RunResults:
    summary = run.read_json("eval", "summary.json")
    models = summary["models"]
    order = [label for label in MODEL_NAMES if label in models]
    labels = order + sorted(set(models) - set(order))
    results = RunResults(run, summary, list(summary["benchmarks"]), labels)
    for label in labels:
        entries = models[label]["results"]
        results.pass1[label] = {b: entries[b]["pass@1"] for b in results.benches if b in entries}
        results.ci[label] = {b: tuple(entries[b]["pass@1_ci"]) for b in results.pass1[label]}
    _paired_statistics(results)
    return results


def _paired_statistics(results: RunResults) -> None:
    """Macro averages and RGR with their intervals, from one paired bootstrap of every model
    that has a result on every benchmark."""
    complete = [
        label for label in results.labels if len(results.pass1[label]) == len(results.benches)
    ]
    if not complete:
        return
    settings, models = results.settings, results.summary["models"]
    scores = []
    for bench in results.benches:
        rows, ids = [], None
        for label in complete:
            table = results.run.read_parquet(*models[label]["results"][bench]["file"].split("/"))
            problems, correct, _ = problem_matrix(table)
            if ids is not None and problems != ids:
                raise ValueError(f"{bench}: {label} was evaluated on other problems than the rest")
            ids = problems
            rows.append(correct.mean(axis=1))
        scores.append(np.array(rows))
    means = metrics.resample_means(scores, settings["bootstrap_resamples"], settings["seed"])
    averages = means.mean(axis=2)  # (resamples, models): the macro average of each resample
    confidence = settings["confidence"]
    for m, label in enumerate(complete):
        results.pass1[label][AVG] = float(np.mean([s[m].mean() for s in scores]))
        results.ci[label][AVG] = metrics.percentile_interval(averages[:, m], confidence)
    if not {"base", "rl"} <= set(complete):
        return
    base, rl = complete.index("base"), complete.index("rl")
    for variant in [v for v in VARIANTS if v in complete]:
        student = complete.index(variant)
        results.rgr[variant], results.rgr_ci[variant] = {}, {}
        columns = [(b, means[:, :, i]) for i, b in enumerate(results.benches)]
        for column, draws in [*columns, (AVG, averages)]:
            point = {label: results.pass1[label][column] for label in ("base", variant, "rl")}
            results.rgr[variant][column] = metrics.rgr(point["base"], point[variant], point["rl"])
            results.rgr_ci[variant][column] = metrics.rgr_interval(
                draws[:, base], draws[:, student], draws[:, rl], confidence
            )


# --- costs -----------------------------------------------------------------------------------


def costs(results: RunResults) -> dict[str, dict[str, float]]:
    """Worker-seconds spent to obtain each trained model: the teacher's traces (shared by the
    three W2SR variants) plus its SFT; RL's training (its rollouts included)."""
    run, models = results.run, results.summary["models"]
    traces = run.read_json("traces", DONE) if run.exists("traces", DONE) else {}
    out = {}
    for label in [*VARIANTS, "rl"]:
        done = (models.get(label) or {}).get("done") or {}
        if "worker_seconds" not in done:
            continue
        generation = traces.get("worker_seconds", 0.0) if label in VARIANTS else 0.0
        out[label] = {
            "generation": generation,
            "training": done["worker_seconds"],
            "total": generation + done["worker_seconds"],
        }
    return out


# --- behaviours ------------------------------------------------------------------------------


def behaviors(results: RunResults) -> dict[str, dict[str, Any]]:
    """Behaviour counts of every model's responses on the benchmarks (the same prompts for all),
    and of the teacher's training traces when the run generated them."""
    out = {}
    models = results.summary["models"]
    for label in results.labels:
        responses = []
        for entry in models[label]["results"].values():
            table = results.run.read_parquet(*entry["file"].split("/"))
            table = table.filter(pc.not_equal(table["finish_reason"], TOO_LONG))
            responses += table.column("response").to_pylist()
        out[_name(label)] = {"traces": len(responses), **summarize_behaviors(responses)}
    names = results.run.list("traces", suffix=".parquet")
    if names:
        traces = [
            t for n in names for t in results.run.read_parquet("traces", n)["trace"].to_pylist()
        ]
        out["Teacher (training traces)"] = {"traces": len(traces), **summarize_behaviors(traces)}
    return out


# --- markdown --------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _interval(ci: tuple[float, float] | None) -> str:
    return "undefined" if ci is None else f"{100 * ci[0]:.1f} – {100 * ci[1]:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _main_tables(results: RunResults) -> str:
    columns = [*results.benches, AVG]
    header = ["Model", *[_bench(b) for b in results.benches], "Avg"]
    values, intervals = [], []
    for label in results.labels:
        values.append([_name(label), *[_pct(results.pass1[label].get(c)) for c in columns]])
        intervals.append(
            [_name(label), *[_cell_interval(results.ci[label].get(c)) for c in columns]]
        )
    for variant in results.rgr:
        name = f"RGR {_name(variant)} (%)"
        values.append([name, *[_rgr(results.rgr[variant][c]) for c in columns]])
        intervals.append([name, *[_interval(results.rgr_ci[variant][c]) for c in columns]])
    settings = results.settings
    text = [
        f"### Pass@1 (%), the mean over {settings['samples']} samples per problem",
        "",
        _table(header, values),
        "",
    ]
    if results.rgr:
        text.append(
            "RGR = (W2SR − base) / (RL − base): the share of RL's gain over the base student "
            "that the student recovers; *undefined* where RL gains nothing (RL ≤ base)."
        )
    else:
        missing = [_name(x) for x in ("base", "rl") if x not in results.pass1]
        text.append(f"RGR is not reported: no result for {', '.join(missing) or 'any student'}.")
    text += [
        "",
        f"### {round(100 * settings['confidence'])}% confidence intervals",
        "",
        f"Bootstrap over problems ({settings['bootstrap_resamples']} resamples; models paired on "
        "the same problems, benchmarks resampled separately for the average). An RGR interval "
        "is *undefined* when RL's gain is not clearly positive.",
        "",
        _table(header, intervals),
    ]
    return "\n".join(text)


def _cell_interval(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else _interval(ci)


def _rgr(value: float | None) -> str:
    return "undefined" if value is None else f"{100 * value:.1f}"


def _details_table(results: RunResults) -> str:
    ks = results.settings["pass_k"]
    samples = results.settings["samples"]
    header = ["Model", "Benchmark", *[f"pass@{k}" for k in ks], f"maj@{samples}"]
    header += ["no answer", "truncated", "tokens", "backend"]
    rows = []
    for label in results.labels:
        for bench, entry in results.summary["models"][label]["results"].items():
            rows.append(
                [
                    _name(label),
                    _bench(bench),
                    *[_pct(entry["pass@k"].get(str(k))) for k in ks],
                    _pct(entry[f"maj@{samples}"]),
                    _pct(entry["no_answer"]),
                    _pct(entry["truncated"]),
                    f"{entry['mean_completion_tokens']:.0f}",
                    entry["backend"].split(" ")[0],
                ]
            )
    return _table(header, rows)


def _behavior_table(found: dict[str, dict[str, Any]]) -> str:
    header = ["Responses of", "n", *[b.replace("_", " ") for b in BEHAVIORS]]
    rows = [
        [
            name,
            str(stats["traces"]),
            *[f"{stats[b]['mean']:.2f} ({100 * stats[b]['share']:.0f}%)" for b in BEHAVIORS],
        ]
        for name, stats in found.items()
    ]
    return _table(header, rows)


def _cost_table(results: RunResults, spent: dict[str, dict[str, float]]) -> str:
    rl = spent.get("rl", {}).get("total")
    header = ["Model", "traces (worker-h)", "training (worker-h)", "total (worker-h)"]
    header += ["RL cost / cost", "Avg pass@1 (%)"]
    rows = [
        [
            _name(label),
            f"{cost['generation'] / 3600:.3f}",
            f"{cost['training'] / 3600:.3f}",
            f"{cost['total'] / 3600:.3f}",
            f"{rl / cost['total']:.1f}x" if rl and cost["total"] else "–",
            _pct(results.pass1.get(label, {}).get(AVG)),
        ]
        for label, cost in spent.items()
    ]
    return _table(header, rows)


def _setup(results: RunResults) -> str:
    s, models = results.settings, results.summary["models"]
    sampling = s["sampling"]
    benches = []
    for bench, info in results.summary["benchmarks"].items():
        left_out = info["decontaminated"]
        note = f", {left_out} training prompts left out" if left_out else ""
        benches.append(f"{_bench(bench)} ({info['problems']} problems{note})")
    lines = [
        f"- Sampling: temperature {sampling['temperature']}, top-p {sampling['top_p']}, "
        f"max {sampling['max_tokens']} new tokens, {s['samples']} samples per problem; "
        f"template `{s['template']}`, grader `{s['grader']}`.",
        f"- Benchmarks: {', '.join(benches)}.",
    ]
    lines += [f"- {_name(label)}: `{models[label]['spec']}`" for label in results.labels]
    lines += [
        f"- {_name(label)}: not evaluated ({why})"
        for label, why in results.summary["skipped"].items()
    ]
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(run: RunDir, fig, name: str) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)

    def write(tmp: str) -> None:
        with run.fs.open_output_stream(tmp) as out:
            out.write(buffer.getvalue())

    run._atomic(("report", name), write)  # RunDir writes text only; PNGs need the same atomicity
    return name


def _error(values: list[float], cis: list[tuple[float, float]]) -> np.ndarray:
    return np.array([[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
                     [hi - v for v, (_, hi) in zip(values, cis, strict=True)]]) * 100  # fmt: skip


def figure_bars(results: RunResults) -> str | None:
    """Figure 2: teacher, student, W2SR and W2SR-P side by side, per benchmark and on average."""
    labels = [label for label in FIGURE2 if label in results.pass1]
    if len(labels) < 2:
        return None
    plt = _pyplot()
    columns = [c for c in [*results.benches, AVG] if all(c in results.pass1[x] for x in labels)]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(columns) + 1), 3.6))
    x = np.arange(len(columns))
    for i, label in enumerate(labels):
        values = [results.pass1[label][c] for c in columns]
        error = _error(values, [results.ci[label][c] for c in columns])
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, np.array(values) * 100, width,
               yerr=error, capsize=2, label=_name(label))  # fmt: skip
    ax.set_xticks(x, [_bench(c) if c != AVG else "Avg" for c in columns])
    ax.set_ylabel("Pass@1 (%)")
    ax.set_title("Weak teacher, strong student: W2SR and W2SR-P")
    ax.legend(frameon=False, ncols=len(labels), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return _save(results.run, fig, "figure2_bars.png")


def _log_ticks(ax, values: list[float], text) -> None:
    """A log x axis labelled at the data points only: readable when there are few of them."""
    ax.set_xscale("log")
    ticks = sorted(set(values))
    ax.set_xticks(ticks, [text(v) for v in ticks])
    ax.xaxis.set_minor_formatter(_pyplot().NullFormatter())


def figure_cost(results: RunResults, spent: dict[str, dict[str, float]]) -> str | None:
    """Figure 5: average accuracy against the worker-hours spent to train each model."""
    points = [label for label in spent if AVG in results.pass1.get(label, {})]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    hours = {label: spent[label]["total"] / 3600 for label in points}
    for marker, label in zip("osD^", points, strict=False):
        value = results.pass1[label][AVG]
        error = _error([value], [results.ci[label][AVG]])
        ax.errorbar(
            hours[label], value * 100, yerr=error, fmt=marker, capsize=3, label=_name(label)
        )
    if AVG in results.pass1.get("base", {}):
        ax.axhline(results.pass1["base"][AVG] * 100, ls="--", c="gray", label="Base student")
    _log_ticks(ax, list(hours.values()), lambda h: f"{h:.3g}")
    ax.set_xlabel("Training cost (worker-hours, teacher traces included)")
    ax.set_ylabel("Avg pass@1 (%)")
    ax.set_title("Accuracy against training cost")
    ax.legend(frameon=False, fontsize=8)
    return _save(results.run, fig, "figure5_cost.png")


# --- one run ---------------------------------------------------------------------------------


def run_report(run: RunDir) -> dict[str, Any]:
    results = load_results(run)
    spent = costs(results)
    figures = [f for f in (figure_bars(results), figure_cost(results, spent)) if f]
    parts = [
        f"# W2SR report: {run.uri}",
        "",
        "## Setup",
        "",
        _setup(results),
        "",
        "## Results",
        "",
        _main_tables(results),
        "",
        "## Pass@k and majority vote (%)",
        "",
        f"pass@k is the unbiased estimator from {results.settings['samples']} samples; maj is "
        "the majority vote over them (ties split); no answer: responses without a final answer; "
        "truncated: responses cut at the token limit; tokens: mean completion length.",
        "",
        _details_table(results),
        "",
        "## Cognitive behaviours",
        "",
        "Mean count per response (share of responses with at least one), from the phrase "
        "patterns of `w2sr/behaviors.py`: lexical markers, to compare models on the same "
        "prompts rather than to read as absolute rates.",
        "",
        _behavior_table(behaviors(results)),
    ]
    if spent:
        parts += ["", "## Training cost", "", _cost_table(results, spent)]
    if figures:
        parts += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    run.write_text("\n".join(parts) + "\n", "report", "report.md")
    return {
        "report": run.path("report", "report.md"),
        "figures": figures,
        "pass@1": results.pass1,
        "rgr": results.rgr,
    }


# --- a sweep of runs -------------------------------------------------------------------------


def report(run_dir: str) -> dict[str, Any]:
    """Write the report of a run, or of every run in a sweep folder plus the sweep's own."""
    root = RunDir(run_dir)
    if root.exists("eval", "summary.json"):
        return run_report(root)
    runs = [name for name in root.list() if root.exists(name, "eval", "summary.json")]
    if not runs:
        raise FileNotFoundError(
            f"no eval/summary.json in {run_dir} or its subfolders: run `w2sr eval` first"
        )
    children = {name: RunDir(f"{root.uri.rstrip('/')}/{name}") for name in runs}
    for child in children.values():
        run_report(child)
    return sweep_report(root, {name: load_results(child) for name, child in children.items()})


def _teacher_scale(results: RunResults) -> int | None:
    return results.summary["models"].get("teacher", {}).get("parameters")


def sweep_report(root: RunDir, runs: dict[str, RunResults]) -> dict[str, Any]:
    header = ["Run", "Teacher model", "Parameters", *[_name(x) for x in MODEL_NAMES]]
    header += [f"RGR {_name(v)}" for v in VARIANTS]
    rows = []
    for name, results in sorted(runs.items(), key=lambda item: _teacher_scale(item[1]) or 0):
        scale = _teacher_scale(results)
        rows.append(
            [
                f"[{name}]({name}/report/report.md)",
                f"`{results.summary['models'].get('teacher', {}).get('spec', '–')}`",
                _count(scale) if scale else "unknown",
                *[_pct(results.pass1.get(label, {}).get(AVG)) for label in MODEL_NAMES],
                *[_rgr_or_dash(results, v) for v in VARIANTS],
            ]
        )
    figures = [f for f in (figure_scale(root, runs), figure_scale_benchmarks(root, runs)) if f]
    parts = [
        f"# W2SR sweep: {root.uri}",
        "",
        "Average pass@1 (%) over each run's benchmarks, and RGR (%) on that average.",
        "",
        _table(header, rows),
    ]
    if figures:
        parts += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    root.write_text("\n".join(parts) + "\n", "report", "report.md")
    return {"report": root.path("report", "report.md"), "figures": figures, "runs": list(runs)}


def _count(n: int) -> str:
    """1.5B, 135.0M, 6.0K: parameter counts as model names write them."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _rgr_or_dash(results: RunResults, variant: str) -> str:
    return _rgr(results.rgr[variant][AVG]) if variant in results.rgr else "–"


def _scaled(runs: dict[str, RunResults]) -> list[tuple[int, RunResults]]:
    """Runs whose teacher size is known, smallest teacher first; None if fewer than two sizes."""
    known = sorted(
        ((_teacher_scale(r), r) for r in runs.values() if _teacher_scale(r)), key=lambda p: p[0]
    )
    return known if len({scale for scale, _ in known}) >= 2 else []


def _against_scale(ax, known: list[tuple[int, RunResults]], label: str, column: str) -> None:
    """One model's accuracy (with its interval) across the sweep's teachers."""
    points = [(scale, r) for scale, r in known if column in r.pass1.get(label, {})]
    if not points:
        return
    values = [r.pass1[label][column] for _, r in points]
    error = _error(values, [r.ci[label][column] for _, r in points])
    scales = [scale for scale, _ in points]
    ax.errorbar(scales, np.array(values) * 100, yerr=error, marker="o", capsize=3,
                label=_name(label))  # fmt: skip


def figure_scale(root: RunDir, runs: dict[str, RunResults]) -> str | None:
    """Figure 3: average accuracy of the teacher and its students against the teacher's size."""
    known = _scaled(runs)
    if not known:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label in ("teacher", *VARIANTS):
        _against_scale(ax, known, label, AVG)
    for label, style in (("base", "--"), ("rl", ":")):
        values = [r.pass1[label][AVG] for _, r in known if AVG in r.pass1.get(label, {})]
        if values:  # one student for the sweep: its base and RL scores are reference lines
            ax.axhline(np.mean(values) * 100, ls=style, c="gray", label=_name(label))
    _log_ticks(ax, [scale for scale, _ in known], _count)
    ax.set_xlabel("Teacher parameters")
    ax.set_ylabel("Avg pass@1 (%)")
    ax.set_title("Accuracy against teacher scale")
    ax.legend(frameon=False, fontsize=8)
    return _save(root, fig, "figure3_teacher_scale.png")


def figure_scale_benchmarks(root: RunDir, runs: dict[str, RunResults]) -> str | None:
    """Figure 4: the teacher and the W2SR / W2SR-P students against teacher size, per benchmark."""
    known = _scaled(runs)
    if not known:
        return None
    plt = _pyplot()
    benches = sorted({b for _, r in known for b in r.benches})
    fig, axes = plt.subplots(1, len(benches), figsize=(3.2 * len(benches), 3.2), squeeze=False)
    for ax, bench in zip(axes[0], benches, strict=True):
        for label in ("teacher", "w2sr", "w2sr_p"):
            _against_scale(ax, known, label, bench)
        _log_ticks(ax, [scale for scale, _ in known], _count)
        ax.set_title(_bench(bench))
        ax.set_xlabel("Teacher parameters")
    axes[0][0].set_ylabel("Pass@1 (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 0))
    return _save(root, fig, "figure4_teacher_scale_benchmarks.png")
