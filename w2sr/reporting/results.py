"""The numbers of a run's report: pass@1 with paired-bootstrap intervals, RGR, costs and
behaviors, from what `w2sr eval` left in the run dir.

The RL reference is either the run's own GRPO student or a published checkpoint named by the
config's `rl` (an outside model): RGR reads its results either way; costs and GRPO's curve exist
only for the former. Summaries written before evaluation recorded each model's source and
setting are read too."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from w2sr import layout, metrics
from w2sr.behaviors import summarize_behaviors
from w2sr.config import ReportConfig
from w2sr.evaluation.results import problem_matrix
from w2sr.judge import judge_behaviors
from w2sr.layout import DISPLAY_NAMES, STUDENT_LABELS
from w2sr.rundir import DONE, METRICS, RunDir
from w2sr.schemas import TOO_LONG

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


AVG = "avg"  # the macro average over benchmarks, a column beside them
OUTSIDE_RL = "RL (outside)"


def display_name(label: str) -> str:
    return DISPLAY_NAMES.get(label, label)


def bench_name(name: str) -> str:
    return BENCH_NAMES.get(name, name)


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

    def source(self, label: str) -> dict[str, Any]:
        """Where a model came from: `{"kind": "trained", "stage", "fingerprint"}` or `{"kind":
        "outside", "spec", "identity"}`; from an older summary, what its done record says (only
        a model trained in the run dir has one)."""
        model = self.summary["models"].get(label) or {}
        if "source" in model:
            return model["source"]
        done = model.get("done") or {}
        if "fingerprint" in done:
            return {"kind": "trained", "stage": None, "fingerprint": done["fingerprint"]}
        return {"kind": "outside", "spec": model.get("spec"), "identity": None}

    @property
    def outside_rl(self) -> bool:
        """Whether the RL reference is a published checkpoint, not trained in this run dir."""
        return "rl" in self.summary["models"] and self.source("rl")["kind"] == "outside"

    def name(self, label: str) -> str:
        """The display name, which says that an outside RL reference is not our GRPO run."""
        return OUTSIDE_RL if label == "rl" and self.outside_rl else display_name(label)

    def setting(self, label: str, bench: str) -> dict[str, Any]:
        """How `label` was evaluated on `bench`: samples, sampling, greedy, and the k of the
        pass@k it has (an older summary's result: the section-level setting)."""
        entry = self.summary["models"][label]["results"][bench]
        s = self.settings
        setting = entry.get("setting") or {
            "samples": entry.get("samples", s["samples"]),
            "sampling": s["sampling"],
            "greedy": False,
        }
        return {**setting, "ks": sorted(int(k) for k in entry["pass@k"])}


def load_results(run: RunDir, summary: dict[str, Any] | None = None) -> RunResults:
    """A run's results from its eval/summary.json, or from `summary` (a sweep's group), whose
    result files are in `run`."""
    summary = summary or run.read_json(*layout.EVAL_SUMMARY)
    models = summary["models"]
    order = [label for label in DISPLAY_NAMES if label in models]
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
    for variant in [v for v in STUDENT_LABELS if v in complete]:
        student = complete.index(variant)
        results.rgr[variant], results.rgr_ci[variant] = {}, {}
        columns = [(b, means[:, :, i]) for i, b in enumerate(results.benches)]
        for column, draws in [*columns, (AVG, averages)]:
            point = {label: results.pass1[label][column] for label in ("base", variant, "rl")}
            results.rgr[variant][column] = metrics.rgr(point["base"], point[variant], point["rl"])
            results.rgr_ci[variant][column] = metrics.rgr_interval(
                draws[:, base], draws[:, student], draws[:, rl], confidence
            )


def costs(results: RunResults) -> dict[str, dict[str, float]]:
    """Worker-seconds spent to obtain each trained model: the teacher's traces (shared by the
    three W2SR variants) plus its SFT; RL's training (its rollouts included), when RL was
    trained here."""
    run, models = results.run, results.summary["models"]
    folder = results.summary.get("traces")
    traces = run.read_json(folder, DONE) if folder and run.exists(folder, DONE) else {}
    out = {}
    for label in [*STUDENT_LABELS, *(() if results.outside_rl else ("rl",))]:
        done = (models.get(label) or {}).get("done") or {}
        if "worker_seconds" not in done:
            continue
        generation = traces.get("worker_seconds", 0.0) if label in STUDENT_LABELS else 0.0
        out[label] = {
            "generation": generation,
            "training": done["worker_seconds"],
            "total": generation + done["worker_seconds"],
        }
    return out


def rl_curve(results: RunResults) -> list[dict[str, float]]:
    """GRPO's held-out accuracy along training (`grpo.eval_every`: the average over the eval
    benchmarks, one answer each) against the worker-seconds spent by then; a step redone after
    a resume counts once, as last recorded. Empty for an outside RL reference."""
    if results.outside_rl:
        return []
    done = (results.summary["models"].get("rl") or {}).get("done") or {}
    folder = layout.rl(done["fingerprint"]) if "fingerprint" in done else None
    if folder is None or not results.run.exists(folder, METRICS):
        return []
    records = [json.loads(line) for line in results.run.read_text(folder, METRICS).splitlines()]
    measured = {r["step"]: r for r in records if r.get("heldout_accuracy")}
    return [
        {
            "step": step,
            "worker_seconds": r["worker_seconds"],
            "accuracy": float(np.mean(list(r["heldout_accuracy"].values()))),
        }
        for step, r in sorted(measured.items())
    ]


def training_curves(results: RunResults) -> dict[str, list[dict[str, Any]]]:
    """Each model trained in the run dir, by label, with its step records (a step redone after
    a resume as last recorded)."""
    curves = {}
    for label in [*STUDENT_LABELS, "rl"]:
        if label not in results.summary["models"]:
            continue
        folder = results.source(label).get("stage")
        if not folder or not results.run.exists(folder, METRICS):
            continue
        lines = results.run.read_text(folder, METRICS).splitlines()
        steps = {r["step"]: r for r in map(json.loads, lines)}
        curves[label] = [steps[step] for step in sorted(steps)]
    return curves


def cost_to_match(
    results: RunResults,
    spent: dict[str, dict[str, float]],
    curve: list[dict[str, float]],
    label: str = "w2sr_p",
) -> dict[str, Any] | None:
    """What GRPO spent to first reach `label`'s average pass@1 along its curve (`rl_curve`),
    against what `label` cost (the paper's "W2SR-P is 25x cheaper than GRPO"); None without
    the curve."""
    target = results.pass1.get(label, {}).get(AVG)
    if not curve or target is None or label not in spent:
        return None
    reached = next((point for point in curve if point["accuracy"] >= target), None)
    best = max(curve, key=lambda point: point["accuracy"])
    return {
        "label": label,
        "target": target,
        "cost": spent[label]["total"],
        "reached": reached,
        "best": best,
        "steps": curve[-1]["step"],
        "ratio": reached["worker_seconds"] / spent[label]["total"] if reached else None,
    }


ANSWER_RATES = ("no_answer", "truncated", "unclosed_thought")


def answer_rates(results: RunResults) -> dict[str, dict[str, float]]:
    """Per model, the mean over its benchmarks of each answer rate its results have: responses
    without a final answer, cut at the token limit, and with a `<think>` never closed."""
    out = {}
    for label in results.labels:
        entries = list(results.summary["models"][label]["results"].values())
        out[label] = {
            rate: float(np.mean([e[rate] for e in entries]))
            for rate in ANSWER_RATES
            if entries and all(rate in e for e in entries)
        }
    return out


def behaviors(
    results: RunResults, settings: ReportConfig | None = None, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Behavior counts of every model's responses on the benchmarks (the same prompts for all),
    and of the teacher's training traces when the run generated them: phrase patterns, or a
    judge model's labels of a seeded sample (`report.behaviors: judge`)."""

    def measure(texts: list[str]) -> dict[str, Any]:
        if settings is not None and settings.judge is not None and settings.behaviors == "judge":
            return judge_behaviors(texts, settings.judge, results.run, seed)
        return summarize_behaviors(texts)

    out = {}
    models = results.summary["models"]
    for label in results.labels:
        responses = []
        for entry in models[label]["results"].values():
            table = results.run.read_parquet(*entry["file"].split("/"))
            table = table.filter(pc.not_equal(table["finish_reason"], TOO_LONG))
            responses += table.column("response").to_pylist()
        out[results.name(label)] = {"traces": len(responses), **measure(responses)}
    folder = results.summary.get("traces")
    traces = layout.read_traces(results.run, folder).column("trace").to_pylist() if folder else []
    if traces:
        out["Teacher (training traces)"] = {"traces": len(traces), **measure(traces)}
    return out


def teacher_scale(results: RunResults) -> int | None:
    return results.summary["models"].get("teacher", {}).get("parameters")
