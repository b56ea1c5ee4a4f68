"""The report's figures: the paper's Figure 2 bars, accuracy against cost (Figure 5) and, for a
sweep, against teacher scale (Figures 3 and 4)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from w2sr import layout
from w2sr.reporting.results import AVG, RunResults, bench_name, display_name
from w2sr.reporting.tables import count
from w2sr.rundir import RunDir

FIGURE2 = ("teacher", "base", "w2sr", "w2sr_p")

# File names, beside report.md (`layout.report_figure`).
BARS = "figure2_bars.png"
COST = "figure5_cost.png"
SCALE_BENCHMARKS = "figure4_teacher_scale_benchmarks.png"
# The teacher-scale figure is one figure under two names: `w2sr report` of a folder of runs
# writes the first, `w2sr sweep` the second.
SCALE = "figure3_teacher_scale.png"
SWEEP_SCALE = "sweep_teacher_scale.png"
TRAINING = "training_curves.png"
RGR_HEATMAP = "sweep_rgr.png"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(run: RunDir, fig: Any, name: str) -> str:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    run.write_bytes(buffer.getvalue(), *layout.report_figure(name))
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
    return save_figure(results.run, fig, BARS)


def log_ticks(ax: Any, values: list[float], text: Callable[[float], str]) -> None:
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
    return save_figure(results.run, fig, COST)


def figure_training(results: RunResults, curves: dict[str, list[dict[str, Any]]]) -> str | None:
    """Each trained model along its training: the students' SFT loss; GRPO's reward, held-out
    accuracy, KL to the reference and response length, when the run has GRPO's steps."""
    students = {label: c for label, c in curves.items() if label != "rl"}
    grpo = curves.get("rl") or []
    if not students and not grpo:
        return None
    plt = pyplot()
    Line = tuple[str | None, list[dict[str, Any]], str]  # legend, records, the key plotted
    sft: list[Line] = [(display_name(label), c, "loss") for label, c in students.items()]
    panels: list[tuple[str, list[Line]]] = [("SFT loss", sft)]
    if grpo:
        heldout = [
            {"step": r["step"], "accuracy": float(np.mean(list(r["heldout_accuracy"].values())))}
            for r in grpo
            if r.get("heldout_accuracy")
        ]
        panels += [
            ("GRPO reward", [("reward (rollouts)", grpo, "reward_mean"),
                             ("held-out accuracy", heldout, "accuracy")]),
            ("GRPO KL to the reference", [(None, grpo, "kl")]),
            ("GRPO response length", [(None, grpo, "response_length")]),
        ]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 0.6, 3.0), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels, strict=True):
        for name, records, key in lines:
            shown = [r for r in records if r.get(key) is not None]
            ax.plot([r["step"] for r in shown], [r[key] for r in shown], label=name,
                    marker="." if len(shown) < 20 else None)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        if any(name for name, _, _ in lines):
            ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save_figure(results.run, fig, TRAINING)


def figure_rgr(
    root: RunDir, teachers: list[str], students: list[str], matrix: list[list[float | str]]
) -> str:
    """W2SR's RGR over teacher x student as a heatmap, each cell labelled with its value."""
    plt = pyplot()
    values = np.array(
        [[v * 100 if isinstance(v, float) else np.nan for v in row] for row in matrix]
    )
    fig, ax = plt.subplots(figsize=(1.6 * len(students) + 2.4, 0.6 * len(teachers) + 1.4))
    low, high = np.nanmin(values, initial=0.0), np.nanmax(values, initial=100.0)
    image = ax.imshow(values, cmap="viridis", vmin=min(0.0, low), vmax=max(100.0, high))
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            text = f"{v * 100:.1f}%" if isinstance(v, float) else v
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                color="white" if isinstance(v, float) and v < 0.6 else "black",
                fontsize=9,
            )
    ax.set_xticks(range(len(students)), students)
    ax.set_yticks(range(len(teachers)), teachers)
    ax.set_xlabel("student")
    ax.set_ylabel("teacher")
    ax.set_title("RGR of W2SR (%)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(root, fig, RGR_HEATMAP)


@dataclass(frozen=True)
class ScalePoint:
    """A model's accuracy (and its interval, when it has one) with a teacher of `scale`
    parameters; `kind` is the teacher's (reasoner, non_reasoner), None where not known."""

    label: str
    kind: str | None
    scale: float
    value: float
    ci: tuple[float, float] | None


KIND_MARKERS = {"reasoner": "o", "non_reasoner": "s", None: "o"}
REFERENCE_STYLES = {"base": "--", "rl": ":"}


def _against_scale(ax: Any, points: list[ScalePoint], labels: list[str]) -> None:
    """One line per model and teacher kind: a model keeps its colour, a kind its marker."""
    for color, label in enumerate(labels):
        for kind, marker in KIND_MARKERS.items():
            found = [p for p in points if (p.label, p.kind) == (label, kind)]
            if not found:
                continue
            found.sort(key=lambda p: p.scale)
            values = [p.value for p in found]
            cis = [p.ci for p in found if p.ci is not None]
            error = _error(values, cis) if len(cis) == len(found) else None
            name = display_name(label)
            if kind is not None:
                name += f" ({kind.replace('_', '-')}s)"
            ax.errorbar([p.scale for p in found], np.array(values) * 100, yerr=error,
                        marker=marker, capsize=3, c=f"C{color}", label=name)  # fmt: skip


def _labels(points: list[ScalePoint]) -> list[str]:
    return list(dict.fromkeys(p.label for p in points))


def _parameters(scale: float) -> str:
    return count(round(scale))


def figure_scale(
    root: RunDir, points: list[ScalePoint], references: dict[str, tuple[str, float]], name: str
) -> str | None:
    """The paper's Figure 3: the teacher's and its students' average accuracy against the
    teacher's size, one line per teacher kind; `references` (base, rl: their name and accuracy,
    when the sweep has one student) as horizontal lines. None with fewer than two sizes."""
    if len({p.scale for p in points}) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    _against_scale(ax, points, _labels(points))
    for label, (text, value) in references.items():
        ax.axhline(value * 100, ls=REFERENCE_STYLES[label], c="gray", label=text)
    log_ticks(ax, [p.scale for p in points], _parameters)
    ax.set_xlabel("Teacher parameters")
    ax.set_ylabel("Avg pass@1 (%)")
    ax.set_title("Accuracy against teacher scale")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(root, fig, name)


def figure_scale_benchmarks(root: RunDir, panels: dict[str, list[ScalePoint]]) -> str | None:
    """Figure 4: the teacher and its students against teacher size, one panel per benchmark
    (`panels`: benchmark -> its points). None with fewer than two teacher sizes."""
    scales = {p.scale for points in panels.values() for p in points}
    if len(scales) < 2:
        return None
    plt = pyplot()
    labels = _labels([p for points in panels.values() for p in points])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (bench, points) in zip(axes[0], sorted(panels.items()), strict=True):
        _against_scale(ax, points, labels)
        log_ticks(ax, sorted(scales), _parameters)
        ax.set_title(bench_name(bench))
        ax.set_xlabel("Teacher parameters")
    axes[0][0].set_ylabel("Pass@1 (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, frameon=False, ncols=3, loc="upper center", bbox_to_anchor=(0.5, 0))
    return save_figure(root, fig, SCALE_BENCHMARKS)
