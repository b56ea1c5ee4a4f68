"""Evaluation: benchmark loading, the result cache, the endpoint client, and a real offline run.

The offline run uses the real stack (Ray Data + vLLM on tiny local models); the endpoint client is
tested against scripted HTTP replies, and its agreement with a real server is in test_serve.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import httpx
import pyarrow as pa
import pytest
from artifacts import prepared_problems, trained_student
from faults import descendants, kill_when

from w2sr import layout
from w2sr.config import BenchmarkRef, ConfigError, PromptsConfig, validate
from w2sr.data.benchmarks import OFFLINE_TASKS
from w2sr.data.sources import load_benchmark, load_training_problems
from w2sr.evaluation import offline
from w2sr.evaluation.endpoint import EndpointError, chat_completion, endpoint_key
from w2sr.evaluation.problems import Problems, load_problems
from w2sr.evaluation.results import (
    benchmark_metrics,
    is_current,
    plan_tasks,
    sample_rows,
    scorer,
    summary,
    write_result,
)
from w2sr.grading import is_correct
from w2sr.lineage import Lineage
from w2sr.registry import model_table
from w2sr.rundir import RunDir
from w2sr.schemas import EVAL_SCHEMA, TOO_LONG
from w2sr.stages.evaluate import evaluate


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- benchmarks ------------------------------------------------------------------------------


def test_offline_benchmark_is_fixed_balanced_and_disjoint_from_default_training_prompts():
    rows, rejected = load_benchmark(BenchmarkRef(name="offline"))
    assert rejected == [] and len(rows) == 200
    assert load_benchmark(BenchmarkRef(name="offline"))[0] == rows
    assert [r["prompt_id"].rsplit("-", 2)[0] for r in rows[:4]] == list(OFFLINE_TASKS)
    training, _ = load_training_problems(
        PromptsConfig()
    )  # the default generation source (jobs/tiny too)
    assert not {r["problem"] for r in training} & {r["problem"] for r in rows}


def test_gpqa_rows_become_lettered_choices_with_the_gold_letter(tmp_path):
    source = [
        {
            "Record ID": f"rec{i}",
            "Question": f"Which particle is number {i}?",
            "Correct Answer": f"right {i}",
            "Incorrect Answer 1": f"wrong a{i}",
            "Incorrect Answer 2": f"wrong b{i}",
            "Incorrect Answer 3": f"wrong c{i}",
        }
        for i in range(12)
    ]
    source.append({"Record ID": "broken", "Question": "Q?", "Correct Answer": "x"})
    path = write_jsonl(tmp_path / "gpqa.jsonl", source)
    gpqa = BenchmarkRef(name="gpqa_diamond", path=path)
    rows, rejected = load_benchmark(gpqa)
    assert [r["reason"] for r in rejected] == ["missing problem"]
    assert load_benchmark(gpqa)[0] == rows  # the order is fixed by the record
    for i, row in enumerate(rows):
        assert row["prompt_id"] == f"rec{i}"
        lines = row["problem"].splitlines()
        assert lines[0] == f"Which particle is number {i}?"
        options = {line[1]: line[4:] for line in lines if line.startswith("(")}
        assert sorted(options) == ["A", "B", "C", "D"]
        assert options[row["answer"]] == f"right {i}"
        assert is_correct(f"\\boxed{{({row['answer']})}}", row["answer"])
    assert len({row["answer"] for row in rows}) > 1  # the correct option is not always first


def test_olympiadbench_and_minerva_local_copies(tmp_path):
    olympiad = [
        {"id": 7, "question": "Find x.", "final_answer": ["$\\frac{1}{2}$"]},
        {"id": 8, "question": "Find a and b.", "final_answer": ["$3$", "$4$"]},
        {"id": 9, "question": "No answer.", "final_answer": "5"},
    ]
    path = write_jsonl(tmp_path / "ob.jsonl", olympiad)
    rows, rejected = load_benchmark(BenchmarkRef(name="olympiadbench", path=path))
    assert rows == [
        {"prompt_id": "7", "problem": "Find x.", "answer": "\\frac{1}{2}"},
        {"prompt_id": "8", "problem": "Find a and b.", "answer": "3, 4"},
    ]
    assert [r["reason"] for r in rejected] == ["missing answer"]
    minerva = [{"question": "Compute 2^10.", "answer": "1024"}]
    path = write_jsonl(tmp_path / "minerva.jsonl", minerva)
    rows, _ = load_benchmark(BenchmarkRef(name="minerva_math", path=path))
    assert rows == [
        {"prompt_id": "minerva_math-test-0", "problem": "Compute 2^10.", "answer": "1024"}
    ]


def test_new_benchmarks_load_from_their_hub_layout(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return []

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for bench in ("minerva_math", "olympiadbench", "gpqa_diamond"):
        load_benchmark(BenchmarkRef(name=bench))
    assert calls == [
        ("math-ai/minervamath", None, "test"),
        ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
        ("Idavidrein/gpqa", "gpqa_diamond", "train"),
    ]


def test_unknown_and_duplicate_benchmarks_and_greedy_sampling_are_config_errors(tmp_path):
    base = {"run_dir": str(tmp_path / "run"), "teacher": "t"}
    for bad, message in [
        ({"benchmarks": ["math501"]}, "unknown benchmark 'math501'"),
        ({"benchmarks": ["gsm8k", "gsm8k"]}, "listed twice"),
        ({"benchmarks": [{"name": "offline", "path": "x"}]}, "built in"),
        ({"sampling": {"temperature": 0}, "samples": 4}, "greedy"),
        ({"samples": 4, "pass_k": [8]}, "exceeds samples"),
        ({"models": {"w2sr": "x"}}, "is a run label"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate({**base, "eval": bad})
    for samples, ks in [(16, [1, 2, 4, 8, 16]), (6, [1, 2, 4, 6])]:
        ev = validate({**base, "eval": {"samples": samples}}).eval
        assert ev.setting(ev.benchmarks[0], "teacher").ks == ks


# --- models and the result cache ------------------------------------------------------------


def test_models_are_found_by_label_and_missing_ones_are_skipped_with_a_reason(tmp_path):
    data = {"run_dir": str(tmp_path / "run"), "teacher": "org/teacher", "student": "org/student"}
    folder = trained_student(validate(data), "all", wall_seconds=1.0)
    models, skipped = model_table(validate({**data, "eval": {"models": {"big": "org/big"}}}))
    assert sorted(models) == ["base", "big", "teacher", "w2sr"]
    assert models["w2sr"].spec == str(tmp_path / "run" / folder / "model")
    assert models["big"].spec == "org/big"
    assert "not trained for this config" in skipped["w2sr_p"]
    assert "no `grpo` section" in skipped["rl"]
    # a student of another config (here: more steps) is not this config's
    other, _ = model_table(validate({**data, "train": {"max_steps": 7}}))
    assert "w2sr" not in other


def test_result_fingerprint_follows_what_decides_the_result(tmp_path):
    data = {"run_dir": str(tmp_path / "run"), "teacher": "org/teacher", "student": "org/student"}
    trained_student(validate(data), "all", wall_seconds=1.0)

    def fingerprint(label: str = "teacher", run: dict | None = None, **eval_cfg) -> str:
        """The fingerprint of `label` on the first benchmark; `run`: top-level keys."""
        eval_cfg.setdefault("benchmarks", [{"name": "offline", "limit": 5}])
        cfg = validate({**data, **(run or {}), "eval": eval_cfg})
        model = model_table(cfg)[0][label]
        return Lineage(cfg).result(cfg.eval.benchmarks[0], label, model.identity)

    same = fingerprint()
    assert fingerprint(engine={"batch_size": 3, "replicas": 2}) == same  # how, not what
    assert fingerprint(endpoint={"concurrency": 2}) == same
    assert fingerprint(pass_k=[1, 2]) == same  # what is reported, not what is generated
    assert fingerprint(run={"thinking": None}) == same
    for changed in [
        {"samples": 8},
        {"sampling": {"temperature": 0.9}},
        {"sampling": {"max_tokens": 99}},
        {"engine": {"max_model_len": 4096}},
        {"benchmarks": [{"name": "offline", "limit": 6}]},
        {"greedy": ["teacher"]},
        {"grading_policy": "standard"},
        {"run": {"grading_policy": "standard"}},  # the run's policy, which evaluation follows
        {"run": {"thinking": False}},
        {"run": {"template": "plain"}},
        {
            "run": {"prompts": {"source": {"type": "reasoning_gym", "task": "leg_counting"}}}
        },  # decontaminated against
    ]:
        assert fingerprint(**changed) != same, changed
    # with a policy of its own, evaluation no longer follows the run's
    own = fingerprint(grading_policy="strict")
    assert own == same == fingerprint(grading_policy="strict", run={"grading_policy": "standard"})
    # not decontaminated, a result does not depend on the training prompts
    other_prompts = {"prompts": {"source": {"type": "reasoning_gym", "task": "leg_counting"}}}
    assert fingerprint(decontaminate=False, run=other_prompts) == fingerprint(decontaminate=False)
    student = fingerprint("w2sr")
    trained_student(validate(data), "all", wall_seconds=2.0)  # trained again: another checkpoint
    assert fingerprint("w2sr") != student


def test_a_local_benchmark_copy_is_known_by_its_content_split_and_columns(tmp_path):
    path = tmp_path / "amc.jsonl"
    write_jsonl(path, [{"question": "1 + 1?", "answer": "2"}])
    data = {"run_dir": str(tmp_path / "run"), "teacher": "org/teacher"}

    def fingerprint(**bench) -> str:
        cfg = validate({**data, "eval": {"benchmarks": [{"name": "amc23", "path": str(path)}
                                                          | bench]}})  # fmt: skip
        model = model_table(cfg)[0]["teacher"]
        return Lineage(cfg).result(cfg.eval.benchmarks[0], "teacher", model.identity)

    local = fingerprint()
    assert fingerprint(split="train") != local
    assert fingerprint(problem_field="question") != local
    write_jsonl(path, [{"question": "10 + 20?", "answer": "30"}])  # edited in place
    assert fingerprint() != local


def test_benchmark_problems_that_are_training_prompts_are_left_out(tmp_path):
    offline, _ = load_benchmark(BenchmarkRef(name="offline"))
    run = RunDir(str(tmp_path / "run"))
    cfg = validate({"run_dir": run.uri, "teacher": "t", "eval": {"benchmarks": ["offline"]}})
    prepared_problems(cfg, ["  " + offline[1]["problem"].upper() + " ", "other"])
    problems = load_problems(cfg, run)["offline"]
    assert problems.decontaminated == 1 and len(problems.rows) == 199
    assert offline[1]["prompt_id"] not in {r["prompt_id"] for r in problems.rows}


# --- settings per (model, benchmark), planning without data, the summary ---------------------


def protocol_config(tmp_path: Path, **eval_cfg):
    """SimpleRL-Zoo's protocol on local copies of AIME 2024 (3 problems) and GSM8K (4)."""
    aime = [{"id": f"aime-{i}", "problem": f"Find {i}.", "answer": str(i)} for i in range(3)]
    gsm8k = [{"question": f"What is {i} + {i}?", "answer": f"so\n#### {2 * i}"} for i in range(4)]
    benchmarks = [
        {"name": "aime24", "path": write_jsonl(tmp_path / "aime24.jsonl", aime)},
        {"name": "gsm8k", "path": write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k)},
    ]
    return validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "org/teacher",
            "student": "org/student",
            "eval": {"protocol": "simplerl_zoo", "benchmarks": benchmarks, **eval_cfg},
        }
    )


def test_the_simplerl_zoo_protocol_decodes_the_base_greedily_and_aime_32_times(tmp_path):
    cfg = protocol_config(tmp_path)
    run = RunDir(cfg.run_dir)
    tasks, _ = plan_tasks(cfg)
    task = {(t.model.label, t.bench.name): t for t in tasks}
    assert sorted(task) == [(m, b) for m in ("base", "teacher") for b in ("aime24", "gsm8k")]
    problems = load_problems(cfg, run)
    for name, count in (("aime24", 3), ("gsm8k", 4)):
        base = task["base", name].setting
        assert base.greedy and base.samples == 1 and base.sampling.temperature == 0.0
        assert len(sample_rows(cfg, task["base", name], problems[name])) == count
    aime = task["teacher", "aime24"]
    assert not aime.setting.greedy and aime.setting.samples == 32
    assert (aime.setting.sampling.temperature, aime.setting.sampling.top_p) == (1.0, 0.95)
    rows = sample_rows(cfg, aime, problems["aime24"])
    assert len(rows) == 3 * 32 and len({r["seed"] for r in rows}) == 3 * 32
    assert {r["prompt_id"] for r in rows} == {f"aime-{i}" for i in range(3)}
    assert sorted(r["sample_index"] for r in rows if r["prompt_id"] == "aime-0") == list(range(32))
    gsm8k = task["teacher", "gsm8k"]
    assert gsm8k.setting.samples == 1 and not gsm8k.setting.greedy
    assert len(sample_rows(cfg, gsm8k, problems["gsm8k"])) == 4


def test_a_protocol_is_known_by_the_values_it_sets_not_by_its_name(tmp_path):
    def fingerprints(cfg) -> dict[tuple[str, str], str]:
        tasks, _ = plan_tasks(cfg)
        return {(t.model.label, t.bench.name): t.fingerprint for t in tasks}

    named = fingerprints(protocol_config(tmp_path))
    by_hand = protocol_config(tmp_path)
    benchmarks = [bench.model_dump() for bench in by_hand.eval.benchmarks]
    benchmarks[0]["samples"] = 32
    by_hand = protocol_config(
        tmp_path,
        protocol=None,
        samples=1,
        sampling={"temperature": 1.0, "top_p": 0.95, "max_tokens": 1024},
        greedy=["base"],
        grading_policy="standard",
        benchmarks=benchmarks,
    )
    assert by_hand.eval.protocol is None and fingerprints(by_hand) == named
    # a setting changed for the sampled models: their AIME results only
    benchmarks[0]["samples"] = 16
    fewer = fingerprints(protocol_config(tmp_path, benchmarks=benchmarks))
    assert {key for key in named if fewer[key] != named[key]} == {("teacher", "aime24")}
    hotter = fingerprints(protocol_config(tmp_path, sampling={"temperature": 0.8}))
    assert {key for key in named if hotter[key] != named[key]} == {
        ("teacher", "aime24"),
        ("teacher", "gsm8k"),
    }  # the base model is decoded greedily whatever the temperature


def test_planning_reads_no_benchmark_and_leaves_the_run_dir_untouched(tmp_path):
    """A benchmark file that is not there yet, one only on the (unreachable) hub and training
    prompts to decontaminate against: planning needs none of them."""
    cfg = validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "org/teacher",
            "student": "org/student",
            "eval": {
                "benchmarks": [{"name": "amc23", "path": str(tmp_path / "amc.jsonl")}, "gsm8k"]
            },
        }
    )
    tasks, skipped = plan_tasks(cfg)
    assert sorted((t.model.label, t.bench.name) for t in tasks) == [
        (m, b) for m in ("base", "teacher") for b in ("amc23", "gsm8k")
    ]
    assert "w2sr" in skipped and len({t.fingerprint for t in tasks}) == 4
    assert not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError):  # what evaluating would have to read
        load_problems(cfg, RunDir(cfg.run_dir))


def graded_rows(cfg, task, problems, right: bool) -> list[dict]:
    score = scorer(cfg, task.model.label)
    return [
        score(
            {
                **sample,
                "response": f"\\boxed{{{sample['answer'] if right else 'x'}}}",
                "finish_reason": "stop",
                "completion_tokens": 4,
            }
        )
        for sample in sample_rows(cfg, task, problems)
    ]


def test_the_summary_names_each_models_source_and_each_results_setting(tmp_path):
    data = {
        "run_dir": str(tmp_path / "run"),
        "teacher": "org/teacher",
        "student": "org/student",
        "eval": {
            "protocol": "simplerl_zoo",
            "benchmarks": [{"name": "offline", "limit": 3, "samples": 4}],
        },
    }
    folder = trained_student(validate(data), "all", wall_seconds=1.0)
    cfg = validate(data)
    run = RunDir(cfg.run_dir)
    tasks, skipped = plan_tasks(cfg)
    problems = load_problems(cfg, run)
    for task in tasks:
        rows = graded_rows(cfg, task, problems["offline"], right=task.model.label != "base")
        write_result(cfg, run, task, problems["offline"], rows, "offline")
    found = summary(cfg, run, tasks, skipped)
    settings = found["settings"]
    assert (settings["protocol"], settings["grading_policy"], settings["greedy"]) == (
        "simplerl_zoo",
        "standard",
        ["base"],
    )
    offline_setting = settings["benchmarks"]["offline"]
    assert offline_setting["samples"] == 4 and offline_setting["pass_k"] == [1, 2, 4]
    assert offline_setting["sampling"]["temperature"] == 1.0
    assert settings["samples"] == 1 and "pass_k" in settings and "sampling" in settings
    models = found["models"]
    assert sorted(models) == ["base", "teacher", "w2sr"]
    teacher = model_table(cfg)[0]["teacher"]
    assert models["teacher"]["source"] == {
        "kind": "outside",
        "spec": "org/teacher",
        "identity": teacher.identity,
    }
    assert models["w2sr"]["source"] == {
        "kind": "trained",
        "stage": folder,
        "fingerprint": Lineage(cfg).student("all").fingerprint,
    }
    base = models["base"]["results"]["offline"]
    assert base["setting"]["greedy"] and base["setting"]["samples"] == 1
    assert base["setting"]["sampling"]["temperature"] == 0.0
    assert base["samples"] == 1 and list(base["pass@k"]) == ["1"] and base["pass@1"] == 0.0
    student = models["w2sr"]["results"]["offline"]
    assert student["setting"] == {
        "samples": 4,
        "sampling": offline_setting["sampling"],
        "greedy": False,
    }
    assert list(student["pass@k"]) == ["1", "2", "4"] and student["pass@1"] == 1.0
    assert student["no_answer"] == 0.0 and student["unclosed_thought"] == 0.0


def offline_teacher(tmp_path):
    """A teacher on three offline problems, two samples each."""
    return validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "org/teacher",
            "eval": {"benchmarks": [{"name": "offline", "limit": 3}], "samples": 2},
        }
    )


def test_one_model_under_two_labels_is_evaluated_once_and_written_for_each(tmp_path):
    """A teacher that is also the base student, at one setting: one result, computed once (or
    taken from the label that has it) and written under each label; a server, which answers
    each label with what it serves under it, is asked for each."""
    from w2sr.stages.evaluate import _once_per_result

    cfg = validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "org/same",
            "student": "org/same",
            "eval": {"benchmarks": [{"name": "offline", "limit": 3}], "samples": 2},
        }
    )
    run = RunDir(cfg.run_dir)
    tasks, _ = plan_tasks(cfg)
    teacher, base = (
        next(t for t in tasks if t.model.label == label) for label in ("teacher", "base")
    )
    assert teacher.fingerprint == base.fingerprint and teacher.file != base.file
    todo, copies = _once_per_result(tasks, tasks, share=True)
    assert dict(todo) == {"teacher": [teacher]} and copies == [(base, teacher)]
    todo, copies = _once_per_result(tasks, tasks, share=False)
    assert dict(todo) == {"teacher": [teacher], "base": [base]} and copies == []

    problems = load_problems(cfg, run)["offline"]
    rows = graded_rows(cfg, teacher, problems, True)
    write_result(cfg, run, teacher, problems, rows, "offline")
    done = evaluate(cfg)  # offline: nothing to compute, so no engine starts
    copied = run.read_parquet(*base.file)
    assert copied.column("model").to_pylist() == ["base"] * len(rows)
    assert copied.drop(["model"]).equals(run.read_parquet(*teacher.file).drop(["model"]))
    assert is_current(run, base, problems)
    results = {label: done["models"][label]["results"]["offline"] for label in ("teacher", "base")}
    assert results["base"]["pass@1"] == results["teacher"]["pass@1"] == 1.0


def test_a_result_made_from_other_problems_is_not_current(tmp_path):
    cfg = offline_teacher(tmp_path)
    run = RunDir(cfg.run_dir)
    [task], _ = plan_tasks(cfg)
    problems = load_problems(cfg, run)["offline"]
    assert not is_current(run, task, problems)
    write_result(cfg, run, task, problems, graded_rows(cfg, task, problems, True), "offline")
    assert is_current(run, task, problems)
    changed = Problems([{**problems.rows[0], "answer": "other"}, *problems.rows[1:]], 0, 0)
    assert not is_current(run, task, changed)


def test_an_offline_response_is_stored_and_graded_with_the_thought_its_template_began(tmp_path):
    cfg = validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "org/teacher",
            "eval": {"benchmarks": [{"name": "offline", "sampling": {"max_tokens": 5}}]},
        }
    )
    [task], _ = plan_tasks(cfg)
    model = offline.Model("teacher", "org/teacher", None, "org/teacher", {"offline": task})
    postprocess = offline._offline_row(cfg, {"teacher/offline": (model, task)})
    row = {
        "result": "teacher/offline",
        "benchmark": "offline",
        "prompt_id": "p",
        "problem": "1 + 1?",
        "answer": "2",
        "sample_index": 0,
        "seed": 1,
        "prompt": "<|im_start|>assistant\n<think>\n",
        "generated_text": "one and one</think> \\boxed{2}",
        "num_input_tokens": 10,
        "num_generated_tokens": 3,
    }
    closed = postprocess(row)
    assert closed["response"] == "<think>\none and one</think> \\boxed{2}"
    assert closed["correct"] and closed["finish_reason"] == "stop"
    # the thought never closed (cut at this benchmark's 5 tokens): no answer, whatever it boxed
    cut = postprocess({**row, "generated_text": "maybe \\boxed{2}", "num_generated_tokens": 5})
    assert cut["response"] == "<think>\nmaybe \\boxed{2}" and cut["finish_reason"] == "length"
    assert cut["extracted_answer"] is None and not cut["correct"]
    plain = postprocess({**row, "prompt": "<|im_start|>assistant\n"})
    assert plain["response"] == row["generated_text"]


# --- metrics of a result table ---------------------------------------------------------------


def test_benchmark_metrics_of_a_hand_built_result():
    rows = []
    cases = {"p1": [True, True, False, False], "p2": [False] * 4, "p3": [True] * 4}
    for pid, verdicts in cases.items():
        for k, right in enumerate(verdicts):
            answer = "7" if right else (None if pid == "p2" else "3")
            finish = "length" if answer is None else "stop"
            response = "<think>cut" if answer is None else f"<think>x</think>\\boxed{{{answer}}}"
            rows.append(
                {"prompt_id": pid, "sample_index": 3 - k, "correct": right, "response": response,
                 "extracted_answer": answer, "finish_reason": finish, "completion_tokens": 10}
            )  # fmt: skip
    table = pa.Table.from_pylist(rows)
    result = benchmark_metrics(table, [1, 2, 4], resamples=500, confidence=0.95, seed=0)
    assert result["problems"] == 3 and result["samples"] == 4
    assert result["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert result["pass@k"]["2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert result["pass@k"]["4"] == pytest.approx(2 / 3)
    assert result["maj@4"] == pytest.approx((0.5 + 0 + 1) / 3)  # p1 ties 2-2
    assert result["no_answer"] == pytest.approx(4 / 12)
    assert result["truncated"] == pytest.approx(4 / 12)
    assert result["unclosed_thought"] == pytest.approx(4 / 12)
    low, high = result["pass@1_ci"]
    assert low <= result["pass@1"] <= high


# --- the endpoint client ---------------------------------------------------------------------

REPLY = {
    "choices": [{"message": {"content": "\\boxed{4}"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3},
}


def chat(replies: list, retries: int = 3):
    """Run one request against scripted replies; returns (result or exception, attempts)."""
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(json.loads(request.content))
        reply = replies[min(len(attempts), len(replies)) - 1]
        if isinstance(reply, Exception):
            raise reply
        return httpx.Response(reply[0], json=reply[1])

    async def run():
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(base_url="http://server", transport=transport) as client:
            return await chat_completion(client, {"model": "w2sr"}, retries, backoff_s=0.001)

    try:
        return asyncio.run(run()), len(attempts)
    except EndpointError as error:
        return error, len(attempts)


def test_transient_failures_are_retried_until_a_reply_comes():
    timeout = httpx.ReadTimeout("slow")
    result, attempts = chat([(503, {}), timeout, (429, {}), (200, REPLY)])
    assert result == REPLY and attempts == 4


def test_the_client_gives_up_after_its_retries():
    result, attempts = chat([(502, {"error": "bad gateway"})], retries=2)
    assert isinstance(result, EndpointError) and "3 attempts" in str(result) and attempts == 3


def test_a_refused_request_fails_at_once_and_an_overlong_prompt_is_reported():
    result, attempts = chat([(404, {"error": "model 'w2sr' not found"})])
    assert isinstance(result, EndpointError) and "404" in str(result) and attempts == 1
    message = {"message": "This model's maximum context length is 512 tokens."}
    assert chat([(400, message)]) == ({"too_long": True}, 1)


class FlakyServer:
    """A local OpenAI-style server that refuses (404) the requests whose seed it is told to,
    and answers \\boxed{4} to the others; it counts the chat requests it gets."""

    def __init__(self):
        import http.server
        import threading

        self.refuse: set[int] = set()
        self.requests = 0
        self.listings = 0  # GET /v1/models
        self.bodies: list[dict] = []
        self.delay = 0.0  # seconds per reply
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.listings += 1
                self._send(200, {"data": [{"id": "teacher"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                server.bodies.append(body)
                time.sleep(server.delay)
                if body["seed"] in server.refuse:
                    self._send(404, {"error": "gone"})
                else:
                    self._send(200, REPLY)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


def test_a_benchmark_that_loses_requests_keeps_its_replies_for_the_rerun(tmp_path):
    """Two of six requests are refused: the four replies are kept, no result is written, and the
    rerun asks only for the two, then writes the whole result."""
    cfg = offline_teacher(tmp_path)
    run = RunDir(cfg.run_dir)
    [task], _ = plan_tasks(cfg)
    seeds = [s["seed"] for s in sample_rows(cfg, task, load_problems(cfg, run)["offline"])]
    server = FlakyServer()
    try:
        server.refuse = set(seeds[:2])
        with pytest.raises(EndpointError, match="2 of 6 requests failed.*rerun asks only"):
            evaluate(cfg, endpoint=server.url)
        assert server.requests == 6 and not run.exists(*task.file)
        server.refuse = set()
        summary = evaluate(cfg, endpoint=server.url)
    finally:
        server.httpd.shutdown()
    assert server.requests == 6 + 2  # only the two lost ones again
    assert all("chat_template_kwargs" not in body for body in server.bodies)  # no `thinking`
    table = run.read_parquet(*task.file)
    assert sorted(table.column("seed").to_pylist()) == sorted(seeds)
    assert run.list(*task.file[:-1]) == [task.file[-1]]  # the kept replies are gone
    assert summary["models"]["teacher"]["results"]["offline"]["backend"].startswith("endpoint")


def test_endpoint_requests_follow_each_benchmarks_setting_and_the_thinking_switch(tmp_path):
    amc = write_jsonl(tmp_path / "amc.jsonl", [{"question": "Q amc?", "answer": "4"}])
    cfg = validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "org/teacher",
            "thinking": False,
            "eval": {
                "protocol": "simplerl_zoo",
                "benchmarks": [
                    {"name": "offline", "limit": 2, "samples": 3, "sampling": {"max_tokens": 77}},
                    {"name": "amc23", "path": amc},
                ],
            },
        }
    )
    server = FlakyServer()
    try:
        found = evaluate(cfg, endpoint=server.url)
    finally:
        server.httpd.shutdown()
    amc_bodies = [b for b in server.bodies if "Q amc?" in b["messages"][-1]["content"]]
    offline_bodies = [b for b in server.bodies if b not in amc_bodies]
    assert len(offline_bodies) == 2 * 3 and len(amc_bodies) == 1
    assert {b["max_tokens"] for b in offline_bodies} == {77}
    assert {b["max_tokens"] for b in amc_bodies} == {cfg.eval.sampling.max_tokens} != {77}
    for body in server.bodies:
        assert (body["temperature"], body["top_p"]) == (1.0, 0.95)
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
    results = found["models"]["teacher"]["results"]
    assert results["offline"]["setting"]["samples"] == 3 and results["amc23"]["samples"] == 1
    assert results["amc23"]["pass@1"] == 1.0  # the server's \\boxed{4}, read by the protocol


def test_a_killed_endpoint_evaluation_keeps_the_replies_it_got(tmp_path):
    """SIGKILL mid-benchmark: the replies saved as they arrived are kept, and the rerun asks only
    for the rest; every (problem, sample) is in the result once."""
    data = {
        "run_dir": str(tmp_path / "run"),
        "teacher": "org/teacher",
        "eval": {
            "benchmarks": [{"name": "offline", "limit": 8}],
            "samples": 2,
            "endpoint": {"concurrency": 2},
        },
    }
    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps(data))
    cfg = validate(data)
    run = RunDir(cfg.run_dir)
    [task], _ = plan_tasks(cfg)
    partial = Path(run.path(*task.file).removesuffix(".parquet") + ".partial.json")
    server = FlakyServer()
    server.delay = 0.4
    try:
        cmd = [sys.executable, "-m", "w2sr.cli", "eval", str(config), "--endpoint", server.url]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while not partial.exists() and time.time() < deadline:
                assert proc.poll() is None, "the evaluation ended before it could be killed"
                time.sleep(0.05)
            proc.kill()
        finally:
            proc.wait()
        kept = json.loads(partial.read_text())
        assert 0 < len(kept) < 16 and not run.exists(*task.file)
        before, server.delay = server.requests, 0.0
        evaluate(cfg, endpoint=server.url)
    finally:
        server.httpd.shutdown()
    assert server.requests - before == 16 - len(kept)  # only what the killed attempt lacked
    table = run.read_parquet(*task.file)
    keys = list(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == 16 and not partial.exists()


def endpoint_config(tmp_path: Path):
    return validate(
        {
            "run_dir": str(tmp_path / "run"),
            "teacher": "org/teacher",
            "eval": {"benchmarks": [{"name": "offline", "limit": 1}], "samples": 1},
        }
    )


@pytest.mark.parametrize(
    "secret_part", ["user:s3cret@", "s3cret@", "/v1?api-key=s3cret", "/v1#s3cret"]
)
def test_an_endpoint_url_that_holds_a_secret_is_refused_before_any_request(tmp_path, secret_part):
    """Every result records its endpoint, and the summary with it: a URL with credentials (or a
    query or fragment that may hold a token) is refused before anything is asked or written,
    with the key's variable named and the secret not repeated."""
    cfg = endpoint_config(tmp_path)
    server = FlakyServer()
    port = server.httpd.server_address[1]
    if secret_part.endswith("@"):
        url = f"http://{secret_part}127.0.0.1:{port}/v1"
    else:
        url = f"http://127.0.0.1:{port}{secret_part}"
    try:
        with pytest.raises(ConfigError, match="environment variable W2SR_API_KEY") as refused:
            evaluate(cfg, endpoint=url)
    finally:
        server.httpd.shutdown()
    assert "s3cret" not in str(refused.value) and len(str(refused.value).splitlines()) == 1
    assert server.listings == server.requests == 0
    assert not Path(cfg.run_dir, "eval").exists()  # no result, no summary


_connects: list | None = None  # while a test watches: the addresses sockets tried to reach
_hooked = False  # audit hooks cannot be removed: one is installed once, when first needed


def _refuse_connects(event: str, args: tuple) -> None:
    if event == "socket.connect" and _connects is not None:
        _connects.append(args[1])
        raise ConnectionRefusedError("this test allows no connection")


@pytest.fixture
def no_connections():
    """Sockets may not connect while the test runs (an audit hook refuses, so nothing is sent);
    yields the addresses they tried."""
    global _connects, _hooked
    if not _hooked:
        sys.addaudithook(_refuse_connects)
        _hooked = True
    _connects = []
    try:
        yield _connects
    finally:
        _connects = None


def test_the_api_key_goes_over_plain_http_only_to_loopback(tmp_path, monkeypatch, no_connections):
    """With a key set, plain http to another host is refused before any connection is tried;
    https anywhere and http to localhost, 127.0.0.0/8 or ::1 get the key."""
    cfg = endpoint_config(tmp_path)
    monkeypatch.setenv("W2SR_API_KEY", "sk-test")
    with pytest.raises(ConfigError, match="10.255.255.1 would receive the key in W2SR_API_KEY"):
        evaluate(cfg, endpoint="http://10.255.255.1:9/v1")
    assert no_connections == []
    for url in [
        "https://api.example.com/v1",
        "http://localhost:8000/v1",
        "http://127.8.9.10:8000",
        "http://[::1]:8000/v1",
    ]:
        assert endpoint_key(url, cfg) == "sk-test", url
    for url in ["http://example.com/v1", "http://127.0.0.1.example.com/v1"]:
        with pytest.raises(ConfigError, match="in clear over http"):
            endpoint_key(url, cfg)
    monkeypatch.delenv("W2SR_API_KEY")
    assert endpoint_key("http://example.com/v1", cfg) is None  # no key, nothing to leak
    with pytest.raises(ConfigError, match="not an http"):
        endpoint_key("ftp://example.com/v1", cfg)


# --- a real offline evaluation ---------------------------------------------------------------

PROBLEMS = [f"What is {a} + {b}?" for a, b in [(1, 2), (3, 4), (5, 6)]]
SAMPLES = 2


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model, tiny_student, ray_session):
    """The teacher, the base student and `other` (the student's architecture, its own weights)
    evaluated: the two students through one engine, `other` loaded in place after the base."""
    from w2sr.models import build_tiny_model

    tmp = tmp_path_factory.mktemp("eval")
    other = build_tiny_model(tmp / "other", hidden_size=128, num_layers=3, num_heads=2, seed=2)
    rows = [{"question": q, "answer": str(i)} for i, q in enumerate(PROBLEMS)]
    rows += [
        {"question": "1 + " * 300 + "1", "answer": "301"},
        {"question": "Seen?", "answer": "1"},
    ]
    bench = write_jsonl(tmp / "amc.jsonl", rows)
    run = RunDir(str(tmp / "run"))
    cfg = validate(
        {
            "run_dir": run.uri,
            "teacher": tiny_model,
            "student": tiny_student,
            "eval": {
                "benchmarks": [{"name": "amc23", "path": bench}, {"name": "offline", "limit": 3}],
                "samples": SAMPLES,
                "sampling": {"temperature": 1.0, "max_tokens": 16},
                "engine": {"batch_size": 8, "max_model_len": 512},
                "models": {"other": str(other)},
            },
        }
    )
    prepared_problems(cfg, ["Seen?"])
    return cfg, evaluate(cfg)


def result_table(cfg, summary, label: str, bench: str) -> pa.Table:
    return RunDir(cfg.run_dir).read_parquet(
        *summary["models"][label]["results"][bench]["file"].split("/")
    )


def test_every_model_and_benchmark_gets_one_graded_row_per_problem_and_sample(evaluated):
    cfg, summary = evaluated
    assert sorted(summary["models"]) == ["base", "other", "teacher"]
    assert sorted(summary["skipped"]) == ["rl", "w2sr", "w2sr_n", "w2sr_p"]
    for label in ("teacher", "base", "other"):
        for bench, problems in (("amc23", len(PROBLEMS) + 1), ("offline", 3)):
            table = result_table(cfg, summary, label, bench)
            assert table.schema.remove_metadata() == EVAL_SCHEMA
            meta = json.loads(table.schema.metadata[b"w2sr"])
            assert (meta["label"], meta["benchmark"]["name"], meta["backend"]) == (
                label,
                bench,
                "offline",
            )
            assert table.num_rows == problems * SAMPLES
            assert set(table["model"].to_pylist()) == {label}
            assert len(set(table["seed"].to_pylist())) == table.num_rows
            for row in table.to_pylist():
                if row["finish_reason"] != TOO_LONG:
                    assert row["correct"] == is_correct(row["response"], row["answer"])
                    assert row["prompt"].endswith("<|im_start|>assistant\n")
                    assert 0 < row["completion_tokens"] <= 16
            entry = summary["models"][label]["results"][bench]
            assert entry["problems"] == problems and entry["samples"] == SAMPLES
        run = RunDir(cfg.run_dir)
        assert run.list(layout.EVAL, label, layout.PARTS) == []  # every part sealed
    responses = {
        label: result_table(cfg, summary, label, "offline")["response"].to_pylist()
        for label in ("teacher", "base", "other")
    }
    assert responses["teacher"] != responses["base"] != responses["other"]  # three models


def test_a_model_loaded_in_place_answers_as_in_an_engine_of_its_own(evaluated, tmp_path):
    """`other` evaluated alone, in a copy of the run dir without its results, by an engine
    started on it: every sample is the one the shared engine gave after loading it in place of
    the base student (were the load lost, the base's weights would have answered)."""
    cfg, summary = evaluated
    shutil.copytree(cfg.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    alone = cfg.model_copy(update={"run_dir": str(tmp_path / "run")})
    own = evaluate(alone, labels=("other",))
    assert sorted(own["models"]) == ["other"]
    for bench in ("amc23", "offline"):
        columns = ["prompt_id", "sample_index", "response", "correct"]
        ours = result_table(alone, own, "other", bench).select(columns)
        assert ours.equals(result_table(cfg, summary, "other", bench).select(columns)), bench


def test_an_overlong_prompt_counts_wrong_and_a_training_prompt_is_left_out(evaluated):
    cfg, summary = evaluated
    table = result_table(cfg, summary, "teacher", "amc23")
    too_long = [r for r in table.to_pylist() if r["finish_reason"] == TOO_LONG]
    assert len(too_long) == SAMPLES
    assert all(r["problem"].startswith("1 + 1 + ") and not r["correct"] for r in too_long)
    assert "Seen?" not in table["problem"].to_pylist()
    assert summary["benchmarks"]["amc23"]["decontaminated"] == 1


def test_a_rerun_reuses_every_result_without_starting_an_engine(evaluated, monkeypatch):
    cfg, summary = evaluated

    def no_engine(*args, **kwargs):
        raise AssertionError("a cached result was recomputed")

    monkeypatch.setattr(offline, "shared_generator", no_engine)
    files = sorted(Path(cfg.run_dir, "eval").rglob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in files]
    assert evaluate(cfg) == summary
    assert [p.stat().st_mtime_ns for p in files] == stamps


def test_a_killed_shared_engine_is_replaced_and_loads_the_model_its_batches_name(
    evaluated, tmp_path
):
    """The students' engine SIGKILLed once the base's results are sealed and while `other`'s
    are not: Ray Data starts another engine, which starts on the pipeline's first model (the
    base), and replays the lost batches, which name `other`: every result is the one the
    module's evaluation wrote."""
    cfg, summary = evaluated
    shutil.copytree(cfg.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    engine = cfg.eval.engine.model_copy(update={"batch_size": 2})  # operational: same results
    killed_cfg = cfg.model_copy(
        update={
            "run_dir": str(tmp_path / "run"),
            "eval": cfg.eval.model_copy(update={"engine": engine}),
        }
    )

    def sealed(label: str) -> int:
        return len(list(Path(killed_cfg.run_dir, layout.EVAL, label).glob("*.parquet")))

    killed: list = []
    watcher = kill_when(
        lambda: sealed("base") == 2 and sealed("other") < 2, "(SharedEngine)", killed
    )
    again = evaluate(killed_cfg, labels=("base", "other"))
    watcher.join(timeout=1)
    assert killed, "the kill did not land while `other` was evaluated"
    for label in ("base", "other"):
        for bench in ("amc23", "offline"):
            columns = ["prompt_id", "sample_index", "response", "correct"]
            ours = result_table(killed_cfg, again, label, bench).select(columns)
            assert ours.equals(result_table(cfg, summary, label, bench).select(columns))


def test_models_evaluated_side_by_side_run_at_once_and_give_the_same_results(evaluated, tmp_path):
    """Two pipelines at once (`eval.concurrent_models: 2`) on a copy of the module's run dir
    without its results: the teacher's engine and the students' one engine are up together, and
    every result is the one the models gave one pipeline after another (each sample has its own
    seed)."""
    cfg, summary = evaluated
    shutil.copytree(cfg.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    both = cfg.model_copy(
        update={
            "run_dir": str(tmp_path / "run"),
            "eval": cfg.eval.model_copy(update={"concurrent_models": 2}),
        }
    )
    engines, stop = [], threading.Event()

    def count_engines() -> None:
        while not stop.wait(0.2):
            # The engines run in Ray Data's actors (the pipelines' only actor stage); those of
            # the module's evaluation may not have exited yet. An actor's own short-lived
            # children (forked to run a command) carry its title until they exec: an engine is
            # an actor whose parent is none.
            actors = [a for a in descendants(engine_title) if a.pid not in before]
            pids = {actor.pid for actor in actors}
            engines.append(sum(1 for actor in actors if actor.ppid() not in pids))

    engine_title = "MapWorker(MapBatches(SharedEngine))"
    before = {actor.pid for actor in descendants(engine_title)}
    watcher = threading.Thread(target=count_engines, daemon=True)
    watcher.start()
    try:
        side_by_side = evaluate(both)
    finally:
        stop.set()
        watcher.join()
    assert max(engines) == 2  # three models, two architectures
    for label in ("teacher", "base", "other"):
        for bench in ("amc23", "offline"):
            ours = result_table(both, side_by_side, label, bench)
            theirs = result_table(cfg, summary, label, bench)
            assert ours.select(["prompt_id", "sample_index", "response", "correct"]).equals(
                theirs.select(["prompt_id", "sample_index", "response", "correct"])
            ), (label, bench)
