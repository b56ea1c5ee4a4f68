"""The report's Markdown: tables of results, intervals, costs, behaviors and the setup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from w2sr.reporting.results import (
    ANSWER_RATES,
    AVG,
    RunResults,
    answer_rates,
    bench_name,
    display_name,
)

# What each grading policy (w2sr.grading) counts as a response's final answer.
POLICIES = {
    "strict": "an explicit final answer only (\\boxed{}, ####, <answer>)",
    "standard": 'also what the standard evaluators read ("the answer is ...", the last LaTeX '
    "expression, else the last number)",
}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def interval(ci: tuple[float, float] | None) -> str:
    return "undefined" if ci is None else f"{100 * ci[0]:.1f} – {100 * ci[1]:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of text for a terminal: each column but the last padded to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]])
            for row in rows]  # fmt: skip


def main_tables(results: RunResults) -> str:
    columns = [*results.benches, AVG]
    header = ["Model", *[bench_name(b) for b in results.benches], "Avg"]
    values, intervals = [], []
    for label in results.labels:
        values.append([results.name(label), *[pct(results.pass1[label].get(c)) for c in columns]])
        intervals.append(
            [results.name(label), *[_cell_interval(results.ci[label].get(c)) for c in columns]]
        )
    for variant in results.rgr:
        name = f"RGR {display_name(variant)} (%)"
        values.append([name, *[rgr_text(results.rgr[variant][c]) for c in columns]])
        intervals.append([name, *[interval(results.rgr_ci[variant][c]) for c in columns]])
    settings = results.settings
    samples = {
        entry["samples"]
        for label in results.labels
        for entry in results.summary["models"][label]["results"].values()
    }
    over = (
        f"{samples.pop()} samples per problem"
        if len(samples) == 1
        else "each problem's samples (per model and benchmark: see Setup)"
    )
    text = [f"### Pass@1 (%), the mean over {over}", "", table(header, values), ""]
    if results.rgr:
        reference = (
            f"RL is the outside checkpoint `{results.source('rl')['spec']}` (see Setup)"
            if results.outside_rl
            else "RL is the run's GRPO student"
        )
        text.append(
            "RGR = (W2SR − base) / (RL − base): the share of RL's gain over the base student "
            f"that the student recovers; *undefined* where RL gains nothing (RL ≤ base). "
            f"{reference}."
        )
    else:
        missing = [display_name(x) for x in ("base", "rl") if x not in results.pass1]
        text.append(f"RGR is not reported: no result for {', '.join(missing) or 'any student'}.")
    text += [
        "",
        f"### {round(100 * settings['confidence'])}% confidence intervals",
        "",
        f"Bootstrap over problems ({settings['bootstrap_resamples']} resamples; models paired on "
        "the same problems, benchmarks resampled separately for the average). An RGR interval "
        "is *undefined* when RL's gain is not clearly positive.",
        "",
        table(header, intervals),
    ]
    return "\n".join(text)


def _cell_interval(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else interval(ci)


def rgr_text(value: float | None) -> str:
    return "undefined" if value is None else f"{100 * value:.1f}"


def details_table(results: RunResults) -> str:
    """pass@k and majority vote per model and benchmark, at the k each result has (a greedy
    model has one sample: pass@1 only)."""
    models = results.summary["models"]
    entries = [
        (label, b, e) for label in results.labels for b, e in models[label]["results"].items()
    ]
    ks = sorted({int(k) for _, _, e in entries for k in e["pass@k"]})
    unclosed = any("unclosed_thought" in e for _, _, e in entries)
    header = ["Model", "Benchmark", "n", *[f"pass@{k}" for k in ks], "maj@n"]
    header += ["no answer", "truncated", *(["unclosed thought"] * unclosed), "tokens", "backend"]
    rows = []
    for label, bench, entry in entries:
        rows.append(
            [
                results.name(label),
                bench_name(bench),
                str(entry["samples"]),
                *[pct(entry["pass@k"].get(str(k))) for k in ks],
                pct(entry[f"maj@{entry['samples']}"]),
                pct(entry["no_answer"]),
                pct(entry["truncated"]),
                *([pct(entry.get("unclosed_thought"))] * unclosed),
                f"{entry['mean_completion_tokens']:.0f}",
                entry["backend"].split(" ")[0],
            ]
        )
    return table(header, rows)


def answer_table(results: RunResults) -> str:
    """Per model, how often a response gave no final answer, ran into the token limit, or never
    closed its thought: the mean over benchmarks, beside the average pass@1."""
    rates = answer_rates(results)
    shown = [r for r in ANSWER_RATES if any(r in found for found in rates.values())]
    header = ["Model", *[r.replace("_", " ") + " (%)" for r in shown], "Avg pass@1 (%)"]
    rows = [
        [
            results.name(label),
            *[pct(rates[label].get(r)) for r in shown],
            pct(results.pass1[label].get(AVG)),
        ]
        for label in results.labels
    ]
    return table(header, rows)


def behavior_table(found: dict[str, dict[str, Any]], shown: list[str]) -> str:
    """Mean count (share with one) per behavior; a judge's table adds how many responses it
    labelled and how many of its replies did not parse or failed ("–": none parsed)."""
    judged = any("judged" in stats for stats in found.values())
    header = ["Responses of", "n", *[b.replace("_", " ") for b in shown]]
    header += ["judged", "parse failures", "errors"] if judged else []

    def cell(stats: dict[str, Any]) -> str:
        if stats["mean"] is None:
            return "–"
        return f"{stats['mean']:.2f} ({100 * stats['share']:.0f}%)"

    rows = []
    for name, stats in found.items():
        row = [name, str(stats["traces"]), *[cell(stats[b]) for b in shown]]
        if judged:
            row += [str(stats.get(key, 0)) for key in ("judged", "parse_failures", "errors")]
        rows.append(row)
    return table(header, rows)


def cost_table(results: RunResults, spent: dict[str, dict[str, float]]) -> str:
    """Worker-hours per trained model, and how many times its cost RL's was (when RL was
    trained here and recorded its cost)."""
    rl = spent.get("rl", {}).get("total")
    header = ["Model", "traces (worker-h)", "training (worker-h)", "total (worker-h)"]
    header += [*(["RL cost / cost"] if rl else []), "Avg pass@1 (%)"]
    rows = []
    for label, cost in spent.items():
        ratio = f"{rl / cost['total']:.1f}x" if rl and cost["total"] else "–"
        rows.append(
            [
                results.name(label),
                f"{cost['generation'] / 3600:.3f}",
                f"{cost['training'] / 3600:.3f}",
                f"{cost['total'] / 3600:.3f}",
                *([ratio] if rl else []),
                pct(results.pass1.get(label, {}).get(AVG)),
            ]
        )
    return table(header, rows)


def outside_rl_cost(results: RunResults) -> str:
    return (
        f"{results.name('rl')} (`{results.source('rl')['spec']}`) was trained elsewhere, so "
        "its training cost is unknown here: no RL cost ratio and no cost for RL to match a "
        "student."
    )


def match_sentence(match: dict[str, Any]) -> str:
    """GRPO's cost to reach a W2SR student's accuracy, from its curve along training."""
    name, target = display_name(match["label"]), match["target"]
    own = f"{name} ({pct(target)}%, {match['cost'] / 3600:.3f} worker-h)"
    best, reached = match["best"], match["reached"]
    if reached is None:
        return (
            f"RL (GRPO) did not reach {own} in its {match['steps']} steps: its best held-out "
            f"accuracy along training was {pct(best['accuracy'])}% (step {best['step']}, "
            f"{best['worker_seconds'] / 3600:.3f} worker-h)."
        )
    return (
        f"RL (GRPO) first reached the accuracy of {own} at step {reached['step']} "
        f"({pct(reached['accuracy'])}% held out), after {reached['worker_seconds'] / 3600:.3f} "
        f"worker-h: **{match['ratio']:.1f}x** {name}'s cost. Its held-out accuracy along "
        "training is measured every `grpo.eval_every` steps by its rollout engines, one answer "
        "per problem at the evaluation's sampling; the cost includes those measurements."
    )


def setup(results: RunResults) -> str:
    s = results.settings
    benches = []
    for bench, info in results.summary["benchmarks"].items():
        left_out = info["decontaminated"]
        note = f", {left_out} training prompts left out" if left_out else ""
        benches.append(f"{bench_name(bench)} ({info['problems']} problems{note})")
    protocol = s.get("protocol")
    policy = s.get("grading_policy", "strict")
    lines = [
        f"- Protocol: `{protocol}` (the defaults of the `eval` keys; keys the config sets win)."
        if protocol
        else "- Protocol: none named; the `eval` section's settings.",
        f"- Grading: grader `{s['grader']}` under the `{policy}` grading policy in evaluation: "
        f"{POLICIES.get(policy, 'see w2sr.grading')}. Template `{s['template']}`.",
        f"- Benchmarks: {', '.join(benches)}.",
    ]
    lines += [
        f"- {display_name(label)}: not evaluated ({why})"
        for label, why in results.summary["skipped"].items()
    ]
    return "\n".join(
        [
            *lines,
            "",
            "### Evaluation protocol",
            "",
            "Decoding per benchmark and model; pass@k from the samples of each problem.",
            "",
            protocol_table(results),
            "",
            "### Models",
            "",
            models_table(results),
        ]
    )


def protocol_table(results: RunResults) -> str:
    """One row per benchmark and decoding setting, with the models decoded so."""
    header = ["Benchmark", "Models", "Decoding", "Samples", "Temperature", "Top-p"]
    header += ["Max tokens", "pass@k"]
    rows = []
    for bench in results.benches:
        groups: dict[tuple, list[str]] = {}
        for label in results.labels:
            if bench not in results.summary["models"][label]["results"]:
                continue
            found = results.setting(label, bench)
            sampling = found["sampling"]
            key = (
                "greedy" if found["greedy"] else "sampled",
                str(found["samples"]),
                f"{sampling['temperature']:g}",
                f"{sampling['top_p']:g}",
                str(sampling["max_tokens"]),
                ", ".join(map(str, found["ks"])),
            )
            groups.setdefault(key, []).append(results.name(label))
        rows += [[bench_name(bench), ", ".join(names), *key] for key, names in groups.items()]
    return table(header, rows)


def models_table(results: RunResults) -> str:
    """Where each model came from: a stage of this run dir, or a checkpoint named in the
    config, known by the revision or content digest its results were cached under."""
    header = ["Model", "Source", "Stage folder or spec", "Fingerprint or identity", "Parameters"]
    rows = []
    for label in results.labels:
        model, source = results.summary["models"][label], results.source(label)
        parameters = model.get("parameters")
        if source["kind"] == "trained":
            where = source["stage"] or model["spec"]
            row = ["trained in this run dir", f"`{where}`", f"`{source['fingerprint']}`"]
        else:
            row = ["outside checkpoint", f"`{source['spec']}`", _identity(source)]
        rows.append([results.name(label), *row, count(parameters) if parameters else "–"])
    return table(header, rows)


def _identity(source: dict[str, Any]) -> str:
    """An outside model's identity: its resolved revision or content digest."""
    if source["identity"] is None:
        return "not recorded"
    if source["identity"] == source["spec"]:
        return "name only (revision not resolved)"
    return f"`{source['identity']}`"


def count(n: int) -> str:
    """1.5B, 135.0M, 6.0K: parameter counts as model names write them."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def rgr_or_dash(results: RunResults, variant: str) -> str:
    return rgr_text(results.rgr[variant][AVG]) if variant in results.rgr else "–"
