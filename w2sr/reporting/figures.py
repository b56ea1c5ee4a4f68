"""The report's figures: the paper's Figure 2 bars, accuracy against cost (Figure 5) and, for a
sweep, against teacher scale (Figures 3 and 4)."""

from __future__ import annotations

import io

import numpy as np

from w2sr import layout
from w2sr.layout import STUDENT_LABELS
from w2sr.reporting.results import AVG, RunResults, bench_name, display_name, teacher_scale
from w2sr.reporting.tables import count
from w2sr.rundir import RunDir

FIGURE2 = ("teacher", "base", "w2sr", "w2sr_p")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(run: RunDir, fig, name: str) -> str:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)

    run.write_bytes(buffer.getvalue(), layout.REPORT, name)
    return name


def _error(values: list[float], cis: list[tuple[float, float]]) -> np.ndarray:
    return np.array([[v - lo for v, (lo, _) in zip(values, cis, strict=True)],
                     [hi - v for v, (_, hi) in zip(values, cis, strict=True)]]) * 100  # fmt: skip


def figure_bars(results: RunResults) -> str | None:
    """Figure 2: teacher, student, W2SR and W2SR-P side by side, per benchmark and on average."""
    labels = [label for label in FIGURE2 if label in results.pass1]
    if len(labels) < 2:
        return None
    plt = pyplot()
    columns = [c for c in [*results.benches, AVG] if all(c in results.pass1[x] for x in labels)]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(columns) + 1), 3.6))
    x = np.arange(len(columns))
    for i, label in enumerate(labels):
        values = [results.pass1[label][c] for c in columns]
        error = _error(values, [results.ci[label][c] for c in columns])
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, np.array(values) * 100, width,
               yerr=error, capsize=2, label=results.name(label))  # fmt: skip
    ax.set_xticks(x, [bench_name(c) if c != AVG else "Avg" for c in columns])
    ax.set_ylabel("Pass@1 (%)")
    ax.set_title("Weak teacher, strong student: W2SR and W2SR-P")
    ax.legend(frameon=False, ncols=len(labels), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return save_figure(results.run, fig, "figure2_bars.png")


def log_ticks(ax, values: list[float], text) -> None:
    """A log x axis labelled at the data points only: readable when there are few of them."""
    ax.set_xscale("log")
    ticks: list[float] = []
    for value in sorted(set(values)):  # labels closer than 30% apart would overprint
        if not ticks or value > ticks[-1] * 1.3:
            ticks.append(value)
    ax.set_xticks(ticks, [text(v) for v in ticks])
    ax.xaxis.set_minor_formatter(pyplot().NullFormatter())


def figure_cost(
    results: RunResults, spent: dict[str, dict[str, float]], curve: list[dict[str, float]]
) -> str | None:
    """Figure 5: average accuracy against the worker-hours spent to train each model, and
    GRPO's held-out accuracy along its training when it was measured (`grpo.eval_every`)."""
    points = [label for label in spent if AVG in results.pass1.get(label, {})]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    hours = {label: spent[label]["total"] / 3600 for label in points}
    if curve:
        ax.plot(
            [p["worker_seconds"] / 3600 for p in curve],
            [p["accuracy"] * 100 for p in curve],
            "-",
            marker=".",
            c="gray",
            label="RL (GRPO) along training",
        )
    for marker, label in zip("osD^", points, strict=False):
        value = results.pass1[label][AVG]
        error = _error([value], [results.ci[label][AVG]])
        ax.errorbar(
            hours[label], value * 100, yerr=error, fmt=marker, capsize=3, label=results.name(label)
        )
    if AVG in results.pass1.get("base", {}):
        ax.axhline(results.pass1["base"][AVG] * 100, ls="--", c="gray", label="Base student")
    log_ticks(ax, list(hours.values()), lambda h: f"{h:.3g}")
    ax.set_xlabel("Training cost (worker-hours, teacher traces included)")
    ax.set_ylabel("Avg pass@1 (%)")
    ax.set_title("Accuracy against training cost")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(results.run, fig, "figure5_cost.png")


def _scaled(runs: dict[str, RunResults]) -> list[tuple[int, RunResults]]:
    """Runs whose teacher size is known, smallest teacher first; None if fewer than two sizes."""
    known = sorted(
        ((teacher_scale(r), r) for r in runs.values() if teacher_scale(r)), key=lambda p: p[0]
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
                label=display_name(label))  # fmt: skip


def figure_scale(root: RunDir, runs: dict[str, RunResults]) -> str | None:
    """Figure 3: average accuracy of the teacher and its students against the teacher's size."""
    known = _scaled(runs)
    if not known:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label in ("teacher", *STUDENT_LABELS):
        _against_scale(ax, known, label, AVG)
    for label, style in (("base", "--"), ("rl", ":")):
        found = [r for _, r in known if AVG in r.pass1.get(label, {})]
        if found:  # one student for the sweep: its base and RL scores are reference lines
            names = {r.name(label) for r in found}  # an RL reference of one kind says which
            value = np.mean([r.pass1[label][AVG] for r in found]) * 100
            ax.axhline(value, ls=style, c="gray", label=names.pop() if len(names) == 1 else "RL")
    log_ticks(ax, [scale for scale, _ in known], count)
    ax.set_xlabel("Teacher parameters")
    ax.set_ylabel("Avg pass@1 (%)")
    ax.set_title("Accuracy against teacher scale")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(root, fig, "figure3_teacher_scale.png")


def figure_scale_benchmarks(root: RunDir, runs: dict[str, RunResults]) -> str | None:
    """Figure 4: the teacher and the W2SR / W2SR-P students against teacher size, per benchmark."""
    known = _scaled(runs)
    if not known:
        return None
    plt = pyplot()
    benches = sorted({b for _, r in known for b in r.benches})
    fig, axes = plt.subplots(1, len(benches), figsize=(3.2 * len(benches), 3.2), squeeze=False)
    for ax, bench in zip(axes[0], benches, strict=True):
        for label in ("teacher", "w2sr", "w2sr_p"):
            _against_scale(ax, known, label, bench)
        log_ticks(ax, [scale for scale, _ in known], count)
        ax.set_title(bench_name(bench))
        ax.set_xlabel("Teacher parameters")
    axes[0][0].set_ylabel("Pass@1 (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 0))
    return save_figure(root, fig, "figure4_teacher_scale_benchmarks.png")
