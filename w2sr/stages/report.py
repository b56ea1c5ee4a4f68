"""Stage `report`: report.md and the paper's figures, from what `w2sr eval` left in a run dir.

    w2sr report RUN_DIR

For one run (a folder with eval/summary.json):
- the setup: the evaluation protocol (decoding per benchmark and model, grading policy) and
  where each model came from (a stage of the run dir, or an outside checkpoint and its identity);
- the paper-style table: pass@1 per benchmark and its macro average for the teacher, the base
  student, W2SR, W2SR-P, W2SR-N and RL (the run's GRPO student or an outside checkpoint named by
  `rl`), with RGR = (W2SR - base) / (RL - base) for each student variant, and 95% intervals from
  a bootstrap over problems (paired across models, stratified across benchmarks, so an average or
  a ratio gets the interval it deserves);
- pass@k and majority vote; per model, its no-answer, truncation and unclosed-thought rates;
- cognitive behaviors of the responses (w2sr.behaviors), teacher vs base student vs students;
- figures: the four bars of Figure 2 (teacher, student, W2SR, W2SR-P), and accuracy against
  training cost (Figure 5) when the stages recorded their costs.

For a folder whose subfolders are runs (e.g. one per teacher), each run gets its report and the
folder gets the report of many runs that `w2sr sweep` writes too (`w2sr.reporting.sweep`): a row
per cell, every model's score per run, and accuracy against teacher scale (Figures 3 and 4).

An RGR whose RL gain is zero or negative is written "undefined", never as a number.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from w2sr import layout
from w2sr.behaviors import BEHAVIORS
from w2sr.config import ConfigError, ExperimentConfig, JudgeConfig, ReportConfig, format_errors
from w2sr.judge import PROMPT_VERSION
from w2sr.reporting.figures import SCALE, figure_bars, figure_cost, figure_training
from w2sr.reporting.results import (
    behaviors,
    cost_to_match,
    costs,
    load_results,
    rl_curve,
    teacher_scale,
    training_curves,
)
from w2sr.reporting.sweep import run_rows, write_sweep_report
from w2sr.reporting.tables import (
    answer_table,
    behavior_table,
    cost_table,
    details_table,
    main_tables,
    match_sentence,
    outside_rl_cost,
    setup,
)
from w2sr.rundir import RunDir
from w2sr.tracking import log_report, results_uri


def run_report(run: RunDir) -> dict[str, Any]:
    results = load_results(run)
    settings, seed = _report_settings(run)
    spent, curve = costs(results), rl_curve(results)
    figures = [
        f
        for f in (
            figure_bars(results),
            figure_cost(results, spent, curve),
            figure_training(results, training_curves(results)),
        )
        if f
    ]
    parts = [
        f"# W2SR report: {run.uri}",
        "",
        "## Setup",
        "",
        setup(results),
        "",
        "## Results",
        "",
        main_tables(results),
        "",
        "### Answers and truncation",
        "",
        "Share of responses without a final answer (no answer), cut at the token limit "
        "(truncated) and, where recorded, whose `<think>` never closed (unclosed thought): the "
        "mean over benchmarks.",
        "",
        answer_table(results),
        "",
        "## Pass@k and majority vote (%)",
        "",
        "pass@k is the unbiased estimator from the n samples of each problem; maj@n is the "
        "majority vote over them (ties split); no answer, truncated and unclosed thought as "
        "above; tokens: mean completion length.",
        "",
        details_table(results),
        "",
        "## Cognitive behaviors",
        "",
        behavior_section(behaviors(results, settings, seed), settings.judge_used),
    ]
    if spent:
        parts += ["", "## Training cost", "", cost_table(results, spent)]
        if results.outside_rl:
            parts += ["", outside_rl_cost(results)]
        match = cost_to_match(results, spent, curve)
        if match:
            parts += ["", match_sentence(match)]
    if figures:
        parts += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    run.write_text("\n".join(parts) + "\n", *layout.REPORT_FILE)
    if uri := results_uri(_config(run)):
        sources = {label: results.source(label) for label in results.labels}
        log_report(uri, sources, results.rgr, results.rgr_ci, spent)
    return {
        "report": run.path(*layout.REPORT_FILE),
        "figures": figures,
        "pass@1": results.pass1,
        "rgr": results.rgr,
    }


def _config(run: RunDir) -> dict[str, Any]:
    """The config the run dir's latest command wrote, as written: only a few of its keys are
    read, so a run dir copied from a cluster reports where its models are absent."""
    data = yaml.safe_load(run.read_text(layout.CONFIG)) if run.exists(layout.CONFIG) else {}
    return data if isinstance(data, dict) else {}


def _report_settings(run: RunDir) -> tuple[ReportConfig, int]:
    """The `report` section and seed of the run dir's config."""
    data = _config(run)
    try:
        return ReportConfig.model_validate(data.get("report") or {}), int(data.get("seed", 0))
    except ValidationError as error:
        raise ConfigError(format_errors(error).replace("config", "report section", 1)) from None


def _match(run: RunDir) -> str:
    """`select.match` of the run's training sets."""
    return str((_config(run).get("select") or {}).get("match", "none"))


def behavior_section(found: dict[str, dict[str, Any]], judge: JudgeConfig | None = None) -> str:
    """The behavior table. Counted by phrase, the behaviors no response shows are left out:
    their patterns are English phrases, which a world of symbols (the CPU demo's) never writes,
    and a column of zeros would read as a finding. Labelled by a judge, every one is shown."""
    if judge is not None:
        text = (
            "Mean count per response (share of responses with at least one), labelled by the "
            f"judge model {judge.model} at {judge.endpoint} (prompt version {PROMPT_VERSION}), "
            "as SimpleRL-Zoo's behavior analysis does, over a seeded sample of at most "
            f"{judge.max_responses or 'all'} responses per model; replies that did not parse "
            "and failed requests are left out of the rates and counted in their own columns."
        )
        return text + "\n\n" + behavior_table(found, list(BEHAVIORS))
    shown = [b for b in BEHAVIORS if any(stats[b]["share"] for stats in found.values())]
    absent = ", ".join(b.replace("_", " ") for b in BEHAVIORS if b not in shown)
    n = sum(stats["traces"] for stats in found.values())
    if not shown:
        return (
            f"Left out: none of the {n:,d} responses and traces has any of the phrases that "
            '`w2sr/behaviors.py` looks for (English markers such as "let me check" or '
            '"wait"), so these measures do not apply to them.'
        )
    text = (
        "Mean count per response (share of responses with at least one), from the phrase "
        "patterns of `w2sr/behaviors.py`: lexical markers, to compare models on the same "
        "prompts rather than to read as absolute rates."
    )
    if absent:
        text += f" Left out, as no response has one: {absent}."
    return text + "\n\n" + behavior_table(found, shown)


def report(run_dir: str) -> dict[str, Any]:
    """Write the report of a run, or of every run in a folder of runs plus the folder's own."""
    root = RunDir(run_dir)
    if root.exists(*layout.EVAL_SUMMARY):
        return run_report(root)
    names = [name for name in root.list() if root.exists(name, *layout.EVAL_SUMMARY)]
    if not names:
        raise FileNotFoundError(
            f"no eval/summary.json in {run_dir} or its subfolders: run `w2sr eval` first"
        )
    children = {name: RunDir(f"{root.uri.rstrip('/')}/{name}") for name in names}
    for child in children.values():
        run_report(child)
    runs = {name: load_results(child) for name, child in children.items()}
    runs = dict(sorted(runs.items(), key=lambda item: teacher_scale(item[1]) or 0))
    rows = [
        row
        for name, results in runs.items()
        for row in run_rows(name, results, _match(children[name]))
    ]
    return write_sweep_report(root, rows, runs, SCALE)


def report_run(cfg: ExperimentConfig) -> dict[str, Any]:
    """The recipe's `report` stage: the report of the config's run dir."""
    return report(cfg.run_dir)
