"""The demo job, reduced (fewer prompts, samples and steps), through every stage of `w2sr run`:
the world's built-in models, vLLM, Ray Train + DeepSpeed, GRPO with its held-out curve, the
evaluation and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest

from w2sr import layout
from w2sr.cli import main
from w2sr.rundir import RunDir
from w2sr.tracking import model_run_name

DEMO = Path(__file__).parents[1] / "jobs" / "demo.yaml"
REDUCED = [
    "prompts.limit=16",
    "generation.samples_per_prompt=4",
    "train.max_steps=4",
    "grpo.steps=4",
    "grpo.prompts_per_step=16",
    "grpo.eval_every=2",
    "eval.benchmarks=[{name: khop, limit: 24}]",
]


def test_a_reduced_demo_runs_every_stage_and_reports_each_section_and_figure(
    ray_session, tmp_path, capsys
):
    run_dir, mlruns = tmp_path / "demo", f"file://{tmp_path}/mlruns"
    tracked = [f"{section}.mlflow_tracking_uri={mlruns}" for section in ("train", "grpo")]
    assert main(["--json", "run", str(DEMO), f"run_dir={run_dir}", *REDUCED, *tracked]) == 0
    out, err = capsys.readouterr()
    done = json.loads(out[out.index("{\n") :])
    trained = [f"train {variant}" for variant in ("all", "correct", "incorrect")]
    assert list(done) == ["generate", "select", *trained, "grpo", "eval", "report"]
    # Each stage's progress bar, its last state (the console is not a terminal here), with its rate
    for stage, unit in [("generate", "requests"), *((t, "steps") for t in trained),
                        ("grpo", "steps"), ("eval: .+", "requests")]:  # fmt: skip
        rate = rf"[\d.]+({unit}/s|s/{unit})"
        assert re.search(rf"^{stage}: 100%\|.+\| (\d+)/\1 \[.+, +{rate}\]$", err, re.M), stage

    report = (run_dir / "report" / "report.md").read_text()
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections == [
        "## Setup",
        "## Results",
        "## Pass@k and majority vote (%)",
        "## Cognitive behaviors",
        "## Training cost",
        "## Figures",
    ]
    for label in ("Teacher", "Base student", "W2SR", "W2SR-P", "W2SR-N", "RL (GRPO)"):
        assert f"| {label} |" in report, label
    # The world writes symbols, never the English phrases the behavior patterns look for.
    assert "Left out: none of the" in report.split("## Cognitive behaviors")[1]
    assert "RL (GRPO) first reached" in report or "RL (GRPO) did not reach" in report
    for figure in ("figure2_bars.png", "figure5_cost.png", "training_curves.png"):
        assert (run_dir / "report" / figure).stat().st_size > 10_000
        assert f"![{figure}]({figure})" in report

    run = RunDir(str(run_dir))
    (rl,) = run.list(layout.RL)
    lines = run.read_text(layout.RL, rl, "metrics.jsonl").splitlines()
    records = [json.loads(line) for line in lines]
    curve = [r for r in records if "heldout_accuracy" in r]
    measured = {r["step"]: r["heldout_accuracy"]["khop"] for r in curve}
    assert sorted(measured) == [2, 4] and all(0 <= acc <= 1 for acc in measured.values())
    # The curve's last point is the trained policy, answering as `w2sr eval` has it answer
    # (greedy); the engines batch differently, so a near tie may break the other way.
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert abs(summary["models"]["rl"]["results"]["khop"]["pass@1"] - measured[4]) <= 1 / 24
    assert summary["models"]["rl"]["source"]["kind"] == "trained"

    # In MLflow, each model's results and each student's RGR and cost are in the model's run:
    # for the students and RL, the training run that holds their steps.
    client = mlflow.MlflowClient(mlruns)
    experiment = client.get_experiment_by_name("w2sr").experiment_id
    runs = {r.info.run_name: r.data.metrics for r in client.search_runs([experiment])}
    for label, model in summary["models"].items():
        logged = runs[model_run_name(label, model["source"])]
        result = model["results"]["khop"]
        assert logged["khop/pass_at_1"] == pytest.approx(result["pass@1"]), label
        assert logged["khop/pass_at_1_ci_low"] == pytest.approx(result["pass@1_ci"][0]), label
        trained = model["source"]["kind"] == "trained"
        assert ("loss" in logged or "reward_mean" in logged) == trained, label
        assert ("total_worker_hours" in logged) == trained, label
    for label, rgr in done["report"]["rgr"].items():
        logged = runs[model_run_name(label, summary["models"][label]["source"])]
        assert logged.get("rgr") == (pytest.approx(rgr["avg"]) if rgr["avg"] is not None else None)

    # The same RL student named as an outside checkpoint (`rl:`, no `grpo`): no GRPO runs, the
    # folder is evaluated anew as the RL reference (known now by its content) and gives the
    # same RGR, the other models' results reused.
    outside = run_dir / layout.RL / rl / layout.MODEL
    again = [*REDUCED, "grpo=null", f"rl={outside}"]
    assert main(["--json", "run", str(DEMO), f"run_dir={run_dir}", *again, "--from", "eval"]) == 0
    out = capsys.readouterr().out
    redone = json.loads(out[out.index("{\n") :])
    assert list(redone) == ["eval", "report"]
    models = redone["eval"]["models"]
    assert models["rl"]["source"]["kind"] == "outside"
    assert (
        models["rl"]["results"]["khop"]["file"]
        != summary["models"]["rl"]["results"]["khop"]["file"]
    )
    for label in ("teacher", "base", "w2sr"):
        assert models[label]["results"] == summary["models"][label]["results"], label
    assert redone["report"]["rgr"] == done["report"]["rgr"] and done["report"]["rgr"]["w2sr"]
