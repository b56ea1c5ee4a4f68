"""`w2sr sweep`: the plan, and a small study run as users run it.

The end-to-end test runs a small study on tiny models with its run dir on a real S3 API server on
127.0.0.1: first `w2sr sweep` on a local Ray it starts, SIGKILLed with its stages once the
teacher's traces are complete; then resumed through `ray job submit` to a local head with token
authentication, which must redo nothing that finished; then `w2sr gc` on it, with empty caches.
(Sharing across teachers and seeds is the plan's test; the scheduling, failures, leases, timeouts
and resume are test_scheduler.py's, with the stages run in-process.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest
import yaml
from artifacts import sum_problems
from network import free_port

from w2sr import layout
from w2sr.config import ConfigError
from w2sr.evaluation.results import plan_tasks
from w2sr.identity import content_digest
from w2sr.lineage import Lineage
from w2sr.models import _builtin_folder, builtin_digest, cache_dir
from w2sr.rundir import RunDir
from w2sr.status import status, table
from w2sr.sweep.config import SweepConfig, load_sweep
from w2sr.sweep.plan import plan
from w2sr.sweep.report import CellRow, write_report

# A built-in student: built once by the first stage that needs it and published into the run
# dir, which its trainer's workers and its evaluation's engine read.
STUDENT = "builtin:tiny-random"


def base(tmp: Path) -> dict:
    problems = sum_problems(tmp)
    engine = {"batch_size": 16, "max_model_len": 256}
    return {
        "prompts": {"source": {"type": "file", "path": str(problems)}},
        "generation": {
            "samples_per_prompt": 2,
            "prompts_per_shard": 3,
            "sampling": {"temperature": 1.0, "max_tokens": 8},
            "engine": engine,
        },
        "train": {
            "num_workers": 1,
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "max_steps": 2,
            "zero_stage": 2,
            "bf16": False,
            "mlflow_tracking_uri": f"file://{tmp}/mlruns",
        },
        "eval": {
            "benchmarks": [{"name": "offline", "limit": 4}],
            "samples": 1,
            "sampling": {"temperature": 0.0, "max_tokens": 8},
            "engine": engine,
            "bootstrap_resamples": 200,
        },
    }


def sweep_file(
    tmp: Path, run_dir: str, teachers: list[dict], student: str, at_once: int = 2
) -> Path:
    """`job/sweep.yaml` and its `job/base.yaml`: the folder a job submission uploads."""
    (tmp / "job").mkdir(exist_ok=True)
    path = tmp / "job" / "sweep.yaml"
    (tmp / "job" / "base.yaml").write_text(yaml.safe_dump(base(tmp)))
    sweep = {
        "base": "base.yaml",
        "run_dir": run_dir,
        "teachers": teachers,
        "students": [{"label": "student", "model": student}],
        "variants": ["all", "correct"],
        "max_concurrent_stages": at_once,
    }
    path.write_text(yaml.safe_dump(sweep))
    return path


# --- the plan --------------------------------------------------------------------------------


def test_cells_share_every_stage_whose_folder_they_share(tmp_path):
    data = {
        "base": {**base(tmp_path), "grpo": {}},
        "run_dir": str(tmp_path / "study"),
        "teachers": [{"label": "a", "model": "org/a"}, {"label": "b", "model": "org/b"}],
        "students": [{"label": "s", "model": "org/s"}],
        "seeds": [0, 1],
    }
    cells, nodes = plan(SweepConfig.model_validate(data))
    assert len(cells) == 2 * 3 * 2
    commands = [node.command for node in nodes.values()]
    assert commands.count("generate") == 2  # each teacher's traces once, for every seed
    assert commands.count("select") == 2
    assert commands.count("train") == 2 * 3 * 2
    assert commands.count("grpo") == 2  # one baseline per (student, seed), whatever the teacher
    # each model once: 2 teachers, 1 base, 12 students, 2 RL
    assert commands.count("eval") == 2 + 1 + 12 + 2
    generate = next(n for n in nodes.values() if n.command == "generate")
    assert len(generate.cells) == 6
    assert generate.key == Lineage(generate.config).traces.folder
    seeds = {cell.config.train.seed for cell in cells} | {cell.config.grpo.seed for cell in cells}
    assert seeds == {0, 1}


def test_a_student_with_an_outside_rl_reference_runs_no_grpo_and_evaluates_it(tmp_path):
    data = {
        "base": {**base(tmp_path), "grpo": {}},
        "run_dir": str(tmp_path / "study"),
        "teachers": [{"label": "a", "model": "org/a"}],
        "students": [
            {"label": "s", "model": "org/s", "rl": "org/s-rl"},
            {"label": "t", "model": "org/t"},
        ],
    }
    cells, nodes = plan(SweepConfig.model_validate(data))
    outside = [c for c in cells if c.student.label == "s"]
    assert all(c.config.rl == "org/s-rl" and c.config.grpo is None for c in outside)
    assert all("rl" in c.labels for c in cells)
    grpo = [n for n in nodes.values() if n.command == "grpo"]
    assert [n.config.student for n in grpo] == ["org/t"]  # only the student without one
    (rl,) = [n for n in nodes.values() if n.label == "rl" and n.config.student == "org/s"]
    assert rl.command == "eval" and rl.key.startswith("eval/rl/") and not rl.needs
    assert len(rl.cells) == 3  # every variant of that student compares with it


def test_an_evaluation_is_a_node_per_setting_of_its_model(tmp_path):
    """A student whose overrides change the evaluation has the teacher evaluated at its setting
    too: a node of its own, whose results are those its cells' summary reads."""
    data = {
        "base": {**base(tmp_path), "grpo": {}},
        "run_dir": str(tmp_path / "study"),
        "teachers": [{"label": "a", "model": "org/a"}],
        "students": [
            {"label": "s", "model": "org/s"},
            {"label": "t", "model": "org/t", "overrides": {"eval.sampling.max_tokens": 16}},
            {"label": "u", "model": "org/u"},
        ],
        "variants": ["all"],
    }
    cells, nodes = plan(SweepConfig.model_validate(data))
    teacher = [n for n in nodes.values() if n.command == "eval" and n.label == "teacher"]
    assert sorted(sorted(n.cells) for n in teacher) == [
        ["a.s.all.s0", "a.u.all.s0"],
        ["a.t.all.s0"],
    ]
    for node in teacher:
        assert node.key.startswith("eval/teacher/")
        for cell in [c for c in cells if c.name in node.cells]:  # the node makes what they read
            wanted, _ = plan_tasks(cell.config, labels=("teacher",))
            made, _ = plan_tasks(node.config, labels=("teacher",))
            assert [t.file for t in wanted] == [t.file for t in made]
    # One GRPO student for two teachers, one of which evaluates at another setting
    data |= {
        "teachers": [
            {"label": "a", "model": "org/a"},
            {"label": "b", "model": "org/b", "overrides": {"eval.sampling.max_tokens": 16}},
        ],
        "students": [{"label": "s", "model": "org/s"}],
    }
    _, nodes = plan(SweepConfig.model_validate(data))
    (grpo,) = [n.key for n in nodes.values() if n.command == "grpo"]
    rl = [n for n in nodes.values() if n.command == "eval" and n.label == "rl"]
    assert sorted(n.cells for n in rl) == [["a.s.all.s0"], ["b.s.all.s0"]]
    assert all(n.needs == (grpo,) for n in rl)


def test_the_paper_sweep_plans_offline_without_data_models_or_writes(tmp_path, monkeypatch):
    """`--plan` needs no network, no benchmark or training data and no model, and leaves the
    run dir as it was: absent."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    jobs = Path(__file__).parents[1] / "jobs"
    sweep = yaml.safe_load((jobs / "paper-sweep.yaml").read_text())
    run_dir = tmp_path / "runs" / "paper-sweep"
    sweep |= {"base": str(jobs / sweep["base"]), "run_dir": str(run_dir)}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    done = subprocess.run(
        [sys.executable, "-m", "w2sr.cli", "sweep", str(path), "--plan", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    listed = json.loads(done.stdout[done.stdout.index("{\n") :])
    assert listed["to_run"] == len(listed["stages"]) > 0
    assert {s["command"] for s in listed["stages"]} >= {"generate", "train", "eval"}
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_matched_sets_are_cells_of_their_own_that_share_the_traces(tmp_path):
    data = {
        "base": base(tmp_path),
        "run_dir": str(tmp_path / "study"),
        "teachers": [{"label": "a", "model": "org/a"}],
        "students": [{"label": "s", "model": "org/s"}],
        "match": ["none", "tokens"],
    }
    cells, nodes = plan(SweepConfig.model_validate(data))
    names = [c.name for c in cells if c.variant == "all"]
    assert names == ["a.s.all.s0", "a.s.all.tokens-matched.s0"]
    commands = [node.command for node in nodes.values()]
    assert commands.count("generate") == 1
    assert commands.count("select") == 2  # the sets as selected, and cut to one size
    assert commands.count("train") == 2 * 3
    assert {c.config.select.match for c in cells} == {"none", "tokens"}
    # absent from the sweep, the axis is the base config's
    data |= {"match": None, "base": {**base(tmp_path), "select": {"match": "traces"}}}
    cells, _ = plan(SweepConfig.model_validate(data))
    assert {c.config.select.match for c in cells} == {"traces"}


def test_a_bad_sweep_fails_before_ray_starts_naming_the_key(tmp_path):
    path = tmp_path / "sweep.yaml"
    good = {
        "base": base(tmp_path),
        "run_dir": str(tmp_path / "study"),
        "teachers": [{"label": "a", "model": "org/a"}],
        "students": [{"label": "s", "model": "org/s"}],
    }
    for bad, message in [
        ({"teachers": []}, "teachers: List should have at least 1 item"),
        ({"teachers": [{"label": "A b", "model": "x"}]}, "teachers.0.label"),
        ({"variants": ["al"]}, "variants.0"),
        ({"seeds": [1, 1]}, "seeds: values must be unique"),
        ({"match": ["tokens", "words"]}, "match.1"),
        ({"base": {**base(tmp_path), "train": {"lr": -1}}}, "cell a.s.all.s0: invalid config"),
        ({"base": {**base(tmp_path), "train": {"lr": -1}}}, "train.lr"),
    ]:
        path.write_text(yaml.safe_dump({**good, **bad}))
        with pytest.raises(ConfigError, match=message):
            plan(load_sweep(path))


# --- a study, run as users run it ------------------------------------------------------------


def _done_records(run: RunDir) -> dict[str, tuple]:
    """Every stage's done record on the store, with its modification time."""
    selector = pafs.FileSelector(run.path(), recursive=True)
    prefix = run.path() + "/"
    return {
        info.path[len(prefix) :]: (info.mtime, run.read_text(info.path[len(prefix) :]))
        for info in run.fs.get_file_info(selector)
        if info.base_name == "_DONE.json"
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model, s3_bucket):
    """A sweep with its run dir on the loopback S3 server, SIGKILLed with its stages once the
    teacher's traces are complete, then resumed through `ray job submit` to a local head with
    token authentication. Returns (folder, run dir, the done records the kill left, the job, a
    wrong token's answer, `w2sr status` while the traces were generated)."""
    tmp = tmp_path_factory.mktemp("sweep")
    run = RunDir(f"{s3_bucket}/study")
    teachers = [{"label": "a", "model": tiny_model}]
    # One stage at a time until the kill, so the traces are what it interrupts; two in the job.
    path = sweep_file(tmp, run.uri, teachers, STUDENT, at_once=1)
    _, nodes = plan(load_sweep(path))
    traces = next(node.key for node in nodes.values() if node.command == "generate")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "W2SR_CACHE": str(tmp / "cache")}
    output = tmp / "killed-sweep.log"
    with open(output, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "w2sr.cli", "sweep", str(path)],
            env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    during = None
    try:
        deadline = time.time() + 600
        while not run.exists(traces, "_DONE.json"):
            alive = proc.poll() is None and time.time() < deadline
            assert alive, "no traces before the kill:\n" + output.read_text()[-3000:]
            if during is None and run.lease(traces) is not None:
                during = status(run.uri).stages
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = _done_records(run)
    sweep_file(tmp, run.uri, teachers, STUDENT)  # the cap is no stage's fingerprint

    port, dashboard = free_port(), free_port()
    ray_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the test session's, not the head's
        ray_env.pop(name, None)
    ray = str(Path(sys.executable).with_name("ray"))
    # Ports of its own for every agent: the test session's Ray runs beside it on default ones.
    agents = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
    ]
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=8", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats", *agents],
        env=ray_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while subprocess.run([ray, "job", "list", f"--address={address}"], env=ray_env,
                             capture_output=True).returncode:  # fmt: skip
            assert head.poll() is None and time.time() < deadline, "the head did not start"
            time.sleep(1)
        # The head's job agent comes up a little after its API: until then a submission is
        # refused ("No available agent") or its upload cut off (the agent closes the
        # connection), before any job exists, so it is safe to submit again.
        not_ready = ("No available agent", "RemoteDisconnected")
        for _ in range(30):
            submit = subprocess.run(
                [ray, "job", "submit", f"--address={address}", f"--working-dir={tmp / 'job'}",
                 "--", sys.executable, "-m", "w2sr.cli", "sweep", "sweep.yaml"],
                env=ray_env, capture_output=True, text=True, timeout=1200,
            )  # fmt: skip
            if not any(m in submit.stdout + submit.stderr for m in not_ready):
                break
            time.sleep(2)
        wrong_token = subprocess.run(
            [ray, "job", "list", f"--address={address}"],
            env={**ray_env, "RAY_AUTH_TOKEN": "not-the-token"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    return tmp, run, finished, submit, wrong_token, during


@pytest.mark.slow
def test_a_killed_sweep_resumes_through_ray_job_submit_and_redoes_nothing(study):
    tmp, run, finished, submit, wrong_token, _ = study
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in (submit.stdout + submit.stderr).lower()
    assert wrong_token.returncode != 0  # the head refuses a client with another token
    record = run.read_json("sweep", "summary.json")
    assert record["failures"] == []
    # A random teacher writes no correct trace: the W2SR-P cell has an empty set and is skipped.
    assert record["cells"] == {"a.student.all.s0": "complete", "a.student.correct.s0": "skipped"}
    stages = record["stages"]
    now = _done_records(run)
    for path, before in finished.items():  # what finished before the kill was not redone
        assert now[path] == before, path
        folder = path.rsplit("/", 1)[0]
        if folder in stages:
            assert stages[folder]["state"] == "complete", folder
    assert any(s["state"] == "done" for s in stages.values())  # the rest ran in the job
    assert len(run.list("traces")) == 1  # the teacher's traces once, for both cells
    # The engines' workers read the prompt set from the store and wrote their parts there; the
    # seals made them shard files, with no shared disk.
    (folder,) = [f"traces/{name}" for name in run.list("traces")]
    assert run.list(folder, suffix=".parquet") == [layout.trace_shard(0), layout.trace_shard(1)]
    assert run.list(folder, layout.PARTS) == []
    traces = layout.read_traces(run, folder)
    ids, samples = traces["prompt_id"].to_pylist(), traces["sample_index"].to_pylist()
    assert len(set(zip(ids, samples, strict=True))) == traces.num_rows == 6 * 2
    skipped = [k for k, s in stages.items() if s["state"] == "skipped"]
    assert sorted(k.split("/")[:2] for k in skipped) == [
        ["eval", "w2sr_p"],
        ["students", "correct"],
    ]
    report = run.read_text("report", "report.md")
    assert "| a | reasoner |" in report and "| W2SR |" in report
    # In MLflow, the sweep is a parent run with a child run per cell, named by its parameters.
    client = mlflow.MlflowClient(f"file://{tmp}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("w2sr").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "sweep-study"]
    children = {
        r.data.params["cell"]: r.data
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(record["cells"])
    cell = children["a.student.all.s0"]
    assert {k: cell.params[k] for k in ("teacher", "student", "variant", "seed", "match")} == {
        "teacher": "a", "student": "student", "variant": "all", "seed": "0", "match": "none"
    }  # fmt: skip
    assert 0 <= cell.metrics["pass_at_1"] <= 1 and cell.metrics["worker_hours"] > 0
    assert run.list("sweep", "groups", "a.student.s0") == ["summary.json"]
    # Built once, by the stages' own processes, published under its builder's digest, and copied
    # from the store into the node's cache by the workers that trained on it.
    cache = tmp / "cache"
    built = cache / "models" / _builtin_folder("tiny-random").relative_to(cache_dir())
    digest = builtin_digest("tiny-random")
    assert run.list("builtins", "tiny-random") == [digest]
    location = run.location(layout.builtin("tiny-random", digest), layout.MODEL)
    copied = cache / "artifacts" / hashlib.sha256(location.encode()).hexdigest()[:16]
    assert content_digest(copied) == content_digest(built)
    # gc on the study, where no hub cache and no built model are: nothing the cells need is
    # listed, and no identity is recomputed (nothing is built or hashed into the empty caches)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    gc = subprocess.run(
        [sys.executable, "-m", "w2sr.cli", "gc", run.uri],
        env={**os.environ, "HF_HUB_CACHE": str(elsewhere / "hub"),
             "W2SR_CACHE": str(elsewhere / "w2sr")},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert gc.returncode == 0, gc.stderr[-3000:]
    assert gc.stdout.splitlines() == ["0 items, 0 bytes would be removed (pass --delete)"]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.slow
def test_status_shows_every_stage_of_a_live_sweep_and_of_a_finished_one(study):
    tmp, run, _, _, _, during = study
    _, nodes = plan(load_sweep(tmp / "job" / "sweep.yaml"))
    assert during is not None, "the traces' lease was never seen"
    states = {s.stage: s for s in during}
    assert set(states) == set(nodes)
    (traces,) = [key for key, node in nodes.items() if node.command == "generate"]
    assert states[traces].state == "running"
    assert re.match(r"\d+ of \d+ shards, (about \S+ left, )?for ", states[traces].detail)
    waiting = [s for s in during if s.state == "waiting"]
    assert {s.command for s in waiting} == {"select", "train", "eval"}
    assert all(s.detail.startswith("on ") for s in waiting)

    after = status(run.uri)
    assert {s.stage for s in after.stages} == set(nodes)
    states = {s.stage: s.state for s in after.stages}
    assert {k for k, state in states.items() if state == "skipped"} == {
        k for k in nodes if k.startswith(("students/correct/", "eval/w2sr_p/"))
    }
    assert set(states.values()) == {"done", "skipped"}
    shown = table(after).splitlines()
    assert shown[-2].startswith(f"{len(nodes)} of {len(nodes)} stages finished")
    assert shown[-1] == "time left: none"
    evaluated = [s for s in after.stages if s.command == "eval" and s.state == "done"]
    assert evaluated and all(s.seconds is not None for s in evaluated)  # from the sweep's logs


def test_the_report_names_teacher_sizes_as_parameter_counts(tmp_path):
    """A row per cell with its teacher's size as models are named, and the scale figure."""
    data = {
        "base": base(tmp_path),
        "run_dir": str(tmp_path / "study"),
        "teachers": [
            {"label": "small", "model": "org/a", "scale": 7.48e-5},
            {"label": "large", "model": "org/b", "scale": 1.5},
            {"label": "direct", "model": "org/c", "kind": "non_reasoner", "scale": 7.0},
        ],
        "students": [{"label": "s", "model": "org/s"}],
        "variants": ["all"],
    }
    cells, _ = plan(SweepConfig.model_validate(data))
    rows = [
        CellRow(cell, p, (p - 0.1, p + 0.1), None, None, 0.01, cell.teacher.scale)
        for cell, p in zip(cells, (0.6, 0.9, 0.1), strict=True)
    ]
    facts = {"cells": 3, "stages": 9, "ran": 9, "complete": 0, "failed": 0, "blocked": 0,
             "wall_seconds": 60.0, "parallelism": 1.5, "max_concurrent": 2}  # fmt: skip
    run = RunDir(str(tmp_path / "study"))
    written = write_report(run, rows, facts, [])
    report = run.read_text("report", "report.md")
    assert "| Teacher | Kind | Parameters |" in report
    for line in ("| small | reasoner | 74.8K |", "| large | reasoner | 1.5B |",
                 "| direct | non_reasoner | 7.0B |"):  # fmt: skip
        assert line in report, line
    assert written["figures"] == ["sweep_teacher_scale.png"]
    assert (tmp_path / "study" / "report" / "sweep_teacher_scale.png").stat().st_size > 10_000
