"""Evaluation results: one Parquet file per (model, benchmark) and what is computed from them.

A result file is named by a fingerprint of everything that decides its content (the weights, the
benchmark's source, the decoding setting, template, grader, context length), made from the
config alone: planning (`w2sr sweep --plan`, `w2sr gc`) names every result without loading a
benchmark or touching the run dir, so a rerun evaluates only what is missing and a changed
setting never reuses a stale file. Both backends shape and grade their rows here, with
evaluation's grading policy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from w2sr import layout, metrics
from w2sr.config import ConfigError, EvalBenchmark, EvalSetting, ExperimentConfig
from w2sr.engines.settings import sample_seed
from w2sr.evaluation.problems import Problems, load_problems
from w2sr.grading import GRADERS, extract_answer, split_reasoning
from w2sr.lineage import Lineage
from w2sr.registry import Model, model_table, parameter_count
from w2sr.rundir import RunDir
from w2sr.schemas import EVAL_SCHEMA, TOO_LONG

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One (model, benchmark) result: where it lives and how it is decoded. It holds no problems:
    those are loaded (`load_problems`) only to evaluate or summarize."""

    model: Model
    bench: EvalBenchmark
    setting: EvalSetting
    fingerprint: str

    @property
    def file(self) -> tuple[str, str, str]:
        """The result file's path in the run dir, as `RunDir` takes it."""
        return layout.eval_result(self.model.label, self.bench.name, self.fingerprint)


def plan_tasks(
    cfg: ExperimentConfig, labels: tuple[str, ...] | None = None
) -> tuple[list[Task], dict[str, str]]:
    """Every (model, benchmark) result the config asks for (of the `labels` models only, when
    given), and the models left out with the reason. Reads no benchmark and writes nothing."""
    models, skipped = model_table(cfg)
    if labels is not None:
        unknown = sorted(set(labels) - set(models) - set(skipped))
        if unknown:
            raise ConfigError(f"--models: {unknown} are not models of this run ({sorted(models)})")
        models = {label: m for label, m in models.items() if label in labels}
        skipped = {label: why for label, why in skipped.items() if label in labels}
    lineage = Lineage(cfg)  # the problems' fingerprint, which every result holds, once
    tasks = [
        Task(
            model,
            bench,
            cfg.eval.setting(bench, model.label),
            lineage.result(bench, model.label, model.identity),
        )
        for model in models.values()
        for bench in cfg.eval.benchmarks
    ]
    return tasks, skipped


def scorer(cfg: ExperimentConfig, label: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Shape one completion into an EVAL_SCHEMA row and grade it (runs in Ray or the driver).
    The response is the whole completion, with the thought a chat template prefilled."""
    grader, policy = GRADERS[cfg.grader], cfg.eval_grading_policy

    def score(row: dict[str, Any]) -> dict[str, Any]:
        response = row["response"]
        generated = row["finish_reason"] != TOO_LONG
        return {
            **{name: row.get(name) for name in EVAL_SCHEMA.names},
            "model": label,
            "extracted_answer": extract_answer(response, policy) if generated else None,
            "correct": generated and grader(response, row["answer"], policy),
        }

    return score


def sample_rows(cfg: ExperimentConfig, task: Task, problems: Problems) -> list[dict[str, Any]]:
    """The sample requests of every problem (as many as the task's setting says), each with its
    own reproducible seed.

    No `model` key: Ray Data's engine stage would read it as the name of a LoRA adapter.
    """
    base = task.setting.sampling.seed + cfg.seed
    return [
        {
            "benchmark": task.bench.name,
            **row,
            "sample_index": k,
            "seed": sample_seed(base, f"{task.bench.name}/{row['prompt_id']}", k),
        }
        for row in problems.rows
        for k in range(task.setting.samples)
    ]


def write_result(
    cfg: ExperimentConfig, run: RunDir, task: Task, problems: Problems, rows: list, backend: str
) -> None:
    """A result file: rows in (problem, sample) order, provenance in the Parquet metadata (with
    the digest of the problems, which the fingerprint does not hold: `is_current`).

    It must hold every (problem, sample) of the task exactly once."""
    rows.sort(key=lambda r: (r["prompt_id"], r["sample_index"]))
    layout.check_keys(
        f"{task.model.label} on {task.bench.name}",
        [(r["prompt_id"], r["sample_index"]) for r in rows],
        {(p["prompt_id"], k) for p in problems.rows for k in range(task.setting.samples)},
    )
    meta = {
        "label": task.model.label,
        "spec": task.model.spec,
        "fingerprint": task.fingerprint,
        "problems": problems.digest(),
        "backend": backend,
        # what the fingerprint holds besides the model, as it held it
        **Lineage(cfg).result_fields(task.bench, task.model.label),
    }
    schema = EVAL_SCHEMA.with_metadata({"w2sr": json.dumps(meta)})
    run.write_parquet(pa.Table.from_pylist(rows, schema=schema), *task.file)
    log.info("wrote %s (%d samples)", "/".join(task.file), len(rows))


def copy_result(
    cfg: ExperimentConfig, run: RunDir, computed: Task, task: Task, problems: Problems
) -> None:
    """`task`'s result from `computed`'s, which has the same fingerprint: the same weights,
    benchmark and setting under another label. Only the rows' model label differs."""
    table = run.read_parquet(*computed.file)
    meta = json.loads((table.schema.metadata or {})[b"w2sr"])
    rows = [{**row, "model": task.model.label} for row in table.to_pylist()]
    write_result(cfg, run, task, problems, rows, meta["backend"])


def is_current(run: RunDir, task: Task, problems: Problems) -> bool:
    """Whether the task's result file exists and was made from these problems: a benchmark whose
    rows changed under the same config (a loader fixed, a hub dataset updated) is evaluated
    again. Reads the file's footer only."""
    if not run.exists(*task.file):
        return False
    meta = pq.read_schema(run.path(*task.file), filesystem=run.fs).metadata or {}
    return json.loads(meta.get(b"w2sr", b"{}")).get("problems") == problems.digest()


# --- statistics ------------------------------------------------------------------------------


def problem_matrix(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompt ids, correct, answers) with one row per problem and one column per sample."""
    ids = np.array(table.column("prompt_id").to_pylist(), dtype=object)
    order = np.lexsort((table.column("sample_index").to_numpy(), ids))
    problems = sorted(set(ids))
    samples = len(ids) // len(problems)
    if samples * len(problems) != len(ids):
        raise ValueError("every problem must have the same number of samples")
    correct = np.array(table.column("correct").to_pylist(), dtype=bool)[order]
    answers = np.array(table.column("extracted_answer").to_pylist(), dtype=object)[order]
    return problems, correct.reshape(-1, samples), answers.reshape(-1, samples)


def benchmark_metrics(
    table: pa.Table, ks: list[int], resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    _, correct, answers = problem_matrix(table)
    per_problem = correct.mean(axis=1)
    samples = correct.shape[1]
    majority = [metrics.majority_vote(a, c) for a, c in zip(answers, correct, strict=True)]
    finish = table.column("finish_reason").to_pylist()
    responses = table.column("response").to_pylist()
    ci = metrics.bootstrap_ci(per_problem, resamples=resamples, confidence=confidence, seed=seed)
    return {
        "problems": int(correct.shape[0]),
        "samples": samples,
        "pass@1": float(per_problem.mean()),
        "pass@1_ci": list(ci),
        "pass@k": {
            str(k): float(metrics.pass_at_k_per_problem(correct, k).mean())
            for k in ks
            if k <= samples
        },
        f"maj@{samples}": float(np.mean(majority)),
        "no_answer": float(np.mean([a is None for a in answers.ravel()])),
        "truncated": finish.count("length") / len(finish),
        # a `<think>` never closed: the thought ran into the token limit, or never ended
        "unclosed_thought": float(np.mean([split_reasoning(r)[1] is None for r in responses])),
        "prompt_too_long": finish.count(TOO_LONG) / len(finish),
        "mean_completion_tokens": float(
            np.mean([t or 0 for t in table.column("completion_tokens").to_pylist()])
        ),
    }


def _setting(setting: EvalSetting, with_ks: bool) -> dict[str, Any]:
    out = {"samples": setting.samples, "sampling": setting.sampling.model_dump(mode="json")}
    return {**out, "pass_k": setting.ks} if with_ks else {**out, "greedy": setting.greedy}


def _source(cfg: ExperimentConfig, model: Model) -> dict[str, Any]:
    """Where a model comes from: a stage of this run dir (its folder and fingerprint, from its
    done record), or outside it (the config's spec and what the result cache knows it by)."""
    if model.done is not None:
        stage = Lineage(cfg).trained[model.label].folder
        return {"kind": "trained", "stage": stage, "fingerprint": model.done["fingerprint"]}
    return {"kind": "outside", "spec": model.spec, "identity": model.identity}


def summary(
    cfg: ExperimentConfig,
    run: RunDir,
    done: list[Task],
    skipped: dict[str, str],
    problems: dict[str, Problems] | None = None,
) -> dict[str, Any]:
    """eval/summary.json: the settings, each benchmark's problems, and each model's source and
    results. `problems`: the benchmarks' problems when the caller has them; else loaded here."""
    ev = cfg.eval
    if problems is None:
        problems = load_problems(cfg, run)
    out: dict[str, Any] = {
        "settings": {
            "protocol": ev.protocol,
            "samples": ev.samples,
            "pass_k": ev.pass_k,
            "sampling": ev.sampling.model_dump(mode="json"),
            "greedy": ev.greedy,
            # how the models not decoded greedily are evaluated on each benchmark ("" is no
            # model's label)
            "benchmarks": {
                bench.name: _setting(ev.setting(bench, ""), with_ks=True) for bench in ev.benchmarks
            },
            "template": cfg.template,
            "grader": cfg.grader,
            "grading_policy": cfg.eval_grading_policy,
            "max_model_len": ev.engine.max_model_len,
            "bootstrap_resamples": ev.bootstrap_resamples,
            "confidence": ev.confidence,
            "seed": cfg.seed,
        },
        "benchmarks": {
            name: {
                "problems": len(p.rows),
                "rejected": p.rejected,
                "decontaminated": p.decontaminated,
            }
            for name, p in problems.items()
        },
        "models": {},
        "skipped": skipped,
        "traces": Lineage(cfg).traces.folder,  # the teacher's traces the students learned from
    }
    if cfg.thinking is not None:
        out["settings"]["thinking"] = cfg.thinking
    for task in done:
        model = task.model
        if model.label not in out["models"]:
            out["models"][model.label] = {
                "spec": model.spec,
                "parameters": parameter_count(model.spec),
                "done": model.done,
                "source": _source(cfg, model),
                "results": {},
            }
        entry = out["models"][model.label]
        table = run.read_parquet(*task.file)
        ks = task.setting.ks
        result = benchmark_metrics(table, ks, ev.bootstrap_resamples, ev.confidence, cfg.seed)
        meta = json.loads(table.schema.metadata[b"w2sr"])
        entry["results"][task.bench.name] = {
            "file": "/".join(task.file),
            "backend": meta["backend"],
            "setting": _setting(task.setting, with_ks=False),
            **result,
        }
    return out
