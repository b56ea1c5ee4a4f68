"""The report of a small hand-built run (and sweep) whose numbers are known in advance.

Result files are written where `w2sr eval` caches them, so `evaluate` only summarises them (no
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
from w2sr.config import validate
from w2sr.evaluation.problems import load_problems
from w2sr.evaluation.results import Task, result_fingerprint, write_result
from w2sr.registry import model_table
from w2sr.rundir import RunDir
from w2sr.stages.evaluate import evaluate
from w2sr.stages.report import report

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
RESPONSES = {  # behaviour markers: the students picked up the teacher's "wait" and checking
    "teacher": "First, we add. Wait, let me check.",
    "base": "The sum is below.",
    "w2sr": "First, we add. Wait, let me check.",
}
HOURS = {"traces": 1, "all": 2, "correct": 1, "incorrect": 1, "rl": 50}
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


def build_run(run_dir: Path, teacher_parameters: int, labels=tuple(SOLVED)) -> str:
    """A run whose teacher has a known size, with traces, students, RL and cached results; the
    teacher and the benchmark file live beside it."""
    inputs = run_dir.parent / f"{run_dir.name}-inputs"
    teacher = inputs / "teacher"
    teacher.mkdir(parents=True)
    save_file({"weight": torch.zeros(teacher_parameters)}, teacher / "model.safetensors")
    lines = [json.dumps({"question": f"Q{i}?", "answer": str(i)}) + "\n" for i in range(PROBLEMS)]
    bench = inputs / "amc.jsonl"
    bench.write_text("".join(lines))
    run = RunDir(str(run_dir))
    benchmarks = [{"name": "amc23", "path": str(bench)}, {"name": "offline", "limit": PROBLEMS}]
    cfg = validate(
        {
            "run_dir": run.uri,
            "teacher": str(teacher),
            "student": "org/base-student",
            "eval": {"benchmarks": benchmarks, "samples": SAMPLES, "bootstrap_resamples": 500},
            "grpo": {} if "rl" in labels else None,
        }
    )
    traces = lineage.traces(cfg)
    done(run, HOURS["traces"], traces)
    rows = [{"trace": "Wait, let me verify. Case 1: x. \\boxed{1}"}] * 3
    run.write_parquet(pa.Table.from_pylist(rows), traces.folder, "shard-00000.parquet")
    trained = lineage.trained(cfg)
    for label, variant in (
        ("w2sr", "all"),
        ("w2sr_p", "correct"),
        ("w2sr_n", "incorrect"),
        ("rl", "rl"),
    ):
        if label in labels:
            run.write_text("{}", trained[label].folder, "model", "config.json")
            done(run, HOURS[variant], trained[label])
    if "rl" in labels:
        records = [
            {"step": step, "worker_seconds": hours * 3600, "heldout_accuracy": accuracy}
            for step, hours, accuracy in CURVE
        ]
        records.insert(1, {"step": 15, "worker_seconds": 15 * 3600})  # a step not measured
        text = "".join(json.dumps(r) + "\n" for r in records)
        run.write_text(text, trained["rl"].folder, "metrics.jsonl")
    models, _ = model_table(cfg)
    problems = load_problems(cfg, run)
    for label in labels:
        for bench_cfg in cfg.eval.benchmarks:
            name = bench_cfg.name
            fingerprint = result_fingerprint(cfg, models[label], name, problems[name])
            task = Task(models[label], bench_cfg, problems[name], fingerprint)
            write_result(cfg, run, task, result_rows(label, name, problems[name].rows), "offline")
    evaluate(cfg)  # every result is cached: this only writes eval/summary.json
    return run.uri


def result_rows(label: str, bench: str, problems: list[dict]) -> list[dict]:
    """The first SOLVED[label][bench] problems right in every sample, the rest wrong."""
    rows = []
    for i, problem in enumerate(problems):
        right = i < SOLVED[label][bench]
        answer = problem["answer"] if right else "x"
        for k in range(SAMPLES):
            rows.append(
                {
                    "model": label,
                    "benchmark": bench,
                    **problem,
                    "sample_index": k,
                    "seed": k,
                    "response": f"{RESPONSES.get(label, '')} \\boxed{{{answer}}}",
                    "extracted_answer": answer,
                    "correct": right,
                    "prompt_tokens": 20,
                    "completion_tokens": 30,
                    "finish_reason": "stop",
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
    _, _, text = reported
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


def test_costs_behaviours_and_details_are_reported(reported):
    _, _, text = reported
    costs = text.split("## Training cost")[1]
    assert row(costs, "W2SR") == ["1.000", "2.000", "3.000", "16.7x", "50.0"]
    assert row(costs, "W2SR-P")[3] == "25.0x"  # the paper's headline: W2SR-P 25x cheaper than RL
    # RL's curve reaches W2SR-P's 50% at step 20 (as redone), after 20 worker-h: 10x W2SR-P's 2
    assert (
        "RL (GRPO) first reached the accuracy of W2SR-P (50.0%, 2.000 worker-h) at step 20 "
        "(50.0% held out), after 20.000 worker-h: **10.0x** W2SR-P's cost." in costs
    )
    behaviours = text.split("## Cognitive behaviours")[1]
    assert row(behaviours, "Base student")[1:3] == ["0.00 (0%)", "0.00 (0%)"]
    assert row(behaviours, "W2SR")[1:3] == ["1.00 (100%)", "1.00 (100%)"]
    assert row(behaviours, "Teacher (training traces)") == [
        "3",
        "1.00 (100%)",
        "1.00 (100%)",
        "0.00 (0%)",
        "1.00 (100%)",
    ]
    details = text.split("## Pass@k and majority vote")[1]
    assert "| W2SR | AMC23 | 50.0 | 50.0 | 50.0 | 50.0 |" in details


def test_figures_are_rendered_and_linked(reported):
    run_dir, result, text = reported
    assert result["figures"] == ["figure2_bars.png", "figure5_cost.png"]
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
    assert "RL (GRPO): not evaluated (no `grpo` section in the config)" in text


def test_a_sweep_of_teachers_plots_accuracy_against_teacher_scale(tmp_path):
    build_run(tmp_path / "sweep" / "small", teacher_parameters=1500)
    build_run(tmp_path / "sweep" / "large", teacher_parameters=6000)
    result = report(str(tmp_path / "sweep"))
    assert result["figures"] == [
        "figure3_teacher_scale.png",
        "figure4_teacher_scale_benchmarks.png",
    ]
    for name in result["figures"]:
        assert matplotlib.image.imread(tmp_path / "sweep" / "report" / name).shape[0] > 200
    text = Path(result["report"]).read_text()
    assert "| [large](large/report/report.md) |" in text and "| 6.0K |" in text
    for run in ("small", "large"):
        assert (tmp_path / "sweep" / run / "report" / "report.md").exists()


def test_a_folder_without_results_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="w2sr eval"):
        report(str(tmp_path))


def test_behaviours_that_no_response_shows_are_left_out_with_the_reason():
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
