"""Stage `eval`: every model of a run on every benchmark, k graded samples per problem.

    w2sr eval CONFIG [--endpoint URL]

Models are found by label (`w2sr.registry`): the teacher, the base student, the W2SR / W2SR-P /
W2SR-N students and the RL student when the run has them, and any `eval.models` extras. Each
(model, benchmark) result is one file named by its fingerprint (`w2sr.evaluation.results`), so a
rerun evaluates only what is missing. Offline, one Ray Data + vLLM pipeline per model runs its
missing benchmarks; through an endpoint, the server does the generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.evaluation.endpoint import evaluate_endpoint, served_models
from w2sr.evaluation.offline import evaluate_offline
from w2sr.evaluation.results import Task, plan_tasks, summary
from w2sr.rundir import RunDir

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
    tasks, problems, skipped = plan_tasks(cfg, run, labels)
    missing: dict[str, list[Task]] = defaultdict(list)
    for task in tasks:
        if not run.exists(*task.parts):
            missing[task.model.label].append(task)
    log.info("%d of %d results to compute", sum(map(len, missing.values())), len(tasks))
    if missing and endpoint:
        served = served_models(endpoint, cfg)
        for label in [label for label in missing if label not in served]:
            names = ", ".join(task.bench.name for task in missing[label])
            skipped[label] = f"{names}: not cached, not served at {endpoint} ({sorted(served)})"
            log.warning("model %s skipped: %s", label, skipped[label])
            del missing[label]
    for label, todo in missing.items():
        start = time.time()
        if endpoint:
            asyncio.run(evaluate_endpoint(cfg, run, todo, endpoint))
        else:
            evaluate_offline(cfg, run, todo)
        log.info("%s evaluated in %.1fs", label, time.time() - start)
    done = [task for task in tasks if run.exists(*task.parts)]
    result = summary(cfg, run, problems, done, skipped)
    if labels is None:  # the run's summary covers every model; a partial one is only returned
        run.write_json(result, *layout.EVAL_SUMMARY)
    return result
