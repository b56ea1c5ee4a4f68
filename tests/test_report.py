"""The report of a small hand-built run (and sweep) whose numbers are known in advance.

Result files are written where `w2sr eval` caches them, so `evaluate` only summarizes them (no
engine starts) and the report reads exactly what a real run leaves behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import matplotlib.image
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from w2sr import lineage
from w2sr.config import ExperimentConfig, validate
from w2sr.evaluation.problems import load_problems
from w2sr.evaluation.results import plan_tasks, write_result
from w2sr.identity import content_digest
from w2sr.lineage import Lineage
from w2sr.registry import model_table
from w2sr.reporting.results import load_results
from w2sr.rundir import RunDir
from w2sr.stages.evaluate import evaluate
from w2sr.stages.report import report
from w2sr.sweep.config import SweepConfig
from w2sr.sweep.plan import plan
from w2sr.sweep.report import CellRow, cell_rows, group_name, write_report

PROBLEMS = 10
SAMPLES = 4
# Problems solved (all samples right) per model and benchmark: the first N of the 10.
SOLVED = {
    "teacher": {"amc23": 3, "offline": 3},
    "base": {"amc23": 2, "offline": 4},
    "w2sr": {"amc23": 5, "offline": 5},
    "w2sr_p": {"amc23": 6, "offline": 4},
    "w2sr_n": {"amc23": 5, "offline": 3},
    "rl": {"amc23": 6, "offline": 4},  # RL gains nothing on offline: RGR undefined there
}
RESPONSES = {  # behavior markers: the students picked up the teacher's "wait" and checking
    "teacher": "First, we add. Wait, let me check.",
    "base": "The sum is below.",
    "w2sr": "First, we add. Wait, let me check.",
}
# How a model's wrong responses end where they do not give a wrong answer: cut at the token
# limit without one (base: 8 of 10 on AMC23, 6 of 10 on offline), or also inside a thought never
# closed (RL: 4 and 6 of 10).
CUT = {"base": "The sum is", "rl": "<think>Wait, the sum is"}
HOURS = {"traces": 1, "all": 2, "correct": 1, "incorrect": 1, "rl": 50}
VARIANT_OF = {"w2sr": "all", "w2sr_p": "correct", "w2sr_n": "incorrect", "rl": "rl"}
# GRPO's held-out accuracy along training (grpo.eval_every): (step, worker-hours, per benchmark);
# step 20 is a resumed attempt's redo of a step a killed one had recorded at 0.1 lower.
CURVE = [
    (10, 10, {"amc23": 0.3, "offline": 0.2}),
    (20, 21, {"amc23": 0.5, "offline": 0.4}),
    (20, 20, {"amc23": 0.6, "offline": 0.4}),
    (40, 50, {"amc23": 0.6, "offline": 0.4}),
]


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def done(run: RunDir, hours: float, artifact: lineage.Artifact) -> None:
    facts = {"wall_seconds": 1.0, "worker_seconds": hours * 3600}
    run.mark_done(artifact.folder, artifact.fingerprint, **facts)


def build_run(
    run_dir: Path,
    teacher_parameters: int,
    labels=tuple(SOLVED),
    rl: str | None = None,
    evaluation: dict | None = None,
    amc23: dict | None = None,
) -> str:
    """A run whose teacher has a known size, with traces, students, RL (GRPO's, or the outside
    checkpoint `rl`) and their results; the teacher and the benchmark file live beside it.
    `evaluation` and `amc23` add keys to the eval section and to its AMC23 entry."""
    inputs = run_dir.parent / f"{run_dir.name}-inputs"
    teacher = inputs / "teacher"
    teacher.mkdir(parents=True)
    save_file({"weight": torch.zeros(teacher_parameters)}, teacher / "model.safetensors")
    lines = [json.dumps({"question": f"Q{i}?", "answer": str(i)}) + "\n" for i in range(PROBLEMS)]
    bench = inputs / "amc.jsonl"
    bench.write_text("".join(lines))
    run = RunDir(str(run_dir))
    amc = {"name": "amc23", "path": str(bench), **(amc23 or {})}
    benchmarks = [amc, {"name": "offline", "limit": PROBLEMS}]
    section = {"benchmarks": benchmarks, "samples": SAMPLES, "bootstrap_resamples": 500}
    cfg = validate(
        {
            "run_dir": run.uri,
            "teacher": str(teacher),
            "student": "org/base-student",
            "eval": {**section, **(evaluation or {})},
            "grpo": {} if "rl" in labels and rl is None else None,
            "rl": rl,
        }
    )
    traces = Lineage(cfg).traces
    done(run, HOURS["traces"], traces)
    rows = [{"trace": "Wait, let me verify. Case 1: x. \\boxed{1}"}] * 3
    run.write_parquet(pa.Table.from_pylist(rows), traces.folder, "shard-00000.parquet")
    trained = Lineage(cfg).trained
    for label in [label for label in trained if label in labels]:
        run.write_text("{}", trained[label].folder, "model", "config.json")
        done(run, HOURS[VARIANT_OF[label]], trained[label])
    if "rl" in trained and "rl" in labels:
        records = [
            {"step": step, "worker_seconds": hours * 3600, "heldout_accuracy": accuracy}
            for step, hours, accuracy in CURVE
        ]
        records.insert(1, {"step": 15, "worker_seconds": 15 * 3600})  # a step not measured
        text = "".join(json.dumps(r) + "\n" for r in records)
        run.write_text(text, trained["rl"].folder, "metrics.jsonl")
    write_summary(cfg, run, labels)
    return run.uri


def write_summary(cfg: ExperimentConfig, run: RunDir, labels: tuple[str, ...]) -> None:
    """Each model's result files where `w2sr eval` caches them, at the decoding its setting
    gives; `evaluate` then only summarizes them (no engine starts) into eval/summary.json."""
    models, _ = model_table(cfg)
    tasks, _ = plan_tasks(cfg, labels=tuple(label for label in labels if label in models))
    problems = load_problems(cfg, run)
    for task in tasks:
        rows = problems[task.bench.name].rows
        found = result_rows(task.model.label, task.bench.name, rows, task.setting.samples)
        write_result(cfg, run, task, problems[task.bench.name], found, "offline")
    evaluate(cfg)


def result_rows(label: str, bench: str, problems: list[dict], samples: int) -> list[dict]:
    """The first SOLVED[label][bench] problems right in every sample, the rest wrong: a wrong
    answer, or (CUT) no answer at the token limit."""
    rows = []
    for i, problem in enumerate(problems):
        right = i < SOLVED[label][bench]
        cut = not right and label in CUT
        answer = None if cut else problem["answer"] if right else "x"
        response = CUT[label] if cut else f"{RESPONSES.get(label, '')} \\boxed{{{answer}}}"
        for k in range(samples):
            rows.append(
                {
                    "model": label,
                    "benchmark": bench,
                    **problem,
                    "sample_index": k,
                    "seed": k,
                    "response": response,
                    "extracted_answer": answer,
                    "correct": right,
                    "prompt_tokens": 20,
                    "completion_tokens": 30,
                    "finish_reason": "length" if cut else "stop",
                }
            )
    return rows


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    run_dir = build_run(tmp_path_factory.mktemp("report") / "run", teacher_parameters=1500)
    result = report(run_dir)
    return run_dir, result, Path(result["report"]).read_text()


def row(text: str, name: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_table_has_pass_at_1_per_benchmark_and_average(reported):
    text = reported[2].split("## Results")[1]
    assert "| Model | AMC23 | Offline | Avg |" in text
    assert row(text, "Teacher") == ["30.0", "30.0", "30.0"]
    assert row(text, "Base student") == ["20.0", "40.0", "30.0"]
    assert row(text, "W2SR") == ["50.0", "50.0", "50.0"]
    assert row(text, "W2SR-P") == ["60.0", "40.0", "50.0"]
    assert row(text, "RL (GRPO)") == ["60.0", "40.0", "50.0"]


def test_rgr_per_benchmark_and_average_is_undefined_where_rl_gains_nothing(reported):
    _, result, text = reported
    assert row(text, "RGR W2SR (%)") == ["75.0", "undefined", "100.0"]
    assert row(text, "RGR W2SR-P (%)") == ["100.0", "undefined", "100.0"]
    assert row(text, "RGR W2SR-N (%)") == ["75.0", "undefined", "50.0"]
    assert result["rgr"]["w2sr"] == {
        "amc23": pytest.approx(0.75),
        "offline": None,
        "avg": pytest.approx(1.0),
    }


def test_confidence_intervals_bracket_the_estimates(reported):
    _, _, text = reported
    intervals = text.split("confidence intervals")[1]
    low, high = map(float, re.findall(r"[\d.]+", row(intervals, "W2SR")[0]))
    assert low < 50.0 < high
    assert row(intervals, "Teacher")[2] != "–"  # the average has its interval
    assert row(intervals, "RGR W2SR (%)")[1] == "undefined"


def test_costs_behaviors_and_details_are_reported(reported):
    _, _, text = reported
    costs = text.split("## Training cost")[1]
    assert row(costs, "W2SR") == ["1.000", "2.000", "3.000", "16.7x", "50.0"]
    assert row(costs, "W2SR-P")[3] == "25.0x"  # the paper's headline: W2SR-P 25x cheaper than RL
    # RL's curve reaches W2SR-P's 50% at step 20 (as redone), after 20 worker-h: 10x W2SR-P's 2
    assert (
        "RL (GRPO) first reached the accuracy of W2SR-P (50.0%, 2.000 worker-h) at step 20 "
        "(50.0% held out), after 20.000 worker-h: **10.0x** W2SR-P's cost." in costs
    )
    behaviors = text.split("## Cognitive behaviors")[1]
    assert row(behaviors, "Base student")[1:3] == ["0.00 (0%)", "0.00 (0%)"]
    assert row(behaviors, "W2SR")[1:3] == ["1.00 (100%)", "1.00 (100%)"]
    assert row(behaviors, "Teacher (training traces)") == [
        "3",
        "1.00 (100%)",
        "1.00 (100%)",
        "0.00 (0%)",
        "1.00 (100%)",
    ]
    details = text.split("## Pass@k and majority vote")[1]
    assert "| W2SR | AMC23 | 4 | 50.0 | 50.0 | 50.0 | 50.0 |" in details


def test_figures_are_rendered_and_linked(reported):
    run_dir, result, text = reported
    assert result["figures"] == ["figure2_bars.png", "figure5_cost.png", "training_curves.png"]
    for name in result["figures"]:
        image = matplotlib.image.imread(Path(run_dir, "report", name))
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert f"![{name}]({name})" in text


def test_without_rl_there_is_no_rgr_and_no_rl_cost(tmp_path):
    labels = ("teacher", "base", "w2sr", "w2sr_p")
    result = report(build_run(tmp_path / "run", teacher_parameters=100, labels=labels))
    text = Path(result["report"]).read_text()
    assert "RGR is not reported: no result for RL (GRPO)" in text
    assert "RGR W2SR" not in text and "undefined" not in text.split("###")[1]
    assert "RL (GRPO): not evaluated (no `grpo` section or `rl` reference in the config)" in text


def test_a_sweep_of_teachers_plots_accuracy_against_teacher_scale(tmp_path):
    build_run(tmp_path / "sweep" / "small", teacher_parameters=1500)
    build_run(tmp_path / "sweep" / "large", teacher_parameters=6000)
    result = report(str(tmp_path / "sweep"))
    assert result["figures"] == [
        "sweep_rgr.png",
        "figure3_teacher_scale.png",
        "figure4_teacher_scale_benchmarks.png",
    ]
    for name in result["figures"]:
        assert matplotlib.image.imread(tmp_path / "sweep" / "report" / name).shape[0] > 200
    text = Path(result["report"]).read_text()
    assert "| [large](large/report/report.md) |" in text and "| 6.0K |" in text
    for run in ("small", "large"):
        assert (tmp_path / "sweep" / run / "report" / "report.md").exists()
    # the report `w2sr sweep` writes: a row per cell, each run's folder naming its teacher
    cells = section(text, "## Cells")
    assert row(cells, "large") == ["–", "6.0K", "org/base-student", "W2SR", "0", "50.0",
                                   row(cells, "small")[6], "GRPO", "100.0",
                                   row(cells, "small")[9], "3.000"]  # fmt: skip
    assert row(section(text, "## RGR of W2SR over teacher x student (%), mean over seeds"),
               "small") == ["100.0"]  # fmt: skip


def test_a_folder_without_results_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="w2sr eval"):
        report(str(tmp_path))


def test_behaviors_that_no_response_shows_are_left_out_with_the_reason():
    from w2sr.behaviors import summarize_behaviors
    from w2sr.stages.report import behavior_section

    symbols = {"Teacher": {"traces": 2, **summarize_behaviors(["F s1 = s2 ; #### s2"] * 2)}}
    text = behavior_section(symbols)
    assert text.startswith("Left out: none of the 2 responses") and "|" not in text
    mixed = {**symbols, "W2SR": {"traces": 1, **summarize_behaviors(["wait, let me check"])}}
    text = behavior_section(mixed)
    assert "Left out, as no response has one: subgoal setting, enumeration." in text
    header = text.split("\n\n")[1].splitlines()[0]
    assert "verification" in header and "backtracking" in header and "enumeration" not in header


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A run whose RL reference is a published checkpoint, evaluated under SimpleRL-Zoo's
    protocol (the base student greedy), with 8 samples on AMC23 and 4 on offline."""
    root = tmp_path_factory.mktemp("outside")
    checkpoint = root / "simplerl-zoo-checkpoint"
    checkpoint.mkdir()
    save_file({"weight": torch.zeros(300)}, checkpoint / "model.safetensors")
    (checkpoint / "config.json").write_text("{}")
    run_dir = build_run(
        root / "run",
        teacher_parameters=1500,
        rl=str(checkpoint),
        evaluation={"protocol": "simplerl_zoo", "samples": SAMPLES},
        amc23={"samples": 8},
    )
    result = report(run_dir)
    return Path(run_dir), checkpoint, result, Path(result["report"]).read_text()


def section(text: str, heading: str) -> str:
    """A report's section, up to the next heading of its level or above."""
    level = heading.split(" ")[0]
    body = text.split(f"{heading}\n")[1]
    ends = [i for i in (body.find(f"\n{'#' * n} ") for n in range(1, len(level) + 1)) if i >= 0]
    return body[: min(ends)] if ends else body


def test_an_outside_rl_reference_gives_rgr_with_its_intervals(outside):
    _, checkpoint, result, text = outside
    results = section(text, "## Results")
    assert row(results, "RL (outside)") == ["60.0", "40.0", "50.0"]
    assert "RL (GRPO)" not in text
    assert row(results, "RGR W2SR (%)") == ["75.0", "undefined", "100.0"]
    assert result["rgr"]["w2sr_p"]["avg"] == pytest.approx(1.0)
    assert f"RL is the outside checkpoint `{checkpoint}`" in results
    intervals = results.split("confidence intervals")[1]
    low, high = map(float, re.findall(r"[\d.]+", row(intervals, "RGR W2SR (%)")[0]))
    assert low < 75.0 < high
    assert row(intervals, "RGR W2SR (%)")[1] == "undefined"


def test_each_model_says_where_it_came_from(outside):
    run_dir, checkpoint, _, text = outside
    models = section(text, "### Models")
    assert row(models, "RL (outside)") == [
        "outside checkpoint",
        f"`{checkpoint}`",
        f"`{content_digest(checkpoint)}`",
        "300",
    ]
    assert row(models, "Teacher")[:3] == [
        "outside checkpoint",
        f"`{run_dir.parent / 'run-inputs' / 'teacher'}`",
        f"`{content_digest(run_dir.parent / 'run-inputs' / 'teacher')}`",
    ]
    assert row(models, "Base student")[:3] == [
        "outside checkpoint",
        "`org/base-student`",
        "name only (revision not resolved)",
    ]
    for name in ("W2SR", "W2SR-P", "W2SR-N"):  # the stage folder and its done record agree
        source, stage, fingerprint, _ = row(models, name)
        assert source == "trained in this run dir"
        recorded = json.loads((run_dir / stage.strip("`") / "_DONE.json").read_text())
        assert fingerprint == f"`{recorded['fingerprint']}`"


def test_an_outside_rl_reference_has_no_cost_and_no_curve(outside):
    _, checkpoint, result, text = outside
    costs = section(text, "## Training cost")
    assert "| Model | traces (worker-h) | training (worker-h) | total (worker-h) | Avg" in costs
    assert "RL cost / cost" not in costs
    assert row(costs, "W2SR") == ["1.000", "2.000", "3.000", "50.0"]
    assert "| RL (outside) |" not in costs
    assert f"RL (outside) (`{checkpoint}`) was trained elsewhere" in costs
    assert "first reached" not in text and "did not reach" not in text
    assert result["figures"] == ["figure2_bars.png", "figure5_cost.png"]


def test_the_setup_states_the_protocol_and_the_greedy_base(outside):
    _, _, _, text = outside
    setup = section(text, "## Setup")
    assert "- Protocol: `simplerl_zoo`" in setup
    assert "under the `standard` grading policy in evaluation" in setup  # the protocol's
    sampled = "Teacher, W2SR, W2SR-P, W2SR-N, RL (outside)"
    for line in (
        f"| AMC23 | {sampled} | sampled | 8 | 1 | 0.95 | 1024 | 1, 2, 4, 8 |",
        "| AMC23 | Base student | greedy | 1 | 0 | 1 | 1024 | 1 |",
        f"| Offline | {sampled} | sampled | 4 | 1 | 0.95 | 1024 | 1, 2, 4 |",
        "| Offline | Base student | greedy | 1 | 0 | 1 | 1024 | 1 |",
    ):
        assert line in setup, line
    assert "### Pass@1 (%), the mean over each problem's samples" in text
    details = section(text, "## Pass@k and majority vote (%)")
    assert row(details, "Base student")[:4] == ["AMC23", "1", "20.0", "–"]  # pass@1 only


def test_answer_and_truncation_rates_per_model(outside):
    _, _, _, text = outside
    rates = section(text, "### Answers and truncation")
    header = "| Model | no answer (%) | truncated (%) | unclosed thought (%) | Avg pass@1 (%) |"
    assert header in rates
    assert row(rates, "Base student") == ["70.0", "70.0", "0.0", "30.0"]
    assert row(rates, "RL (outside)") == ["50.0", "50.0", "50.0", "50.0"]
    assert row(rates, "W2SR") == ["0.0", "0.0", "0.0", "50.0"]


def test_a_summary_from_before_sources_and_settings_is_reported(tmp_path):
    """A run dir evaluated before results recorded their source, setting and unclosed
    thoughts: the section-level setting, and the source that the done records tell."""
    run_dir = Path(build_run(tmp_path / "run", teacher_parameters=100))
    path = run_dir / "eval" / "summary.json"
    summary = json.loads(path.read_text())
    for key in ("protocol", "greedy", "benchmarks"):
        del summary["settings"][key]
    for model in summary["models"].values():
        del model["source"]
        for entry in model["results"].values():
            del entry["setting"], entry["unclosed_thought"]
    path.write_text(json.dumps(summary))
    text = Path(report(str(run_dir))["report"]).read_text()
    models = section(text, "### Models")
    assert row(models, "Teacher")[:3] == [
        "outside checkpoint",
        f"`{summary['models']['teacher']['spec']}`",
        "not recorded",
    ]
    rl = summary["models"]["rl"]
    assert row(models, "RL (GRPO)")[:3] == [
        "trained in this run dir",
        f"`{rl['spec']}`",
        f"`{rl['done']['fingerprint']}`",
    ]
    assert "- Protocol: none named" in text
    sampled = "Teacher, Base student, W2SR, W2SR-P, W2SR-N, RL (GRPO)"
    assert f"| Offline | {sampled} | sampled | 4 | 0.6 | 0.95 | 1024 | 1, 2, 4 |" in text
    rates = section(text, "### Answers and truncation")
    assert "| Model | no answer (%) | truncated (%) | Avg pass@1 (%) |" in rates
    assert row(rates, "Base student") == ["70.0", "70.0", "30.0"]
    assert "RL cost / cost" in section(text, "## Training cost")


def test_a_sweep_marks_the_cells_whose_rl_reference_is_outside(tmp_path):
    data = {
        "base": {"grpo": {}},
        "run_dir": str(tmp_path / "study"),
        "teachers": [{"label": "small", "model": "org/a", "scale": 0.5}],
        "students": [
            {"label": "own", "model": "org/s"},
            {"label": "zoo", "model": "org/z", "rl": "org/z-simplerl-zoo"},
        ],
        "variants": ["all"],
    }
    cells, _ = plan(SweepConfig.model_validate(data))
    rows = [
        CellRow(cell, 0.5, (0.4, 0.6), rgr, (rgr - 0.2, rgr + 0.2), None, 0.5)
        for cell, rgr in zip(cells, (0.25, 0.75), strict=True)
    ]
    facts = {"cells": 2, "stages": 6, "ran": 6, "complete": 0, "failed": 0, "blocked": 0,
             "wall_seconds": 60.0, "parallelism": 1.0, "max_concurrent": 1}  # fmt: skip
    run = RunDir(str(tmp_path / "study"))
    written = write_report(run, rows, facts, [])
    text = run.read_text("report", "report.md")
    # RGR over teacher x student, beside its table, as a heatmap
    assert written["figures"][0] == "sweep_rgr.png" and "![sweep_rgr.png](sweep_rgr.png)" in text
    image = matplotlib.image.imread(tmp_path / "study" / "report" / "sweep_rgr.png")
    assert image.shape[0] > 200 and image.shape[1] > image.shape[0]  # two students side by side
    cells_table = section(text, "## Cells")
    assert row(cells_table, "small")[3:] == [
        "W2SR", "0", "50.0", "40.0 – 60.0", "GRPO", "25.0", "5.0 – 45.0", "–"
    ]  # fmt: skip
    zoo = next(line for line in cells_table.splitlines() if "| zoo |" in line)
    assert "| outside | 75.0 | 55.0 – 95.0 |" in zoo
    rgr = section(text, "## RGR of W2SR over teacher x student (%), mean over seeds")
    assert "| Teacher \\ student | own | zoo |" in rgr and row(rgr, "small") == ["25.0", "75.0"]
    assert "- student zoo: `org/z-simplerl-zoo`" in text
    assert "- student own" not in text


def test_a_sweep_reads_each_cell_from_its_group_and_reports_every_model(reported, tmp_path):
    """A sweep's (teacher, student, seed) groups are read as runs: each cell takes its numbers
    from its group, and the report gives every model's score per group and the teacher-scale
    figures, on average and per benchmark, as a folder of runs does."""
    run_dir, _, _ = reported
    data = {
        "base": {"grpo": {}},
        "run_dir": str(tmp_path / "study"),
        "teachers": [
            {"label": "small", "model": "org/a", "scale": 0.5},
            {"label": "large", "model": "org/b", "scale": 1.5},
        ],
        "students": [{"label": "s", "model": "org/s"}],
        "variants": ["all", "correct"],
    }
    cells, _ = plan(SweepConfig.model_validate(data))
    results = load_results(RunDir(run_dir))  # both teachers' groups: the same known results
    groups = {group_name(cell): results for cell in cells}
    facts = {"cells": 4, "stages": 12, "ran": 12, "complete": 0, "failed": 0, "blocked": 0,
             "wall_seconds": 60.0, "parallelism": 1.0, "max_concurrent": 1}  # fmt: skip
    run = RunDir(str(tmp_path / "study"))
    written = write_report(run, cell_rows(cells, groups), facts, [])
    text = run.read_text("report", "report.md")
    low, high = results.ci["w2sr"]["avg"]
    rgr_low, rgr_high = results.rgr_ci["w2sr"]["avg"]
    assert row(section(text, "## Cells"), "large") == [
        "reasoner", "1.5B", "s", "W2SR", "0", "50.0", f"{100 * low:.1f} – {100 * high:.1f}",
        "GRPO", "100.0", f"{100 * rgr_low:.1f} – {100 * rgr_high:.1f}", "3.000",
    ]  # fmt: skip
    runs = section(text, "## Runs")
    teacher = results.summary["models"]["teacher"]["spec"]
    assert row(runs, "small.s.s0") == [
        f"`{teacher}`", "500.0M", "30.0", "30.0", "50.0", "50.0", "40.0", "50.0",
        "100.0", "100.0", "50.0",
    ]  # fmt: skip
    assert "| large.s.s0 |" in runs  # a group has no report of its own to link to
    assert written["figures"] == [
        "sweep_rgr.png",
        "sweep_teacher_scale.png",
        "figure4_teacher_scale_benchmarks.png",
    ]
    for name in written["figures"]:
        assert matplotlib.image.imread(tmp_path / "study" / "report" / name).shape[0] > 200
        assert f"![{name}]({name})" in text
