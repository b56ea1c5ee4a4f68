"""`w2sr sweep`: the plan, and a small study run as users run it.

The end-to-end test runs two teachers x one student x three training sets on tiny models: first
with `w2sr sweep` on a local Ray it starts, SIGKILLed with its stages once a student is trained;
then resumed through `ray job submit` to a local head with token authentication, which must
redo nothing that finished; then with a third, broken teacher added, whose cells fail while the
others stay complete and reported.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from w2sr import lineage
from w2sr.cli import main
from w2sr.config import ConfigError
from w2sr.sweep.config import SweepConfig, load_sweep
from w2sr.sweep.plan import plan


def base(tmp: Path) -> dict:
    problems = tmp / "prompts.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
            for i in range(6)
        )  # fmt: skip
    )
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
        },
        "eval": {
            "benchmarks": [{"name": "offline", "limit": 4}],
            "samples": 1,
            "sampling": {"temperature": 0.0, "max_tokens": 8},
            "engine": engine,
            "bootstrap_resamples": 200,
        },
    }


def sweep_file(tmp: Path, teachers: list[dict], student: str) -> Path:
    """`job/sweep.yaml` and its `job/base.yaml`: the folder a job submission uploads."""
    (tmp / "job").mkdir(exist_ok=True)
    path = tmp / "job" / "sweep.yaml"
    (tmp / "job" / "base.yaml").write_text(yaml.safe_dump(base(tmp)))
    sweep = {
        "base": "base.yaml",
        "run_dir": str(tmp / "study"),
        "teachers": teachers,
        "students": [{"label": "student", "model": student}],
        "max_concurrent_stages": 3,
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
    assert generate.key == lineage.traces(generate.config).folder
    seeds = {cell.config.train.seed for cell in cells} | {cell.config.grpo.seed for cell in cells}
    assert seeds == {0, 1}


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
        ({"base": {**base(tmp_path), "train": {"lr": -1}}}, "cell a.s.all.s0: invalid config"),
        ({"base": {**base(tmp_path), "train": {"lr": -1}}}, "train.lr"),
    ]:
        path.write_text(yaml.safe_dump({**good, **bad}))
        with pytest.raises(ConfigError, match=message):
            plan(load_sweep(path))


# --- a study, run as users run it ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model, tiny_student):
    """The sweep killed midway, then resumed through `ray job submit` to a token-authenticated
    local head; returns (folder, what the kill left, the job's logs)."""
    tmp = tmp_path_factory.mktemp("sweep")
    other = tmp / "teacher-b"  # a second teacher: the tiny model with other weights
    from w2sr.models import build_tiny_model

    build_tiny_model(other, seed=7)
    teachers = [{"label": "a", "model": tiny_model}, {"label": "b", "model": str(other)}]
    path = sweep_file(tmp, teachers, tiny_student)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "w2sr.cli", "sweep", str(path)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    study_dir = tmp / "study"
    try:
        deadline = time.time() + 600
        while not list(study_dir.glob("students/*/*/_DONE.json")):
            assert proc.poll() is None and time.time() < deadline, "no student before the kill"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in study_dir.glob("*/**/_DONE.json")}

    port, dashboard = _free_port(), _free_port()
    ray_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray_env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=8", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats"],
        env=ray_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while subprocess.run([ray, "job", "list", f"--address={address}"], env=ray_env,
                             capture_output=True).returncode:  # fmt: skip
            assert head.poll() is None and time.time() < deadline, "the head did not start"
            time.sleep(1)
        submit = subprocess.run(
            [ray, "job", "submit", f"--address={address}", f"--working-dir={tmp / 'job'}", "--",
             sys.executable, "-m", "w2sr.cli", "sweep", "sweep.yaml"],
            env=ray_env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        without_token = subprocess.run(
            [ray, "job", "list", f"--address={address}"],
            env={**ray_env, "RAY_AUTH_TOKEN": "not-the-token"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    return tmp, finished, submit, without_token


@pytest.mark.slow
def test_a_killed_sweep_resumes_through_ray_job_submit_and_redoes_nothing(study):
    tmp, finished, submit, without_token = study
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in (submit.stdout + submit.stderr).lower()
    assert without_token.returncode != 0  # the head refuses a client without the token
    record = json.loads((tmp / "study" / "sweep" / "summary.json").read_text())
    assert record["failures"] == []
    # A random teacher writes no correct trace: the W2SR-P cells have an empty set, skipped.
    for cell, state in record["cells"].items():
        assert state == ("skipped" if ".correct." in cell else "complete"), (cell, state)
    stages = record["stages"]
    for path, mtime in finished.items():  # what finished before the kill was not redone
        assert path.stat().st_mtime_ns == mtime, path
        folder = str(path.parent.relative_to(tmp / "study"))
        if folder in stages:
            assert stages[folder]["state"] == "complete", folder
    assert any(s["state"] == "done" for s in stages.values())  # the rest ran in the job
    assert len(list((tmp / "study" / "traces").iterdir())) == 2  # each teacher's traces once
    skipped = [k for k, s in stages.items() if s["state"] == "skipped"]
    assert skipped and all(k.startswith(("students/correct/", "eval/w2sr_p/")) for k in skipped)


@pytest.mark.slow
def test_a_failing_teacher_fails_only_its_cells(study, tiny_model, tiny_student):
    tmp, _, _, _ = study
    broken = tmp / "teacher-broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    other = tmp / "teacher-b"
    teachers = [{"label": "a", "model": tiny_model}, {"label": "b", "model": str(other)},
                {"label": "broken", "model": str(broken), "kind": "non_reasoner"}]  # fmt: skip
    path = sweep_file(tmp, teachers, tiny_student)
    done = subprocess.run([sys.executable, "-m", "w2sr.cli", "sweep", str(path)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    record = json.loads((tmp / "study" / "sweep" / "summary.json").read_text())
    cells = record["cells"]
    assert {c for c, state in cells.items() if state == "failed"} == {
        f"broken.student.{v}.s0" for v in ("all", "correct", "incorrect")
    }
    assert all(state in ("complete", "skipped") for c, state in cells.items() if "broken" not in c)
    (failure,) = record["failures"]
    assert failure["command"] == "generate" and failure["error"]
    report = (tmp / "study" / "report" / "report.md").read_text()
    assert "## Failures" in report and "broken.student.all.s0" in report
    for teacher in ("a", "b"):
        assert f"| {teacher} | reasoner |" in report
    ran = [s for s in record["stages"].values() if s["state"] in ("done", "failed")]
    assert len(ran) == 1  # only the broken teacher's generation was tried again


@pytest.mark.slow
def test_the_plan_says_what_is_complete_without_starting_ray(study, capsys):
    tmp, _, _, _ = study  # after the failing teacher's sweep: its config is in job/sweep.yaml
    started = time.time()
    assert main(["sweep", str(tmp / "job" / "sweep.yaml"), "--plan"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert time.time() - started < 60
    broken = {f"broken.student.{v}.s0" for v in ("all", "correct", "incorrect")}
    to_run = [s for s in listed["stages"] if s["state"] == "to run"]
    assert to_run and all(set(s["cells"]) <= broken for s in to_run)
    assert listed["to_run"] == len(to_run) and listed["complete"] == len(listed["stages"]) - len(
        to_run
    )
    import ray

    assert not ray.is_initialized()
