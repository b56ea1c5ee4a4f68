"""Offline evaluation: one model's missing benchmarks through one Ray Data + vLLM pipeline.

One engine start per model; a benchmark's file is written as soon as its last sample arrives.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from w2sr.config import ExperimentConfig
from w2sr.data.prompts import load_tokenizer, render_prompts
from w2sr.data.templates import TEMPLATES
from w2sr.engines import settings
from w2sr.engines.generator import build_generator, generate_groups
from w2sr.evaluation.results import Task, sample_rows, scorer, write_result
from w2sr.registry import local_model, model_path
from w2sr.rundir import RunDir
from w2sr.schemas import TOO_LONG
from w2sr.session import init_ray

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """One model's missing samples and the engines that will generate them, ready to run."""

    processor: Any
    requests: list[dict[str, Any]]
    expected: dict[str, set[tuple]]
    complete: Callable[[str, list[dict]], None]
    batch_size: int

    def run(self) -> None:
        """Generate, grade and write each benchmark's result as its last sample arrives."""
        generate_groups(
            self.processor, self.requests, self.batch_size, _benchmark, self.expected, self.complete
        )


def evaluate_offline(cfg: ExperimentConfig, run: RunDir, todo: list[Task]) -> None:
    """Evaluate one model (every task of `todo` is the same model's) on its benchmarks."""
    pipeline = offline_pipeline(cfg, run, todo)
    if pipeline is not None:
        pipeline.run()


def offline_pipeline(cfg: ExperimentConfig, run: RunDir, todo: list[Task]) -> Pipeline | None:
    """One model's requests, rendered and seeded, and its processor; None when every prompt is
    too long (those results are written here). What it does is not thread-safe (transformers'
    lazy imports, building a built-in model): pipelines run side by side, not their set-up."""
    init_ray(cfg)
    model = todo[0].model
    path = model_path(model, run)
    tokenizer = load_tokenizer(local_model(model), cfg.trust_remote_code)
    template, max_len = TEMPLATES[cfg.template], cfg.eval.engine.max_model_len
    score = scorer(cfg, model.label)
    requests: list[dict[str, Any]] = []
    too_long: dict[str, list[dict]] = {}  # samples not generated, counted wrong
    for task in todo:
        kept, rejected = render_prompts(tokenizer, template, task.problems.rows, max_len)
        if rejected:
            log.warning(
                "%s on %s: %d prompts exceed max_model_len; counted wrong",
                model.label,
                task.bench.name,
                len(rejected),
            )
        rendered = {row["prompt_id"]: row for row in kept}
        too_long[task.bench.name] = []
        for sample in sample_rows(cfg, task):
            row = rendered.get(sample["prompt_id"])
            if row is None:
                too_long[task.bench.name].append(
                    score({**sample, "response": "", "finish_reason": TOO_LONG})
                )
                continue
            requests.append(
                {
                    **sample,
                    "prompt": row["prompt"],
                    "tokenized_prompt": row["prompt_token_ids"],
                    "sampling_params": settings.sampling_params(cfg.eval.sampling, sample["seed"]),
                }
            )
    tasks = {task.bench.name: task for task in todo}
    expected = defaultdict(set)
    for request in requests:
        expected[request["benchmark"]].add((request["prompt_id"], request["sample_index"]))

    def complete(name: str, rows: list[dict]) -> None:
        write_result(cfg, run, tasks[name], rows + too_long[name], "offline")

    for name in [name for name in tasks if name not in expected]:
        complete(name, [])  # every prompt too long: nothing to generate
    if not requests:
        return None
    processor = build_generator(
        path,
        cfg.eval.engine,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
        postprocess=_offline_row(cfg, score),
        side_by_side=cfg.eval.concurrent_models > 1,
    )
    return Pipeline(processor, requests, expected, complete, cfg.eval.engine.batch_size)


def _benchmark(row: dict[str, Any]) -> str:
    return row["benchmark"]


def _offline_row(cfg: ExperimentConfig, score):
    max_tokens, max_len = cfg.eval.sampling.max_tokens, cfg.eval.engine.max_model_len

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        prompt_tokens, completion_tokens = row["num_input_tokens"], row["num_generated_tokens"]
        finish = settings.finish_reason(prompt_tokens, completion_tokens, max_tokens, max_len)
        return score(
            {
                **row,
                "response": row["generated_text"],
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "finish_reason": finish,
            }
        )

    return postprocess
