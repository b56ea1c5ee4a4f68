"""Offline evaluation: one model's missing benchmarks through one Ray Data + vLLM pipeline.

One engine start per model; the workers write the samples, and a benchmark's file is sealed as
soon as its last sample is written. The requests are built here, in the driver: a benchmark is
bounded (thousands of problems, k samples each), unlike the prompt sets of generation.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.data.prompts import load_tokenizer, render_prompts
from w2sr.data.templates import TEMPLATES, reasoning_prefill
from w2sr.engines import settings
from w2sr.engines.generator import Groups, build_generator, generate_groups
from w2sr.evaluation.problems import Problems
from w2sr.evaluation.results import Task, sample_rows, scorer, write_result
from w2sr.models import ModelSpec
from w2sr.rundir import RunDir
from w2sr.schemas import TOO_LONG
from w2sr.session import init_ray

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """One model's missing samples and the engines that will generate them, ready to run."""

    processor: Any
    requests: list[dict[str, Any]]
    groups: Groups
    batch_size: int

    def run(self) -> None:
        """Generate, grade and write each benchmark's result as its last sample is written."""
        import ray

        blocks = max(1, len(self.requests) // self.batch_size)
        requests = ray.data.from_items(self.requests, override_num_blocks=blocks)
        generate_groups(self.processor, requests, self.groups, _sealed)


def evaluate_offline(
    cfg: ExperimentConfig, run: RunDir, todo: list[Task], problems: dict[str, Problems]
) -> None:
    """Evaluate one model (every task of `todo` is the same model's) on its benchmarks, whose
    problems `problems` holds by name."""
    pipeline = offline_pipeline(cfg, run, todo, problems)
    if pipeline is not None:
        pipeline.run()


def offline_pipeline(
    cfg: ExperimentConfig, run: RunDir, todo: list[Task], problems: dict[str, Problems]
) -> Pipeline | None:
    """One model's requests, rendered (with `thinking`) and seeded at each benchmark's setting,
    and its processor; None when every prompt is too long (those results are written here).
    What it does is not thread-safe (transformers' lazy imports, building a built-in model):
    pipelines run side by side, not their set-up."""
    init_ray(cfg)
    model = todo[0].model
    spec = ModelSpec.parse(model.spec)
    path = spec.for_cluster(run)
    # This process's copy of a model in object storage is named by its identity: a trained
    # model's done record changes with its weights, its folder's URI may not.
    tokenizer = load_tokenizer(spec.local(model.identity), cfg.trust_remote_code)
    template, max_len = TEMPLATES[cfg.template], cfg.eval.engine.max_model_len
    score = scorer(cfg, model.label)
    requests: list[dict[str, Any]] = []
    too_long: dict[str, list[dict]] = {}  # samples not generated, counted wrong
    for task in todo:
        posed = problems[task.bench.name]
        kept, rejected = render_prompts(
            tokenizer, template, posed.rows, max_len, thinking=cfg.thinking
        )
        if rejected:
            log.warning(
                "%s on %s: %d prompts exceed max_model_len; counted wrong",
                model.label,
                task.bench.name,
                len(rejected),
            )
        rendered = {row["prompt_id"]: row for row in kept}
        too_long[task.bench.name] = []
        for sample in sample_rows(cfg, task, posed):
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
                    "sampling_params": settings.sampling_params(
                        task.setting.sampling, sample["seed"]
                    ),
                }
            )
    tasks = {task.bench.name: task for task in todo}
    expected = Counter(request["benchmark"] for request in requests)
    seal = _write_benchmark(cfg, run, tasks, problems, too_long)
    for name in [name for name in tasks if name not in expected]:
        seal(name, [])  # every prompt too long: nothing to generate
    if not requests:
        return None
    processor = build_generator(
        path,
        cfg.eval.engine,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
        postprocess=_offline_row(score, tasks, max_len),
        side_by_side=cfg.eval.concurrent_models > 1,
    )
    groups = Groups(
        run=run,
        folder=f"{layout.eval_folder(model.label)}/{layout.PARTS}",
        column="benchmark",
        subfolders={name: layout.eval_name(name, tasks[name].fingerprint) for name in expected},
        expected=dict(expected),
        seal=seal,
    )
    return Pipeline(processor, requests, groups, cfg.eval.engine.batch_size)


def _write_benchmark(
    cfg: ExperimentConfig, run: RunDir, tasks: dict, problems: dict, too_long: dict
):
    """A benchmark's seal (runs in a Ray task): its generated samples and those too long to
    generate, written as its result file."""

    def seal(name: str, rows: list[dict[str, Any]]) -> dict[str, int]:
        write_result(cfg, run, tasks[name], problems[name], rows + too_long[name], "offline")
        return {"samples": len(rows) + len(too_long[name])}

    return seal


def _sealed(name: str, facts: dict[str, int]) -> None:
    log.info("sealed %s (%d samples)", name, facts["samples"])


def _offline_row(score, tasks: dict[str, Task], max_len: int):
    """A generated row graded, its response the whole completion: the thought a chat template
    prefilled (`reasoning_prefill`) and what the model wrote after it."""
    max_tokens = {name: task.setting.sampling.max_tokens for name, task in tasks.items()}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        prompt_tokens, completion_tokens = row["num_input_tokens"], row["num_generated_tokens"]
        limit = max_tokens[row["benchmark"]]
        finish = settings.finish_reason(prompt_tokens, completion_tokens, limit, max_len)
        return score(
            {
                **row,
                "response": reasoning_prefill(row["prompt"]) + row["generated_text"],
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "finish_reason": finish,
            }
        )

    return postprocess
