"""Offline evaluation: the missing results of a run's models, through Ray Data + vLLM pipelines.

The models of one architecture (the same config and tokenizer: the base student, its fine-tunes,
the RL student) share one pipeline, whose engines load each model's weights in place
(`w2sr.engines.shared`): evaluating N of them costs one engine start. The workers write the
samples, and a benchmark's result is sealed as soon as its last sample is written. The requests
are built here, in the driver: a benchmark is bounded (thousands of problems, k samples each),
unlike the prompt sets of generation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.data.prompts import load_tokenizer, render_prompts
from w2sr.data.templates import TEMPLATES, reasoning_prefill
from w2sr.engines import settings
from w2sr.engines.generator import Groups, generate_groups
from w2sr.engines.shared import shared_generator
from w2sr.evaluation.problems import Problems
from w2sr.evaluation.results import Task, sample_rows, scorer, write_result
from w2sr.models import ModelSpec
from w2sr.rundir import RunDir
from w2sr.schemas import TOO_LONG
from w2sr.session import init_ray

log = logging.getLogger(__name__)

# What an engine takes from a model's folder besides its weights; two models whose files agree
# (loading metadata aside, see `_architecture`) can share an engine.
ENGINE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Keys that say where or by what a folder was written, not what it holds.
PROVENANCE_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "is_local"}
PROVENANCE_KEYS |= {"local_files_only"}


@dataclass
class Model:
    """One model's requests, rendered (with `thinking`) and seeded at each benchmark's setting."""

    label: str
    source: str  # what every node loads (`ModelSpec.for_cluster`)
    identity: str | None
    architecture: str
    tasks: dict[str, Task]  # by benchmark
    requests: list[dict[str, Any]] = field(default_factory=list)
    too_long: dict[str, list[dict]] = field(default_factory=dict)  # not generated, counted wrong


def evaluate_offline(
    cfg: ExperimentConfig,
    run: RunDir,
    missing: dict[str, list[Task]],
    problems: dict[str, Problems],
) -> None:
    """Evaluate each model of `missing` (label: its tasks) on its benchmarks, whose problems
    `problems` holds by name: one pipeline per architecture, `eval.concurrent_models` of them
    side by side. A pipeline that fails does not stop the others (their results are kept); the
    first failure is raised once all have ended.

    The set-up (rendering, transformers' lazy imports, building a built-in model) is not
    thread-safe: it is done here, in this thread, before any pipeline runs."""
    init_ray(cfg)
    side_by_side = cfg.eval.concurrent_models > 1
    pipelines = []
    for models in _by_architecture(
        [_requests(cfg, run, todo, problems) for todo in missing.values()]
    ):
        pipeline = _pipeline(cfg, run, models, problems, side_by_side)
        if pipeline is not None:
            pipelines.append(pipeline)
    failed: dict[str, BaseException] = {}
    with ThreadPoolExecutor(cfg.eval.concurrent_models, thread_name_prefix="eval") as pool:
        futures = {pool.submit(pipeline.run): pipeline.name for pipeline in pipelines}
        for future in as_completed(futures):
            error = future.exception()
            if error is not None:
                failed[futures[future]] = error
                log.error("%s: evaluation failed: %s", futures[future], error)
    if failed:
        name, error = next(iter(failed.items()))
        raise RuntimeError(f"evaluation failed for {sorted(failed)}; first: {name}") from error


@dataclass
class Pipeline:
    """Models' missing samples and the engines that will generate them, ready to run."""

    name: str  # its models' labels
    processor: Any
    requests: list[dict[str, Any]]
    groups: Groups
    batch_size: int

    def run(self) -> None:
        """Generate, grade and write each result as its last sample is written."""
        import ray

        start = time.time()
        blocks = max(1, len(self.requests) // self.batch_size)
        requests = ray.data.from_items(self.requests, override_num_blocks=blocks)
        generate_groups(self.processor, requests, self.groups, _sealed, self.name)
        log.info("%s evaluated in %.1fs", self.name, time.time() - start)


def _requests(
    cfg: ExperimentConfig, run: RunDir, todo: list[Task], problems: dict[str, Problems]
) -> Model:
    """One model's requests (every task of `todo` is the same model's); the samples whose prompt
    exceeds `max_model_len` are set aside, to be counted wrong."""
    model = todo[0].model
    spec = ModelSpec.parse(model.spec)
    # This process's copy of a model in object storage is named by its identity: a trained
    # model's done record changes with its weights, its folder's URI may not.
    local = spec.local(model.identity)
    tokenizer = load_tokenizer(local, cfg.trust_remote_code)
    template, max_len = TEMPLATES[cfg.template], cfg.eval.engine.max_model_len
    score = scorer(cfg, model.label)
    found = Model(
        label=model.label,
        source=spec.for_cluster(run),
        identity=model.identity,
        architecture=_architecture(local),
        tasks={task.bench.name: task for task in todo},
    )
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
        too_long = found.too_long[task.bench.name] = []
        for sample in sample_rows(cfg, task, posed):
            row = rendered.get(sample["prompt_id"])
            if row is None:
                too_long.append(score({**sample, "response": "", "finish_reason": TOO_LONG}))
                continue
            found.requests.append(
                {
                    **sample,
                    "result": _result(model.label, task.bench.name),
                    "model": found.source,
                    "prompt": row["prompt"],
                    "tokenized_prompt": row["prompt_token_ids"],
                    "sampling_params": settings.sampling_params(
                        task.setting.sampling, sample["seed"]
                    ),
                }
            )
    return found


def _architecture(folder: str) -> str:
    """What decides whether models can share an engine: the digest of their config, generation
    config and tokenizer files without provenance keys; a hub id (no folder here) is its own."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        return folder
    digest = hashlib.sha256()
    for name in ENGINE_FILES:
        file = path / name
        if not file.is_file():
            continue
        data = file.read_bytes()
        if name.endswith(".json"):
            content = {k: v for k, v in json.loads(data).items() if k not in PROVENANCE_KEYS}
            data = json.dumps(content, sort_keys=True).encode()
        digest.update(f"{name}:{len(data)}:".encode() + data)
    return digest.hexdigest()


def _by_architecture(models: list[Model]) -> list[list[Model]]:
    """Models grouped by architecture, in the order they came; the groups with the most
    requests first (with fewer pipelines at once than groups, the longest starts first)."""
    groups: dict[str, list[Model]] = defaultdict(list)
    for model in models:
        groups[model.architecture].append(model)
    return sorted(groups.values(), key=lambda ms: -sum(len(m.requests) for m in ms))


def _result(label: str, benchmark: str) -> str:
    """A result's name in a pipeline: its model's label and its benchmark."""
    return f"{label}/{benchmark}"


def _pipeline(
    cfg: ExperimentConfig,
    run: RunDir,
    models: list[Model],
    problems: dict[str, Problems],
    side_by_side: bool,
) -> Pipeline | None:
    """The pipeline of models of one architecture; None when no prompt of theirs fits (those
    results are written here)."""
    results = {_result(m.label, name): (m, task) for m in models for name, task in m.tasks.items()}
    requests = [request for m in models for request in m.requests]
    expected = Counter(request["result"] for request in requests)
    seal = _write_benchmark(cfg, run, results, problems)
    for name in [name for name in results if name not in expected]:
        seal(name, [])  # every prompt too long: nothing to generate
    if not requests:
        return None
    identities: dict[str, str | None] = {}  # the models the rows name, in the rows' order
    for m in models:
        if m.requests:
            identities.setdefault(m.source, m.identity)
    processor = shared_generator(
        identities,
        cfg.eval.engine,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
        postprocess=_offline_row(cfg, results),
        side_by_side=side_by_side,
    )
    groups = Groups(
        run=run,
        folder=layout.EVAL,
        column="result",
        subfolders={
            name: "/".join(
                (
                    results[name][0].label,
                    layout.PARTS,
                    layout.eval_name(task.bench.name, task.fingerprint),
                )
            )
            for name, (_, task) in results.items()
            if name in expected
        },
        expected=dict(expected),
        seal=seal,
    )
    name = ", ".join(m.label for m in models)
    return Pipeline(name, processor, requests, groups, cfg.eval.engine.batch_size)


def _write_benchmark(
    cfg: ExperimentConfig,
    run: RunDir,
    results: dict[str, tuple[Model, Task]],
    problems: dict[str, Problems],
):
    """A result's seal (runs in a Ray task): its generated samples and those too long to
    generate, written as its result file. It holds each result's task and set-aside samples,
    not the requests."""
    kept = {
        name: (task, problems[task.bench.name], model.too_long[task.bench.name])
        for name, (model, task) in results.items()
    }

    def seal(name: str, rows: list[dict[str, Any]]) -> dict[str, int]:
        task, posed, too_long = kept[name]
        write_result(cfg, run, task, posed, rows + too_long, "offline")
        return {"samples": len(rows) + len(too_long)}

    return seal


def _sealed(name: str, facts: dict[str, int]) -> None:
    log.info("sealed %s (%d samples)", name, facts["samples"])


def _offline_row(cfg: ExperimentConfig, results: dict[str, tuple[Model, Task]]):
    """A generated row graded as its model's, its response the whole completion: the thought a
    chat template prefilled (`reasoning_prefill`) and what the model wrote after it."""
    max_len = cfg.eval.engine.max_model_len
    max_tokens = {name: task.setting.sampling.max_tokens for name, (_, task) in results.items()}
    labels = {name: model.label for name, (model, _) in results.items()}  # not the requests
    scores = {label: scorer(cfg, label) for label in set(labels.values())}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        prompt_tokens, completion_tokens = row["num_input_tokens"], row["num_generated_tokens"]
        limit = max_tokens[row["result"]]
        finish = settings.finish_reason(prompt_tokens, completion_tokens, limit, max_len)
        graded = scores[labels[row["result"]]](
            {
                **row,
                "response": reasoning_prefill(row["prompt"]) + row["generated_text"],
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "finish_reason": finish,
            }
        )
        return {**graded, "result": row["result"]}

    return postprocess
