"""The report's Markdown: tables of results, intervals, costs, behaviours and the setup."""

from __future__ import annotations

from typing import Any

from w2sr.reporting.results import AVG, RunResults, bench_name, display_name


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def interval(ci: tuple[float, float] | None) -> str:
    return "undefined" if ci is None else f"{100 * ci[0]:.1f} – {100 * ci[1]:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main_tables(results: RunResults) -> str:
    columns = [*results.benches, AVG]
    header = ["Model", *[bench_name(b) for b in results.benches], "Avg"]
    values, intervals = [], []
    for label in results.labels:
        values.append([display_name(label), *[pct(results.pass1[label].get(c)) for c in columns]])
        intervals.append(
            [display_name(label), *[_cell_interval(results.ci[label].get(c)) for c in columns]]
        )
    for variant in results.rgr:
        name = f"RGR {display_name(variant)} (%)"
        values.append([name, *[rgr_text(results.rgr[variant][c]) for c in columns]])
        intervals.append([name, *[interval(results.rgr_ci[variant][c]) for c in columns]])
    settings = results.settings
    text = [
        f"### Pass@1 (%), the mean over {settings['samples']} samples per problem",
        "",
        table(header, values),
        "",
    ]
    if results.rgr:
        text.append(
            "RGR = (W2SR − base) / (RL − base): the share of RL's gain over the base student "
            "that the student recovers; *undefined* where RL gains nothing (RL ≤ base)."
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
    ks = results.settings["pass_k"]
    samples = results.settings["samples"]
    header = ["Model", "Benchmark", *[f"pass@{k}" for k in ks], f"maj@{samples}"]
    header += ["no answer", "truncated", "tokens", "backend"]
    rows = []
    for label in results.labels:
        for bench, entry in results.summary["models"][label]["results"].items():
            rows.append(
                [
                    display_name(label),
                    bench_name(bench),
                    *[pct(entry["pass@k"].get(str(k))) for k in ks],
                    pct(entry[f"maj@{samples}"]),
                    pct(entry["no_answer"]),
                    pct(entry["truncated"]),
                    f"{entry['mean_completion_tokens']:.0f}",
                    entry["backend"].split(" ")[0],
                ]
            )
    return table(header, rows)


def behavior_table(found: dict[str, dict[str, Any]], shown: list[str]) -> str:
    header = ["Responses of", "n", *[b.replace("_", " ") for b in shown]]
    rows = [
        [
            name,
            str(stats["traces"]),
            *[f"{stats[b]['mean']:.2f} ({100 * stats[b]['share']:.0f}%)" for b in shown],
        ]
        for name, stats in found.items()
    ]
    return table(header, rows)


def cost_table(results: RunResults, spent: dict[str, dict[str, float]]) -> str:
    rl = spent.get("rl", {}).get("total")
    header = ["Model", "traces (worker-h)", "training (worker-h)", "total (worker-h)"]
    header += ["RL cost / cost", "Avg pass@1 (%)"]
    rows = [
        [
            display_name(label),
            f"{cost['generation'] / 3600:.3f}",
            f"{cost['training'] / 3600:.3f}",
            f"{cost['total'] / 3600:.3f}",
            f"{rl / cost['total']:.1f}x" if rl and cost["total"] else "–",
            pct(results.pass1.get(label, {}).get(AVG)),
        ]
        for label, cost in spent.items()
    ]
    return table(header, rows)


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
    s, models = results.settings, results.summary["models"]
    sampling = s["sampling"]
    benches = []
    for bench, info in results.summary["benchmarks"].items():
        left_out = info["decontaminated"]
        note = f", {left_out} training prompts left out" if left_out else ""
        benches.append(f"{bench_name(bench)} ({info['problems']} problems{note})")
    lines = [
        f"- Sampling: temperature {sampling['temperature']}, top-p {sampling['top_p']}, "
        f"max {sampling['max_tokens']} new tokens, {s['samples']} samples per problem; "
        f"template `{s['template']}`, grader `{s['grader']}` under the "
        f"`{s.get('grading_policy', 'strict')}` grading policy.",
        f"- Benchmarks: {', '.join(benches)}.",
    ]
    lines += [f"- {display_name(label)}: `{models[label]['spec']}`" for label in results.labels]
    lines += [
        f"- {display_name(label)}: not evaluated ({why})"
        for label, why in results.summary["skipped"].items()
    ]
    return "\n".join(lines)


def count(n: int) -> str:
    """1.5B, 135.0M, 6.0K: parameter counts as model names write them."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def rgr_or_dash(results: RunResults, variant: str) -> str:
    return rgr_text(results.rgr[variant][AVG]) if variant in results.rgr else "–"
