"""Artifacts addressed by fingerprint: a changed config writes beside the old artifacts, and
`w2sr gc` lists, then on request removes, only what no kept config refers to."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import huggingface_hub
import yaml
from artifacts import prepared_problems, trained_student

from w2sr import layout
from w2sr.cli import main
from w2sr.config import ExperimentConfig, validate
from w2sr.evaluation.problems import load_problems
from w2sr.evaluation.results import plan_tasks, sample_rows, scorer, write_result
from w2sr.identity import model_identity
from w2sr.lineage import Lineage
from w2sr.rundir import LEASE, RunDir
from w2sr.sweep.config import SweepConfig
from w2sr.sweep.job import write_lineage
from w2sr.sweep.plan import is_complete, plan


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
    assert Lineage(steps).traces == Lineage(base).traces  # SFT settings leave the traces alone
    assert Lineage(steps).student("all") != Lineage(base).student("all")
    assert Lineage(base).student("all") != Lineage(base).student("correct")
    assert Lineage(teacher).traces != Lineage(base).traces  # through the teacher's prompts
    assert Lineage(teacher).student("all") != Lineage(base).student("all")
    assert Lineage(teacher).problems == Lineage(base).problems
    assert Lineage(teacher).rl == Lineage(base).rl  # GRPO never sees the teacher
    assert Lineage(steps).rl == Lineage(base).rl
    folder = Lineage(base).student("all").folder
    assert folder == f"students/all/{Lineage(base).student('all').fingerprint}"
    assert set(Lineage(base).trained) == {"w2sr", "w2sr_p", "w2sr_n", "rl"}
    assert set(Lineage(validate({**experiment(tmp_path), "grpo": None})).trained) == {
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
    replies = f"{layout.EVAL}/base/amc23-{'3' * 16}{layout.EVAL_PARTIAL}"  # a killed endpoint's
    run.write_text("[]", replies)
    (asked,), _ = plan_tasks(real, labels=("teacher",))  # the kept config's, under way
    partial = layout.eval_partial(asked.model.label, asked.bench.name, asked.fingerprint)
    run.write_text("[]", *partial)
    run.write_json({}, *layout.EVAL_SUMMARY)  # a file among the labels' folders
    published = layout.builtin("tiny-random", "4" * 16)  # a built-in no config names
    run.write_text("{}", published, layout.MODEL, "config.json")
    config = tmp_path / "real.yaml"
    config.write_text(yaml.safe_dump(data))

    assert main(["gc", real.run_dir, "--keep", str(config)]) == 0
    listed = capsys.readouterr().out.splitlines()
    size = run.size(dropped)
    assert listed == [
        f"complete   {size:>14,d}  {dropped}",
        f"unfinished {1:>14,d}  {unfinished}",
        f"unfinished {2:>14,d}  {published}",
        f"unfinished {2:>14,d}  {parts}",
        f"unfinished {2:>14,d}  {replies}",
        f"temporary  {4:>14,d}  {kept}/model.tmp-0badf00d",
        f"6 items, {size + 11:,d} bytes would be removed (pass --delete)",
    ]
    assert run.exists(dropped, "model", "config.json")  # listing removes nothing

    assert main(["gc", real.run_dir, "--keep", str(config), "--delete"]) == 0
    assert not run.exists(dropped) and not run.exists(unfinished) and not run.exists(parts)
    assert not run.exists(published) and not run.exists(replies)
    assert not run.exists(kept, "model.tmp-0badf00d")
    assert run.exists(kept, "model", "config.json") and run.exists(kept, "_DONE.json")
    assert run.exists(busy, LEASE) and run.exists(kept, "metrics.jsonl.tmp-12345678")
    assert run.list(layout.EVAL, "teacher") == [partial[-1]]
    assert partial[-1].endswith(".partial.json")


def test_gc_needs_a_config_to_keep(tmp_path, capsys):
    RunDir(str(tmp_path / "run"))
    assert main(["gc", str(tmp_path / "run")]) == 2
    assert "has no config.yaml; name the configs to keep with --keep" in capsys.readouterr().err


# --- what a run dir records: a sweep's cells, identities as resolved where the work ran ---------


def finish(cfg: ExperimentConfig, command: str, label: str | None = None) -> None:
    """What a command leaves in the run dir, written by hand at the folders the config's lineage
    names: a stage's folder and done record, or one model's results as `w2sr eval` writes them."""
    run = RunDir(cfg.run_dir)
    if command == "generate":
        prepared_problems(cfg, ["What is 1 + 1?", "What is 2 + 2?"])
        for artifact, name in ((Lineage(cfg).prompts, layout.PROMPT_SET),
                               (Lineage(cfg).traces, layout.trace_shard(0))):  # fmt: skip
            run.write_text("rows", artifact.folder, name)
            run.mark_done(artifact.folder, artifact.fingerprint)
    elif command == "select":
        sets = Lineage(cfg).sft
        summary = {variant: {"traces": 2} for variant in layout.VARIANT_NAMES}
        run.write_json(summary, sets.folder, layout.SFT_SUMMARY)
        run.mark_done(sets.folder, sets.fingerprint)
    elif command == "train":
        trained_student(cfg, cfg.train.variant)
    else:
        problems, score = load_problems(cfg, run), scorer(cfg, label)
        for task in plan_tasks(cfg, labels=(label,))[0]:
            posed = problems[task.bench.name]
            replies = [{**row, "response": "\\boxed{2}", "finish_reason": "stop"}
                       for row in sample_rows(cfg, task, posed)]  # fmt: skip
            write_result(cfg, run, task, posed, [score(r) for r in replies], "offline")


def as_the_cli_writes_it(cfg: ExperimentConfig, tmp_path: Path, capsys) -> Path:
    """A stage's command on a complete stage: it records its config, finds its work done, exits."""
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["select", str(path)]) == 0
    capsys.readouterr()
    return path


def test_gc_on_a_sweep_run_dir_keeps_every_cell(tmp_path, capsys, monkeypatch):
    """Two teachers x one student x one set, as a finished sweep leaves them: the run dir's
    config.yaml is one cell's, the last stage's; gc removes nothing any cell needs."""
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))  # the built-in student's
    sweep = SweepConfig.model_validate(
        {
            "base": {"eval": {"benchmarks": [{"name": "offline", "limit": 2}], "samples": 1}},
            "run_dir": str(tmp_path / "study"),
            "teachers": [{"label": "a", "model": "org/a"}, {"label": "b", "model": "org/b"}],
            "students": [{"label": "s", "model": "builtin:tiny-random"}],
            "variants": ["all"],
        }
    )
    cells, nodes = plan(sweep)
    run = RunDir(sweep.run_dir)
    write_lineage(run, cells)  # as `w2sr sweep` does before its first stage
    for node in nodes.values():
        finish(node.config, node.command, node.label)
    (student,) = Lineage(cells[0].config).builtins  # published for the nodes of a cluster
    run.write_text("{}", student.folder, layout.MODEL, "config.json")
    run.mark_done(student.folder, student.fingerprint)
    as_the_cli_writes_it(cells[0].config, tmp_path, capsys)
    # What the sweep does not need: a smoke test's student, an older build of the built-in; and
    # a stage and an evaluation other submissions are at work on.
    smoke = cells[0].config.model_copy(
        update={"train": cells[0].config.train.model_copy(update={"max_steps": 10})}
    )
    stale = trained_student(smoke, "all")
    older = layout.builtin("tiny-random", "5" * 16)
    run.write_text("{}", older, layout.MODEL, "config.json")
    run.mark_done(older, "5" * 16)
    lease = {"owner": "other:1:x", "heartbeat": time.time(), "ttl_s": 60.0}
    busy = layout.traces("6" * 16)
    run.write_json(lease, busy, LEASE)
    evaluating = f"{layout.EVAL}/extra/{layout.PARTS}/offline-{'7' * 16}"  # of another config
    run.write_text("ab", evaluating, "part-0.parquet")
    run.write_json(lease, layout.EVAL, "extra", LEASE)

    assert main(["gc", sweep.run_dir]) == 0
    listed = capsys.readouterr().out.splitlines()
    sizes = run.size(stale) + run.size(older)
    assert listed == [
        f"complete   {run.size(stale):>14,d}  {stale}",
        f"complete   {run.size(older):>14,d}  {older}",
        f"2 items, {sizes:,d} bytes would be removed (pass --delete)",
    ]
    assert main(["gc", sweep.run_dir, "--delete"]) == 0
    assert not run.exists(stale) and not run.exists(older) and run.exists(busy, LEASE)
    assert run.exists(evaluating, "part-0.parquet")
    assert all(is_complete(node, run) for node in nodes.values())  # the sweep has nothing to do
    for cell in cells:
        for artifact in (Lineage(cell.config).problems, Lineage(cell.config).prompts):
            assert run.done(artifact.folder, artifact.fingerprint)  # done by no node of its own
    assert run.done(student.folder, student.fingerprint)


def hub_snapshot(cache: Path, repo: str, revision: str) -> None:
    """A model in a hub cache, laid out as `huggingface_hub` downloads it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / revision).mkdir(parents=True)
    (folder / "snapshots" / revision / "config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)


def test_gc_decides_from_what_the_run_recorded_not_from_this_hub_cache(
    tmp_path, capsys, monkeypatch
):
    """Hub ids are known by the revision the hub cache resolves; gc run where that cache is
    gone (another machine, a cleared cache) still keeps the run's work, and a config given to
    keep that resolves to nothing there is refused."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at import
    for repo in ("org/teacher", "org/student"):
        hub_snapshot(hub, repo, "ab" * 20)
    cfg = validate({**experiment(tmp_path), "grpo": None})
    assert model_identity("org/teacher") == f"org/teacher@{'ab' * 20}"
    for command, label in [("generate", None), ("select", None), ("train", None),
                           ("eval", "teacher"), ("eval", "base"), ("eval", "w2sr")]:  # fmt: skip
        finish(cfg, command, label)
    path = as_the_cli_writes_it(cfg, tmp_path, capsys)
    recorded = Lineage(cfg).prompts
    shutil.rmtree(hub)
    hub.mkdir()
    assert Lineage(cfg).prompts != recorded  # recomputed here, the identities name other folders

    assert main(["gc", cfg.run_dir]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "0 items, 0 bytes would be removed (pass --delete)"
    ]
    assert main(["gc", cfg.run_dir, "--keep", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"--keep {path}: its models' folders and results resolve to nothing in" in error
    assert len(error.strip().splitlines()) == 1
