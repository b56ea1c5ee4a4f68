"""Evaluation results: one Parquet file per (model, benchmark) and what is computed from them.

A result file is named by a fingerprint of everything that decides its content (the weights, the
problem set, sampling, template, grader, context length), so a rerun evaluates only what is
missing and a changed setting never reuses a stale file. Both backends shape and grade their rows
here, with the run's grader, exactly as for the teacher's traces.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from w2sr import grading, layout, lineage, metrics
from w2sr.config import ConfigError, EvalBenchmark, ExperimentConfig
from w2sr.engines.settings import sample_seed
from w2sr.evaluation.problems import Problems, load_problems
from w2sr.grading import GRADERS, extract_answer
from w2sr.registry import Model, model_table, parameter_count
from w2sr.rundir import RunDir
from w2sr.schemas import EVAL_SCHEMA, TOO_LONG

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One (model, benchmark) result: where it lives and what it covers."""

    model: Model
    bench: EvalBenchmark
    problems: Problems
    fingerprint: str

    @property
    def parts(self) -> tuple[str, str, str]:
        return layout.eval_result(self.model.label, self.bench.name, self.fingerprint)


def plan_tasks(
    cfg: ExperimentConfig, run: RunDir, labels: tuple[str, ...] | None = None
) -> tuple[list[Task], dict[str, Problems], dict[str, str]]:
    """Every (model, benchmark) result the config asks for (of the `labels` models only, when
    given), each benchmark's problems, and the models left out with the reason."""
    models, skipped = model_table(cfg)
    if labels is not None:
        unknown = sorted(set(labels) - set(models) - set(skipped))
        if unknown:
            raise ConfigError(f"--models: {unknown} are not models of this run ({sorted(models)})")
        models = {label: m for label, m in models.items() if label in labels}
        skipped = {label: why for label, why in skipped.items() if label in labels}
    problems = load_problems(cfg, run)
    tasks = []
    for model in models.values():
        for bench in cfg.eval.benchmarks:
            rows = problems[bench.name]
            tasks.append(Task(model, bench, rows, result_fingerprint(cfg, model, bench.name, rows)))
    return tasks, problems, skipped


def result_fingerprint(cfg: ExperimentConfig, model: Model, name: str, problems: Problems) -> str:
    ev = cfg.eval
    fields = {
        "benchmark": name,
        "problems": problems.digest(),
        "samples": ev.samples,
        "sampling": ev.sampling.model_dump(mode="json"),
        "seed": cfg.seed,
        "template": cfg.template,
        "grader": cfg.grader,
        "grading_policy": cfg.grading_policy,
        "grader_version": grading.VERSION,
        "max_model_len": ev.engine.max_model_len,
        "dtype": ev.engine.dtype,
    }
    return layout.fingerprint(fields, model.identity)


def scorer(cfg: ExperimentConfig, label: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Shape one completion into an EVAL_SCHEMA row and grade it (runs in Ray or the driver)."""
    grader, policy = GRADERS[cfg.grader], cfg.grading_policy

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


def sample_rows(cfg: ExperimentConfig, task: Task) -> list[dict[str, Any]]:
    """The k sample requests of every problem, each with its own reproducible seed.

    No `model` key: Ray Data's engine stage would read it as the name of a LoRA adapter.
    """
    base = cfg.eval.sampling.seed + cfg.seed
    return [
        {
            "benchmark": task.bench.name,
            **row,
            "sample_index": k,
            "seed": sample_seed(base, f"{task.bench.name}/{row['prompt_id']}", k),
        }
        for row in task.problems.rows
        for k in range(cfg.eval.samples)
    ]


def write_result(cfg: ExperimentConfig, run: RunDir, task: Task, rows: list, backend: str):
    """A result file: rows in (problem, sample) order, provenance in the Parquet metadata.

    It must hold every (problem, sample) of the task exactly once."""
    rows.sort(key=lambda r: (r["prompt_id"], r["sample_index"]))
    layout.check_keys(
        f"{task.model.label} on {task.bench.name}",
        [(r["prompt_id"], r["sample_index"]) for r in rows],
        {(p["prompt_id"], k) for p in task.problems.rows for k in range(cfg.eval.samples)},
    )
    meta = {
        "label": task.model.label,
        "spec": task.model.spec,
        "benchmark": task.bench.name,
        "fingerprint": task.fingerprint,
        "backend": backend,
        "samples": cfg.eval.samples,
        "sampling": cfg.eval.sampling.model_dump(mode="json"),
        "template": cfg.template,
        "grader": cfg.grader,
        "grading_policy": cfg.grading_policy,
        "grader_version": grading.VERSION,
    }
    schema = EVAL_SCHEMA.with_metadata({"w2sr": json.dumps(meta)})
    run.write_parquet(pa.Table.from_pylist(rows, schema=schema), *task.parts)
    log.info("wrote %s (%d samples)", "/".join(task.parts), len(rows))


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
        "prompt_too_long": finish.count(TOO_LONG) / len(finish),
        "mean_completion_tokens": float(
            np.mean([t or 0 for t in table.column("completion_tokens").to_pylist()])
        ),
    }


def summary(
    cfg: ExperimentConfig,
    run: RunDir,
    problems: dict[str, Problems],
    done: list[Task],
    skipped: dict[str, str],
) -> dict[str, Any]:
    ev = cfg.eval
    out: dict[str, Any] = {
        "settings": {
            "samples": ev.samples,
            "pass_k": ev.ks,
            "sampling": ev.sampling.model_dump(mode="json"),
            "template": cfg.template,
            "grader": cfg.grader,
            "grading_policy": cfg.grading_policy,
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
        "traces": lineage.traces(cfg).folder,  # the teacher's traces the students learned from
    }
    for task in done:
        model = task.model
        if model.label not in out["models"]:
            out["models"][model.label] = {
                "spec": model.spec,
                "parameters": parameter_count(model.spec),
                "done": model.done,
                "results": {},
            }
        entry = out["models"][model.label]
        table = run.read_parquet(*task.parts)
        result = benchmark_metrics(table, ev.ks, ev.bootstrap_resamples, ev.confidence, cfg.seed)
        meta = json.loads(table.schema.metadata[b"w2sr"])
        entry["results"][task.bench.name] = {
            "file": "/".join(task.parts),
            "backend": meta["backend"],
            **result,
        }
    return out
