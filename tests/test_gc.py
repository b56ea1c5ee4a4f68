"""Artifacts addressed by fingerprint: a changed config writes beside the old artifacts, and
`w2sr gc` lists, then on request removes, only what no kept config refers to."""

from __future__ import annotations

import os
import time

import yaml
from artifacts import trained_student

from w2sr import layout, lineage
from w2sr.cli import main
from w2sr.config import validate
from w2sr.rundir import LEASE, RunDir


def experiment(tmp_path, **extra) -> dict:
    return {
        "run_dir": str(tmp_path / "run"),
        "teacher": "org/teacher",
        "student": "org/student",
        "grpo": {},
        **extra,
    }


def test_each_stage_is_addressed_by_what_decides_it(tmp_path):
    base = validate(experiment(tmp_path))
    steps = validate(experiment(tmp_path, train={"max_steps": 10}))
    teacher = validate({**experiment(tmp_path), "teacher": "org/other-teacher"})
    assert lineage.traces(steps) == lineage.traces(base)  # SFT settings leave the traces alone
    assert lineage.student(steps, "all") != lineage.student(base, "all")
    assert lineage.student(base, "all") != lineage.student(base, "correct")
    assert lineage.traces(teacher) != lineage.traces(base)  # through the teacher's prompts
    assert lineage.student(teacher, "all") != lineage.student(base, "all")
    assert lineage.problems(teacher) == lineage.problems(base)
    assert lineage.rl(teacher) == lineage.rl(base)  # GRPO never sees the teacher
    assert lineage.rl(steps) == lineage.rl(base)
    folder = lineage.student(base, "all").folder
    assert folder == f"students/all/{lineage.student(base, 'all').fingerprint}"
    assert set(lineage.trained(base)) == {"w2sr", "w2sr_p", "w2sr_n", "rl"}
    assert set(lineage.trained(validate({**experiment(tmp_path), "grpo": None}))) == {
        "w2sr",
        "w2sr_p",
        "w2sr_n",
    }


def test_gc_lists_then_removes_only_what_no_kept_config_refers_to(tmp_path, capsys):
    data = experiment(tmp_path)
    real, smoke = validate(data), validate(experiment(tmp_path, train={"max_steps": 10}))
    kept = trained_student(real, "all", wall_seconds=3.0)
    dropped = trained_student(smoke, "all", wall_seconds=1.0)  # a smoke test on the same run dir
    run = RunDir(real.run_dir)
    unfinished = layout.student("correct", "0" * 16)
    run.write_text("x", unfinished, "metrics.jsonl")  # an attempt of some config, never finished
    busy = layout.student("incorrect", "1" * 16)
    run.write_json({"owner": "other:1:x", "heartbeat": time.time(), "ttl_s": 60.0}, busy, LEASE)
    run.write_text("half", kept, "model.tmp-0badf00d")  # a killed write, an hour old
    old = time.time() - 7200
    os.utime(run.path(kept, "model.tmp-0badf00d"), (old, old))
    run.write_text("now", kept, "metrics.jsonl.tmp-12345678")  # a write under way
    parts = f"{layout.EVAL}/base/{layout.PARTS}/amc23-{'2' * 16}"  # a killed evaluation's
    run.write_text("ab", parts, "part-0.parquet")
    run.write_json({}, *layout.EVAL_SUMMARY)  # a file among the labels' folders
    config = tmp_path / "real.yaml"
    config.write_text(yaml.safe_dump(data))

    assert main(["gc", real.run_dir, "--keep", str(config)]) == 0
    listed = capsys.readouterr().out.splitlines()
    size = run.size(dropped)
    assert listed == [
        f"complete   {size:>14,d}  {dropped}",
        f"unfinished {1:>14,d}  {unfinished}",
        f"unfinished {2:>14,d}  {parts}",
        f"temporary  {4:>14,d}  {kept}/model.tmp-0badf00d",
        f"4 items, {size + 7:,d} bytes would be removed (pass --delete)",
    ]
    assert run.exists(dropped, "model", "config.json")  # listing removes nothing

    assert main(["gc", real.run_dir, "--keep", str(config), "--delete"]) == 0
    assert not run.exists(dropped) and not run.exists(unfinished) and not run.exists(parts)
    assert not run.exists(kept, "model.tmp-0badf00d")
    assert run.exists(kept, "model", "config.json") and run.exists(kept, "_DONE.json")
    assert run.exists(busy, LEASE) and run.exists(kept, "metrics.jsonl.tmp-12345678")


def test_gc_needs_a_config_to_keep(tmp_path, capsys):
    RunDir(str(tmp_path / "run"))
    assert main(["gc", str(tmp_path / "run")]) == 2
    assert "has no config.yaml; name the configs to keep with --keep" in capsys.readouterr().err
