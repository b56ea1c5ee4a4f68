"""The run directory's layout: every artifact's path, named once, and the fingerprint recipe.

Stages exchange artifacts, not objects: each stage reads what earlier stages wrote through the
names below and never imports another stage. Every stage writes into a folder named by its
fingerprint (`w2sr.lineage` computes them from a config), so artifacts of different configs live
side by side and nothing finished is replaced; `w2sr gc` removes what no recorded config refers to.

    config.yaml                         the resolved config of the latest command
    lineage.json                        what that config refers to (folders, results), as
                                        computed when it ran: what `w2sr gc` keeps
    problems/<fp>/problems.parquet      the validated problem set
    problems/<fp>/rejected.parquet      source rows set aside, with the reason
    prompts/<fp>/prompts.parquet        the problems rendered for the teacher, in shards
    prompts/<fp>/rejected.parquet       problems whose prompt leaves no room to answer
    traces/<fp>/shard-NNNNN.parquet     graded teacher traces, one file per prompt shard
    traces/<fp>/_parts/shard-NNNNN/     a shard's rows as workers wrote them, until it is sealed
    sft/<fp>/{all,correct,incorrect}.parquet, sft/<fp>/summary.json
                                        the W2SR, W2SR-P and W2SR-N training sets
    students/{variant}/<fp>/model       a fine-tuned student (HF folder), with metrics.jsonl
                                        and Ray Train checkpoints under ray/
    students/{variant}/<fp>/profile-step-N.txt
                                        torch's profile of step N (`train.profile_step`)
    rl/<fp>/model                       the GRPO student, likewise
    builtins/<name>/<digest>/model      a built-in model as every node reads it (object stores)
    eval/{label}/{benchmark}-{fp}.parquet
                                        one model on one benchmark, k graded samples per problem
    eval/{label}/_parts/{benchmark}-{fp}/
                                        its rows as workers wrote them, until it is sealed
    eval/{label}/{benchmark}-{fp}.partial.json
                                        an endpoint evaluation's replies so far, likewise
    eval/{label}/_LEASE.json            who evaluates the model now
    eval/summary.json                   written last by `w2sr eval`
    report/report.md, report/*.png      `w2sr report`
    report/judge/labels.jsonl           a judge model's behavior labels (`report.behaviors`)
    logs/<stage>.log                    a stage's output, every attempt appended (`w2sr.console`):
                                        named by its folder (`traces-<fp>`, `students-all-<fp>`),
                                        or `eval[-<labels>]`, `report`
    sweep/sweep.yaml                    `w2sr sweep`: its config, as run (`w2sr.sweep.job`)
    sweep/lineage.json                  what all its cells refer to, like lineage.json
    sweep/logs/<stage>.log              each of its stages' output
    sweep/groups/<group>/summary.json   the evaluation summary of one (teacher, student, seed)
    sweep/summary.json                  every stage's and cell's state, failures with their error
    <stage folder>/_DONE.json           written last: the stage's fingerprint and counts
    <stage folder>/_RUN.json            what the stage's attempts have cost so far
    <stage folder>/_LEASE.json          who works on the stage now
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from w2sr.rundir import RunDir
from w2sr.schemas import TRACE_SCHEMA

CONFIG = "config.yaml"
LINEAGE = "lineage.json"
SWEEP = "sweep"
SWEEP_CONFIG = (SWEEP, "sweep.yaml")
SWEEP_LINEAGE = (SWEEP, "lineage.json")
SWEEP_SUMMARY = (SWEEP, "summary.json")
SWEEP_LOGS = (SWEEP, "logs")

PROBLEMS = "problems"
PROMPTS = "prompts"
TRACES = "traces"
SFT = "sft"
STUDENTS = "students"
RL = "rl"
BUILTINS = "builtins"
LOGS = "logs"
STAGE_ROOTS = (PROBLEMS, PROMPTS, TRACES, SFT, STUDENTS, RL)  # where fingerprinted folders live

PROBLEM_SET = "problems.parquet"
PROMPT_SET = "prompts.parquet"
REJECTED = "rejected.parquet"
SFT_SUMMARY = "summary.json"
MODEL = "model"  # the Hugging Face folder a training stage exports
CHECKPOINTS = "ray"  # a training stage's Ray Train storage
EVAL = "eval"
PARTS = "_parts"  # results written by the workers, not yet sealed into their artifact
EVAL_PARTIAL = ".partial.json"  # an endpoint evaluation's replies, beside its result's name
EVAL_SUMMARY = (EVAL, "summary.json")
REPORT = "report"
REPORT_FILE = (REPORT, "report.md")
JUDGE_LABELS = (REPORT, "judge", "labels.jsonl")


def problems(fingerprint: str) -> str:
    return f"{PROBLEMS}/{fingerprint}"


def prompts(fingerprint: str) -> str:
    return f"{PROMPTS}/{fingerprint}"


def traces(fingerprint: str) -> str:
    return f"{TRACES}/{fingerprint}"


def sft(fingerprint: str) -> str:
    return f"{SFT}/{fingerprint}"


def student(variant: str, fingerprint: str) -> str:
    """The folder of the student trained on one SFT set."""
    return f"{STUDENTS}/{variant}/{fingerprint}"


def rl(fingerprint: str) -> str:
    return f"{RL}/{fingerprint}"


def builtin(name: str, digest: str) -> str:
    """A built-in model published for the cluster, named by its content."""
    return f"{BUILTINS}/{name}/{digest}"


def report_figure(name: str) -> tuple[str, str]:
    """A figure of a run's or a sweep's report, beside its report.md."""
    return (REPORT, name)


def stage_log(name: str) -> tuple[str, str]:
    """The output of one stage of a command (`w2sr.console`)."""
    return (LOGS, f"{name.replace(' ', '-').replace('/', '-')}.log")


def sweep_log(key: str) -> tuple[str, str, str]:
    """The output of one stage of a sweep (`key`: its node, a stage folder or an evaluation)."""
    return (*SWEEP_LOGS, f"{key.replace('/', '_')}.log")


def sweep_group_summary(group: str) -> tuple[str, str, str, str]:
    """The evaluation summary of one (teacher, student, seed) group of a sweep's cells."""
    return (SWEEP, "groups", group, "summary.json")


def step_profile(step: int) -> str:
    """A training stage's profile of one step (`profile_step`), in its folder."""
    return f"profile-step-{step}.txt"


def trace_shard(shard: int) -> str:
    return f"{shard_name(shard)}.parquet"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def sft_set(variant: str) -> str:
    return f"{variant}.parquet"


def eval_folder(label: str) -> str:
    """One model's results, the samples its evaluation has written so far, and its lease."""
    return f"{EVAL}/{label}"


def eval_result(label: str, benchmark: str, fingerprint: str) -> tuple[str, str, str]:
    return (EVAL, label, f"{eval_name(benchmark, fingerprint)}.parquet")


def eval_partial(label: str, benchmark: str, fingerprint: str) -> tuple[str, str, str]:
    """An endpoint evaluation's replies so far, beside the result they will become."""
    return (EVAL, label, f"{eval_name(benchmark, fingerprint)}{EVAL_PARTIAL}")


def eval_name(benchmark: str, fingerprint: str) -> str:
    return f"{benchmark}-{fingerprint}"


# --- the training sets and the models of a run -----------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One of the paper's three training sets and the student trained on it."""

    name: str  # `train.variant` and the SFT set's file name
    label: str  # the student's label in evaluation, serving and reports
    display: str  # the paper's name
    correct: bool | None  # the traces it keeps: all (None), correct only, incorrect only


VARIANTS = (
    Variant("all", "w2sr", "W2SR", None),
    Variant("correct", "w2sr_p", "W2SR-P", True),
    Variant("incorrect", "w2sr_n", "W2SR-N", False),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
STUDENT_LABELS = tuple(v.label for v in VARIANTS)

# The models of a run by label, in the paper's row order, with their display names.
DISPLAY_NAMES = {
    "teacher": "Teacher",
    "base": "Base student",
    **{v.label: v.display for v in VARIANTS},
    "rl": "RL (GRPO)",
}
RUN_LABELS = tuple(DISPLAY_NAMES)


# --- fingerprints ----------------------------------------------------------------------------


def fingerprint(fields: dict[str, Any], *inputs: str) -> str:
    """A stage's fingerprint: its own config fields plus the fingerprints of the artifacts it
    reads, so a change anywhere upstream reaches every stage below it."""
    data = json.dumps({"fields": fields, "inputs": list(inputs)}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


# --- reading what earlier stages wrote -------------------------------------------------------


def check_keys(what: str, found: list[tuple], expected: set[tuple]) -> None:
    """An artifact is complete when it holds every expected (prompt, sample) key exactly once,
    not when it has as many rows: a replayed task can repeat one sample and lose another."""
    counts = Counter(found)
    duplicated = sorted(k for k, n in counts.items() if n > 1)
    missing = sorted(expected - counts.keys())
    unexpected = sorted(counts.keys() - expected)
    if duplicated or missing or unexpected:
        parts = [
            f"{name} {len(keys)} (first: {keys[:5]})"
            for name, keys in (
                ("missing", missing),
                ("duplicated", duplicated),
                ("unexpected", unexpected),
            )
            if keys
        ]
        raise RuntimeError(f"{what}: keys {'; '.join(parts)}")


def read_traces(run: RunDir, folder: str) -> pa.Table:
    """Every graded trace a generate stage has written to `folder` so far, shard by shard."""
    names = run.list(folder, suffix=".parquet")
    if not names:
        return TRACE_SCHEMA.empty_table()
    return pa.concat_tables([run.read_parquet(folder, name) for name in names])
