"""The sweep's scheduler (`runner.run_graph`) with its stages run in this process.

The launcher here stands in for `w2sr` processes: each stage "runs" a short while, then writes
what the real stage leaves for the sweep (its done record, the sizes of the training sets, its
evaluation's result files, through the same writers) into a real run dir, or fails, hangs, or
exits as a stage another submission holds. So the order, the caps, failure isolation, leases,
timeouts, skips and resume are checked in seconds, with no Ray; the real path keeps its one
end-to-end test in test_sweep.py, and the subprocess launcher its tests of stopping and bounds in
test_waits.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from artifacts import sum_problems

from w2sr import cli, layout
from w2sr.evaluation.problems import load_problems
from w2sr.evaluation.results import plan_tasks, write_result
from w2sr.gc import find_garbage, record, recorded
from w2sr.recipe import (
    BLOCKED,
    COMPLETE,
    DONE,
    EXIT_FAILED,
    EXIT_LEASE_HELD,
    EXIT_OK,
    FAILED,
    SKIPPED,
    STAGES,
    sections,
)
from w2sr.rundir import DONE as DONE_RECORD
from w2sr.rundir import RunDir
from w2sr.session import resource_request
from w2sr.sweep import job, runner
from w2sr.sweep.config import SweepConfig
from w2sr.sweep.plan import Node, plan

TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "w2sr/engines/generator.py", line 1, in start\n'
    "ValueError: model type no-such-architecture is not supported"
)


def sweep_config(tmp: Path, teachers: tuple[str, ...] = ("a",), grpo: bool = True) -> SweepConfig:
    """Hub names that are never loaded: nothing here gets that far."""
    tmp.mkdir(exist_ok=True)
    problems = sum_problems(tmp)
    base: dict = {
        "prompts": {"source": {"type": "file", "path": str(problems)}},
        "eval": {
            "benchmarks": [{"name": "offline", "limit": 4}],
            "samples": 1,
            "bootstrap_resamples": 20,
        },
        "grpo": {} if grpo else None,
    }
    return SweepConfig.model_validate(
        {
            "base": base,
            "run_dir": str(tmp / "study"),
            "teachers": [
                {
                    "label": t,
                    "model": f"org/{t}",
                    "kind": "non_reasoner" if t == "broken" else "reasoner",
                }
                for t in teachers
            ],
            "students": [{"label": "student", "model": "org/s"}],
            "variants": ["all", "correct"],
        }
    )


def fails_for(teacher: str):
    """The stages of a teacher that cannot be loaded: its traces and its own evaluation."""
    return lambda node: (
        node.config.teacher == f"org/{teacher}"
        and (node.command == "generate" or node.label == "teacher")
    )


@dataclass
class InProcess:
    """A launcher whose stages run here. A stage named by `fail` exits 1 after printing a
    traceback, one in `hang` writes a shard and never ends on its own, one in `held` exits 3 for
    its first `held[key]` launches, as a stage whose lease a live submission holds."""

    run: RunDir
    cpus: float | None = None  # the session's capacity; None: a cluster
    seconds: float = 0.05
    fail: object = lambda node: False
    hang: tuple[str, ...] = ()
    held: dict[str, int] = field(default_factory=dict)
    empty: tuple[str, ...] = ("correct",)  # the training sets selection leaves empty
    asked: int = 0  # times the capacity was asked for: once per sweep with work to do
    launched: list[str] = field(default_factory=list)
    starts: dict[str, list[float]] = field(default_factory=dict)
    ends: dict[str, float] = field(default_factory=dict)  # of stages that exited 0
    running: dict[str, float] = field(default_factory=dict)  # key -> its CPU ask
    most: int = 0  # stages running at once, at most
    over: list[str] = field(default_factory=list)  # launched beyond the capacity, beside others
    stopped: list[str] = field(default_factory=list)

    def capacity(self, nodes: dict[str, Node]) -> float | None:
        self.asked += 1
        return self.cpus

    def launch(self, node: Node) -> Stage:
        ask = resource_request(node.config, sections(node.command))["CPU"]
        if self.cpus is not None and self.running and sum(self.running.values()) + ask > self.cpus:
            self.over.append(node.key)
        self.running[node.key] = ask
        self.most = max(self.most, len(self.running))
        self.launched.append(node.key)
        self.starts.setdefault(node.key, []).append(time.time())
        return Stage(self, node)

    def finish(self, node: Node) -> tuple[int, str]:
        del self.running[node.key]
        if self.fail(node):
            return EXIT_FAILED, f"loading the model\n{TRACEBACK}\n"
        if self.held.get(node.key, 0) > 0:
            self.held[node.key] -= 1
            return EXIT_LEASE_HELD, "w2sr: held by host:42:abcd (renewed 1s ago)\n"
        write_artifact(self.run, node, self.empty)
        self.ends[node.key] = time.time()
        return EXIT_OK, f"{node.command} {node.key} done\n"


class Stage:
    def __init__(self, launcher: InProcess, node: Node):
        self.launcher, self.node = launcher, node
        self.ends = time.time() + launcher.seconds
        self.status: int | None = None
        self.text = f"started {node.key}\n"
        if node.key in launcher.hang:  # work a rerun resumes
            launcher.run.write_text("partial", node.key, "shard-00000.txt")

    def poll(self) -> int | None:
        hangs = self.node.key in self.launcher.hang
        if self.status is None and not hangs and time.time() >= self.ends:
            self.status, printed = self.launcher.finish(self.node)
            self.text += printed
        return self.status

    def stop(self) -> None:
        del self.launcher.running[self.node.key]
        self.launcher.stopped.append(self.node.key)
        self.status = -15

    def output(self) -> str:
        return self.text


def write_artifact(run: RunDir, node: Node, empty: tuple[str, ...]) -> None:
    """What the node's stage leaves once done, as far as the sweep reads it."""
    cfg = node.config
    if node.command == "eval":
        problems = load_problems(cfg, run)
        tasks, _ = plan_tasks(cfg, labels=(node.label,))
        for task in tasks:
            rows = [
                {
                    "model": node.label,
                    "benchmark": task.bench.name,
                    "prompt_id": p["prompt_id"],
                    "problem": p["problem"],
                    "answer": p["answer"],
                    "prompt": p["problem"],
                    "sample_index": k,
                    "seed": k,
                    "response": "2",
                    "extracted_answer": "2",
                    "correct": i % 2 == 0,
                    "prompt_tokens": 4,
                    "completion_tokens": 1,
                    "finish_reason": "stop",
                }  # fmt: skip
                for i, p in enumerate(problems[task.bench.name].rows)
                for k in range(task.setting.samples)
            ]
            write_result(cfg, run, task, problems[task.bench.name], rows, "in-process")
        return
    artifact = STAGES[node.command].artifact(cfg)
    if node.command == "select":
        sizes = {v: {"traces": 0 if v in empty else 2} for v in layout.VARIANT_NAMES}
        run.write_json(sizes, artifact.folder, layout.SFT_SUMMARY)
    if node.command in ("train", "grpo"):
        run.write_json({"model_type": "qwen2"}, artifact.folder, layout.MODEL, "config.json")
    run.write_json({"fingerprint": artifact.fingerprint}, artifact.folder, DONE_RECORD)


@pytest.fixture(autouse=True)
def quick(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "POLL_S", 0.01)
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))


def needing(nodes: dict[str, Node], key: str) -> set[str]:
    """Every node that needs `key`, directly or through others."""
    out: set[str] = set()
    for k, node in nodes.items():  # needs come first
        if key in node.needs or out & set(node.needs):
            out.add(k)
    return out


def test_each_stage_starts_once_what_it_needs_is_done_and_the_study_completes(tmp_path, caplog):
    cfg = sweep_config(tmp_path)
    _, nodes = plan(cfg)
    run = RunDir(cfg.run_dir)
    stages = InProcess(run)
    with caplog.at_level("INFO", logger="w2sr.sweep.runner"):
        outcomes = runner.run_graph(nodes, run, 4, launcher=stages)
    assert set(outcomes) == set(nodes)
    # Each start and end says how far the study is; the last end, that it is through.
    tallies = [r.getMessage().split("; ", 1)[1] for r in caplog.records if "; " in r.getMessage()]
    assert len(tallies) == 2 * len(stages.launched)
    n = len(nodes)
    assert tallies[-1] == f"{n} of {n} stages finished, 0 running, 0 waiting, 0 failed or blocked"
    for key in stages.launched:
        for need in nodes[key].needs:
            assert stages.ends[need] <= stages.starts[key][0], (need, key)
    assert len(stages.launched) == len(set(stages.launched))  # each once
    # The W2SR-P set is empty: its student is skipped, unlaunched, and so is its evaluation.
    skipped = {k: o.error for k, o in outcomes.items() if o.state == SKIPPED}
    (train,) = [k for k in skipped if nodes[k].command == "train"]
    assert skipped[train] == "the correct training set is empty"
    assert {k for k in skipped if k != train} == needing(nodes, train)
    assert all(skipped[k] == "what it needs was skipped" for k in needing(nodes, train))
    assert not set(skipped) & set(stages.launched)
    ran = {k for k, o in outcomes.items() if o.state == DONE}
    assert ran == set(stages.launched) == set(nodes) - set(skipped)
    for key in ran:
        o = outcomes[key]
        assert o.started <= o.ended and o.seconds == pytest.approx(o.ended - o.started)
        assert run.read_text(*layout.sweep_log(key)).endswith(" done\n")
    assert stages.asked == 1
    # Rerun: everything is complete or skipped, nothing starts, and no cluster is asked for.
    again = InProcess(run)
    rerun = runner.run_graph(nodes, run, 4, launcher=again)
    assert {k: o.state for k, o in rerun.items()} == {
        k: COMPLETE if k in ran else SKIPPED for k in nodes
    }
    assert again.launched == [] and again.asked == 0


def test_the_longest_remaining_chain_starts_first(tmp_path):
    """One slot, two teachers: GRPO (the longest stage) and every generation (heads of the
    longest chains) start before any stage that waits on them, and the evaluations of teachers
    and bases, which end chains, start last."""
    cfg = sweep_config(tmp_path, teachers=("a", "b"))
    _, nodes = plan(cfg)
    plan_order = [nodes[k].command for k in nodes]
    assert plan_order.index("eval") < max(i for i, c in enumerate(plan_order) if c == "generate")
    run = RunDir(cfg.run_dir)
    stages = InProcess(run)
    runner.run_graph(nodes, run, 1, launcher=stages)
    order = [nodes[k].command for k in stages.launched]
    assert order[:3] == ["grpo", "generate", "generate"]
    assert order.index("eval") > max(i for i, c in enumerate(order) if c != "eval")
    # `--plan` lists the stages in that order (the skipped ones among them)
    listed = [s["stage"] for s in job.describe_plan(cfg)["stages"]]
    assert [key for key in listed if key in stages.launched] == stages.launched
    for key in stages.launched:
        for need in nodes[key].needs:
            assert stages.ends[need] <= stages.starts[key][0], (need, key)


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_no_more_stages_run_at_once_than_the_cap(tmp_path, monkeypatch, cap):
    cfg = sweep_config(tmp_path)
    _, nodes = plan(cfg)
    run = RunDir(cfg.run_dir)
    stages = InProcess(run, seconds=0.2)
    asked: list[str] = []  # the stages whose skip was read from the run dir
    read = runner.skip_reason
    monkeypatch.setattr(
        runner, "skip_reason", lambda node, r: asked.append(node.key) or read(node, r)
    )
    outcomes = runner.run_graph(nodes, run, cap, launcher=stages)
    assert stages.most == cap  # reached, never passed
    assert all(o.state in (DONE, SKIPPED) for o in outcomes.values())
    assert sorted(asked) == sorted(set(asked))  # once each, however long it waited for a slot


def test_a_session_of_fixed_size_runs_only_what_fits_beside_the_running(tmp_path):
    cfg = sweep_config(tmp_path)
    _, nodes = plan(cfg)
    asks = {resource_request(n.config, sections(n.command))["CPU"] for n in nodes.values()}
    assert asks == {0, 1, 2}  # the sets ask for none, traces and evaluations 1, trainings 2
    run = RunDir(cfg.run_dir)
    # Two 1-CPU stages fit side by side, a training only beside what asks for none (a set's
    # selection may run beside either)
    stages = InProcess(run, cpus=2, seconds=0.2)
    outcomes = runner.run_graph(nodes, run, 10, launcher=stages)
    assert stages.over == [] and stages.most >= 2
    assert all(o.state in (DONE, SKIPPED) for o in outcomes.values())
    # A stage larger than the session still runs, alone: it was checked to fit a session before
    # the sweep started (`check_local_resources`).
    cfg = sweep_config(tmp_path / "small")
    _, nodes = plan(cfg)
    run = RunDir(cfg.run_dir)
    stages = InProcess(run, cpus=0.5, seconds=0.05)
    outcomes = runner.run_graph(nodes, run, 10, launcher=stages)
    assert stages.most == 1 and all(o.state in (DONE, SKIPPED) for o in outcomes.values())


def test_a_failing_stage_blocks_only_what_needs_it(tmp_path):
    cfg = sweep_config(tmp_path, teachers=("a", "broken"))
    cells, nodes = plan(cfg)
    run = RunDir(cfg.run_dir)
    stages = InProcess(run, fail=fails_for("broken"))
    outcomes = runner.run_graph(nodes, run, 3, launcher=stages)
    failed = {k for k, o in outcomes.items() if o.state == FAILED}
    assert {nodes[k].command for k in failed} == {"generate", "eval"} and len(failed) == 2
    assert all(outcomes[k].error == TRACEBACK for k in failed)  # the log's last traceback
    (traces,) = [k for k in failed if nodes[k].command == "generate"]
    blocked = {k: o.error for k, o in outcomes.items() if o.state == BLOCKED}
    assert set(blocked) == needing(nodes, traces) - {
        k for k, o in outcomes.items() if o.state == SKIPPED
    }
    for key, error in blocked.items():
        assert error == "needs " + ", ".join(
            n for n in nodes[key].needs if n in failed | set(blocked)
        )
    assert not set(blocked) & set(stages.launched)
    # Every other stage ran: the other teacher's cells, and what the two share (the student's
    # base model, its GRPO baseline)
    broken = {c.name for c in cells if c.teacher.label == "broken"}
    others = [k for k, node in nodes.items() if not set(node.cells) <= broken]
    assert others and all(outcomes[k].state in (DONE, SKIPPED) for k in others)
    assert any(len(nodes[k].cells) == len(cells) for k in others)  # shared with broken cells


def test_a_stage_held_by_another_submission_is_retried_then_blocked_naming_the_holder(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(runner, "LEASE_WAIT_S", 0.5)
    monkeypatch.setattr(runner, "LEASE_RETRY_S", 0.2)
    cfg = sweep_config(tmp_path, grpo=False)
    _, nodes = plan(cfg)
    run = RunDir(cfg.run_dir)
    train = next(k for k, n in nodes.items() if n.command == "train" and n.label is None)
    traces = next(k for k, n in nodes.items() if n.command == "generate")
    # The traces' holder lets go after one refusal; the student's never does.
    stages = InProcess(run, held={traces: 1, train: 100})
    outcomes = runner.run_graph(nodes, run, 2, launcher=stages)
    assert outcomes[traces].state == DONE and len(stages.starts[traces]) == 2
    starts = stages.starts[train]
    assert len(starts) >= 2  # retried while the bound lasted, each retry after LEASE_RETRY_S
    assert all(b - a >= 0.2 for a, b in zip(starts, starts[1:], strict=False))
    held = outcomes[train]
    assert held.state == BLOCKED
    assert held.error.startswith(f"{train} is still held by another submission after ")
    assert "(LEASE_WAIT_S 0.5s): held by host:42:abcd (renewed 1s ago)" in held.error
    assert time.time() - starts[0] < 5  # given up at the bound, not after the holder's work
    for key in needing(nodes, train):
        assert outcomes[key].state == BLOCKED and outcomes[key].error == f"needs {train}"


def test_a_stage_past_the_timeout_is_stopped_failed_and_resumed_by_a_rerun(tmp_path):
    cfg = sweep_config(tmp_path, grpo=False)
    _, nodes = plan(cfg)
    run = RunDir(cfg.run_dir)
    traces = next(k for k, n in nodes.items() if n.command == "generate")
    stages = InProcess(run, hang=(traces,))
    started = time.time()
    outcomes = runner.run_graph(nodes, run, 2, stage_timeout_s=0.5, launcher=stages)
    assert time.time() - started < 10
    assert stages.stopped == [traces]
    overdue = outcomes[traces]
    assert overdue.state == FAILED and 0.5 <= overdue.seconds < 5
    assert overdue.error == (
        f"{traces} ran past the sweep's stage_timeout_s of 0.5s and was stopped; what it wrote "
        "is kept, and a rerun resumes it"
    )
    log = run.read_text(*layout.sweep_log(traces))
    assert log.startswith(f"started {traces}\n") and overdue.error in log
    assert run.read_text(traces, "shard-00000.txt") == "partial"
    for key in needing(nodes, traces):
        assert outcomes[key].state == BLOCKED
    done = {k for k, o in outcomes.items() if o.state == DONE}
    assert done  # the evaluations of the models that need no traces
    # The rerun redoes only what did not finish: the traces and what needs them.
    again = InProcess(run)
    rerun = runner.run_graph(nodes, run, 2, stage_timeout_s=0.5, launcher=again)
    assert set(again.launched) == {traces} | (needing(nodes, traces) - {
        k for k, o in rerun.items() if o.state == SKIPPED
    })  # fmt: skip
    assert all(rerun[k].state == COMPLETE for k in done)
    assert all(o.state in (COMPLETE, DONE, SKIPPED) for o in rerun.values())


def test_a_failing_teacher_fails_only_its_cells_in_the_summary_report_and_plan(
    tmp_path, monkeypatch, capsys
):
    """`w2sr sweep` on a study whose teacher `a` is complete, with a teacher added that cannot be
    loaded: only its cells fail, nothing else is redone, and the plan then has only its stages
    to run."""
    launchers: list[InProcess] = []

    def run_graph(nodes, run, max_concurrent, stage_timeout_s=None):
        launchers.append(InProcess(run, fail=fails_for("broken")))
        return runner.run_graph(nodes, run, max_concurrent, stage_timeout_s, launchers[-1])

    monkeypatch.setattr(job, "run_graph", run_graph)  # the sweep with its stages in this process
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = tmp_path / "sweep.yaml"
    cfg = sweep_config(tmp_path)
    cfg.base["ray"] = {"num_cpus": 4}
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert cli.main(["sweep", str(path)]) == EXIT_OK
    run = RunDir(cfg.run_dir)
    before = done_records(run)
    cfg = sweep_config(tmp_path, teachers=("a", "broken"))
    cfg.base["ray"] = {"num_cpus": 4}
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert cli.main(["sweep", str(path)]) == EXIT_FAILED
    capsys.readouterr()

    summary = run.read_json(*layout.SWEEP_SUMMARY)
    assert summary["cells"] == {
        "a.student.all.s0": "complete",
        "a.student.correct.s0": "skipped",
        "broken.student.all.s0": "failed",
        "broken.student.correct.s0": "failed",
    }
    failed = {f["command"]: f for f in summary["failures"]}
    assert set(failed) == {"generate", "eval"}  # its traces, and the teacher's own evaluation
    assert all(f["error"] == TRACEBACK for f in failed.values())
    assert sorted(failed["generate"]["cells"]) == [
        "broken.student.all.s0",
        "broken.student.correct.s0",
    ]
    ran = [k for k, s in summary["stages"].items() if s["state"] in (DONE, FAILED)]
    assert sorted(ran) == sorted(f["stage"] for f in summary["failures"])  # nothing else redone
    assert sorted(ran) == sorted(launchers[-1].launched)
    assert done_records(run) == before
    report = run.read_text(*layout.REPORT_FILE)
    assert "## Failures" in report and "broken.student.all.s0" in report
    assert "| a | reasoner |" in report and "| broken | non_reasoner |" in report

    # The plan, where no Ray can be reached: only the broken teacher's stages are to run.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # nothing listens there
    started = time.time()
    listed = job.describe_plan(cfg)
    assert time.time() - started < 60
    to_run = [s for s in listed["stages"] if s["state"] == "to run"]
    broken = {"broken.student.all.s0", "broken.student.correct.s0"}
    assert to_run and all(set(s["cells"]) <= broken for s in to_run)
    assert listed["to_run"] == len(to_run)
    assert listed["complete"] + listed["skipped"] + len(to_run) == len(listed["stages"])

    # gc: the run dir's own lineage record is the broken teacher's last command's, yet the
    # sweep's record keeps what every cell needs
    last = next(c for c in plan(cfg)[0] if c.teacher.label == "broken").config
    run.write_json(record(last).to_json(), layout.LINEAGE)
    assert find_garbage(run, recorded(run)) == []
    assert find_garbage(run, record(last))  # without the sweep's record, teacher a's work


def done_records(run: RunDir) -> dict[str, tuple[float, str]]:
    """Every done record under the run dir with its modification time."""
    return {
        str(path.relative_to(run.uri)): (path.stat().st_mtime, path.read_text())
        for path in Path(run.uri).rglob(DONE_RECORD)
    }
