"""The problems a run is evaluated on: each benchmark's rows minus the run's training prompts.

Benchmark problems that are also training prompts of the run are dropped first
(`eval.decontaminate`), so a procedural benchmark cannot leak into the W2SR training set. They
are loaded only to evaluate or to summarize: planning names results by fingerprints of the
config alone (`w2sr.evaluation.results`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from w2sr.config import ExperimentConfig
from w2sr.data.prompt_set import prepare_problems
from w2sr.data.sources import load_benchmark, normal_text
from w2sr.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class Problems:
    rows: list[dict]  # prompt_id, problem, answer
    rejected: int  # rows of the source that failed validation
    decontaminated: int  # rows dropped because they are training prompts of the run

    def digest(self) -> str:
        keys = [(r["prompt_id"], r["problem"], r["answer"]) for r in self.rows]
        return hashlib.sha256(json.dumps(keys).encode()).hexdigest()


def load_problems(cfg: ExperimentConfig, run: RunDir) -> dict[str, Problems]:
    """Each benchmark's problems, minus the run's training prompts, then cut to `limit`."""
    training = _training_problems(cfg, run) if cfg.eval.decontaminate else set()
    out = {}
    for bench in cfg.eval.benchmarks:
        rows, rejected = load_benchmark(bench)
        if rejected:
            log.warning("%s: %d rows rejected by validation", bench.name, len(rejected))
        kept = [row for row in rows if normal_text(row["problem"]) not in training]
        if len(kept) < len(rows):
            log.warning(
                "%s: %d problems are training prompts of this run; left out",
                bench.name,
                len(rows) - len(kept),
            )
        if not kept:
            raise ValueError(f"benchmark {bench.name} has no problems left to evaluate")
        out[bench.name] = Problems(kept[: bench.limit], len(rejected), len(rows) - len(kept))
    return out


def _training_problems(cfg: ExperimentConfig, run: RunDir) -> set[str]:
    """The config's training problems (prepared here if no stage has yet), so a model is
    evaluated on the same problems whether it is evaluated before or after generation."""
    problems = prepare_problems(cfg, run).column("problem")
    return {normal_text(p) for p in problems.to_pylist()}
