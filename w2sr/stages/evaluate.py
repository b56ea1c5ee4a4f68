"""Stage `eval`: every model of a run on every benchmark, k graded samples per problem.

    w2sr eval CONFIG [--endpoint URL]

Models are found by label (`w2sr.registry`): the teacher, the base student, the W2SR / W2SR-P /
W2SR-N students and the RL student when the run has them, and any `eval.models` extras. Each
(model, benchmark) result is one file named by its fingerprint (`w2sr.evaluation.results`), so a
rerun evaluates only what is missing, or what was made from other problems than the benchmark
gives now, and one model under two labels (a teacher that is also the base student) is
evaluated once. Offline, the models of one architecture share one Ray Data + vLLM pipeline,
whose engines load each model in place (`w2sr.evaluation.offline`), `eval.concurrent_models`
pipelines side by side; through an endpoint, the server does the generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.evaluation.endpoint import evaluate_endpoint, served_models
from w2sr.evaluation.offline import evaluate_offline
from w2sr.evaluation.problems import load_problems
from w2sr.evaluation.results import Task, copy_result, is_current, plan_tasks, summary
from w2sr.rundir import RunDir
from w2sr.tracking import log_evaluation, results_uri

log = logging.getLogger(__name__)


def evaluate(
    cfg: ExperimentConfig, endpoint: str | None = None, labels: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Evaluate what is missing, then write and return eval/summary.json; with `labels`, only
    those models, and the summary of them is returned, not written.

    With `endpoint`, missing results come from that server (models addressed by label) and a
    label it does not serve is skipped; results already on disk are used whatever made them.
    """
    run = RunDir(cfg.run_dir)
    tasks, skipped = plan_tasks(cfg, labels)
    problems = load_problems(cfg, run)
    stale = [task for task in tasks if not is_current(run, task, problems[task.bench.name])]
    for task in stale:
        if run.exists(*task.file):
            log.warning("%s: made from other problems; evaluated again", run.path(*task.file))
    # A server answers each label with what it serves under that label: nothing is shared.
    missing, copies = _once_per_result(tasks, stale, share=endpoint is None)
    log.info("%d of %d results to compute", sum(map(len, missing.values())), len(tasks))
    if missing and endpoint:
        served = served_models(endpoint, cfg)
        for label in [label for label in missing if label not in served]:
            names = ", ".join(task.bench.name for task in missing[label])
            skipped[label] = f"{names}: not cached, not served at {endpoint} ({sorted(served)})"
            log.warning("model %s skipped: %s", label, skipped[label])
            del missing[label]
    # A model's evaluation is leased: a second one of it (another sweep on this run dir, a manual
    # `w2sr eval`) stops with LeaseHeld instead of deleting the parts the first is writing.
    labels_written = {*missing, *(task.model.label for task, _ in copies)}
    with run.leased(layout.eval_folder(label) for label in labels_written):
        if endpoint:
            for label, todo in missing.items():
                _timed(label, asyncio.run, evaluate_endpoint(cfg, run, todo, problems, endpoint))
        elif missing:
            evaluate_offline(cfg, run, missing, problems)
        for task, computed in copies:
            if is_current(run, computed, problems[task.bench.name]):
                copy_result(cfg, run, computed, task, problems[task.bench.name])
    done = [task for task in tasks if is_current(run, task, problems[task.bench.name])]
    result = summary(cfg, run, done, skipped, problems)
    if labels is None:  # the run's summary covers every model; a partial one is only returned
        run.write_json(result, *layout.EVAL_SUMMARY)
    if uri := results_uri(cfg.model_dump(mode="json")):
        log_evaluation(uri, result)
    return result


def _once_per_result(
    tasks: list[Task], stale: list[Task], share: bool
) -> tuple[dict[str, list[Task]], list[tuple[Task, Task]]]:
    """The stale tasks to compute, by label, and (task, the task whose result it is) for the
    rest: one model under two labels (a teacher that is also the base student) at one setting
    has one fingerprint, so its result is computed once, or taken from one of `tasks` that has
    it, and written for each label (with `share`; else each is computed)."""
    stale_ids = {id(task) for task in stale}
    source = {task.fingerprint: task for task in tasks if id(task) not in stale_ids}
    todo: dict[str, list[Task]] = defaultdict(list)
    copies = []
    for task in stale:
        computed = source.setdefault(task.fingerprint, task) if share else task
        if computed is task:
            todo[task.model.label].append(task)
        else:
            copies.append((task, computed))
    return todo, copies


def _timed(label: str, evaluate_model: Callable[..., Any], *args: Any) -> None:
    start = time.time()
    evaluate_model(*args)
    log.info("%s evaluated in %.1fs", label, time.time() - start)
