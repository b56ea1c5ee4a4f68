"""Stage `eval`: every model of a run on every benchmark, k graded samples per problem.

Models are found by label (`model_table`): the teacher, the base student, the W2SR / W2SR-P /
W2SR-N students and the RL student when the run has them, and any `eval.models` extras. Each
(model, benchmark) result is one Parquet file named by a fingerprint of everything that decides
its content (the weights, the problem set, sampling, template, grader, context length), so a rerun
evaluates only what is missing and a changed setting never reuses a stale file.

Two backends produce the same rows. Offline, one Ray Data + vLLM pipeline per model runs all its
missing benchmarks (one engine start per model) and a benchmark's file is written as soon as its
last sample arrives. Through an endpoint (`w2sr serve`, or any OpenAI-compatible server that hosts
the models under their labels), requests go out with bounded concurrency, time-outs and retries.
Prompts are rendered with the run's template and the model's chat template in both cases, and
grading is the run's grader, exactly as for the teacher's traces.

Benchmark problems that are also training prompts of the run are dropped first
(`eval.decontaminate`), so a procedural benchmark cannot leak into the W2SR training set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from w2sr import engines, metrics
from w2sr.config import EvalBenchmark, ExperimentConfig
from w2sr.data import load_benchmark
from w2sr.generate import render_prompts
from w2sr.grading import GRADERS, extract_answer
from w2sr.models import resolve_model
from w2sr.rundir import DONE, RunDir
from w2sr.templates import TEMPLATES

log = logging.getLogger(__name__)

EVAL_SCHEMA = pa.schema(
    [
        ("model", pa.string()),  # the label
        ("benchmark", pa.string()),
        ("prompt_id", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),  # gold
        ("prompt", pa.string()),  # the rendered chat prompt (offline) or null (endpoint)
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("response", pa.string()),
        ("extracted_answer", pa.string()),  # null when the response gives no final answer
        ("correct", pa.bool_()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        # "stop", "length" (truncated), or "prompt_too_long" (not generated, counted wrong)
        ("finish_reason", pa.string()),
    ]
)
TOO_LONG = "prompt_too_long"

# Trained students: label -> folder of the SFT stage's output (students/{variant}/model).
STUDENTS = {"w2sr": "all", "w2sr_p": "correct", "w2sr_n": "incorrect"}


# --- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    label: str
    spec: str  # a model spec (see models.resolve_model) or the run-dir folder of a trained model
    identity: str  # what the result cache knows the weights by
    done: dict | None = None  # the producing stage's completion record (its costs), if any


def model_table(cfg: ExperimentConfig) -> tuple[dict[str, Model], dict[str, str]]:
    """The run's models by label, and the labels left out with the reason (present-only)."""
    run = RunDir(cfg.run_dir)
    models: dict[str, Model] = {"teacher": _configured("teacher", cfg.teacher)}
    skipped: dict[str, str] = {}
    if cfg.student:
        models["base"] = _configured("base", cfg.student)
    else:
        skipped["base"] = "no `student` in the config"
    trained = {label: ("students", variant) for label, variant in STUDENTS.items()}
    trained["rl"] = ("rl",)
    for label, parts in trained.items():
        if not run.exists(*parts, DONE):
            skipped[label] = f"{'/'.join(parts)}/{DONE} not found (not trained yet)"
        elif not run.exists(*parts, "model", "config.json"):
            skipped[label] = f"{'/'.join(parts)}/model has no config.json"
        else:
            done = run.read_json(*parts, DONE)
            spec = run.location(*parts, "model")
            models[label] = Model(label, spec, json.dumps(done, sort_keys=True), done)
    for label, spec in cfg.eval.models.items():
        models[label] = _configured(label, spec)
    for label, reason in skipped.items():
        log.info("model %s skipped: %s", label, reason)
    return models, skipped


def _configured(label: str, spec: str) -> Model:
    """A model named in the config: a local folder is known by its files, else by its spec."""
    folder = Path(spec).expanduser()
    if spec.startswith("builtin:") or not folder.is_dir():
        return Model(label, spec, spec)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stamp = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return Model(label, spec, hashlib.sha256(json.dumps(stamp).encode()).hexdigest())


def parameter_count(spec: str) -> int | None:
    """Parameters of a model from its safetensors headers (a local folder or the hub cache),
    without loading weights; None when the files are not on this machine."""
    folder = Path(spec).expanduser()
    if spec.startswith("builtin:"):
        folder = Path(resolve_model(spec))
    elif not folder.is_dir() and "://" not in spec:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # not cached, or not a hub id
            return None
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as stream:
            (size,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(size))
        total += sum(int(np.prod(t["shape"])) for k, t in header.items() if k != "__metadata__")
    return total


# --- problems --------------------------------------------------------------------------------


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
    training = _training_problems(run) if cfg.eval.decontaminate else set()
    out = {}
    for bench in cfg.eval.benchmarks:
        rows, rejected = load_benchmark(bench.name, bench.path, bench.split)
        if rejected:
            log.warning("%s: %d rows rejected by validation", bench.name, len(rejected))
        kept = [row for row in rows if _normal(row["problem"]) not in training]
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


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def _training_problems(run: RunDir) -> set[str]:
    if not run.exists("prompts", "prompts.parquet"):
        return set()
    problems = run.read_parquet("prompts", "prompts.parquet").column("problem").to_pylist()
    return {_normal(p) for p in problems}


# --- the stage -------------------------------------------------------------------------------


@dataclass
class Task:
    """One (model, benchmark) result: where it lives and what it covers."""

    model: Model
    bench: EvalBenchmark
    problems: Problems
    fingerprint: str

    @property
    def parts(self) -> tuple[str, str, str]:
        return ("eval", self.model.label, f"{self.bench.name}-{self.fingerprint}.parquet")


def result_fingerprint(cfg: ExperimentConfig, model: Model, name: str, problems: Problems) -> str:
    ev = cfg.eval
    decisive = {
        "model": model.identity,
        "benchmark": name,
        "problems": problems.digest(),
        "samples": ev.samples,
        "sampling": ev.sampling.model_dump(mode="json"),
        "seed": cfg.seed,
        "template": cfg.template,
        "grader": cfg.grader,
        "max_model_len": ev.engine.max_model_len,
        "dtype": ev.engine.dtype,
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:16]


def evaluate(cfg: ExperimentConfig, endpoint: str | None = None) -> dict[str, Any]:
    """Evaluate what is missing, then write and return eval/summary.json.

    With `endpoint`, missing results come from that server (models addressed by label) and a
    label it does not serve is skipped; results already on disk are used whatever made them.
    """
    run = RunDir(cfg.run_dir)
    models, skipped = model_table(cfg)
    problems = load_problems(cfg, run)
    tasks = []
    for model in models.values():
        for bench in cfg.eval.benchmarks:
            rows = problems[bench.name]
            tasks.append(Task(model, bench, rows, result_fingerprint(cfg, model, bench.name, rows)))
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
            asyncio.run(_evaluate_endpoint(cfg, run, todo, endpoint))
        else:
            _evaluate_offline(cfg, run, todo)
        log.info("%s evaluated in %.1fs", label, time.time() - start)
    done = [task for task in tasks if run.exists(*task.parts)]
    summary = _summary(cfg, run, problems, done, skipped)
    run.write_json(summary, "eval", "summary.json")
    return summary


# --- scoring (shared by both backends) -------------------------------------------------------


def _scorer(cfg: ExperimentConfig, label: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Shape one completion into an EVAL_SCHEMA row and grade it (runs in Ray or the driver)."""
    grader = GRADERS[cfg.grader]

    def score(row: dict[str, Any]) -> dict[str, Any]:
        response = row["response"]
        generated = row["finish_reason"] != TOO_LONG
        return {
            **{name: row.get(name) for name in EVAL_SCHEMA.names},
            "model": label,
            "extracted_answer": extract_answer(response) if generated else None,
            "correct": generated and grader(response, row["answer"]),
        }

    return score


def _sample_rows(cfg: ExperimentConfig, task: Task) -> list[dict[str, Any]]:
    """The k sample requests of every problem, each with its own reproducible seed.

    No `model` key: Ray Data's engine stage would read it as the name of a LoRA adapter.
    """
    base = cfg.eval.sampling.seed + cfg.seed
    return [
        {
            "benchmark": task.bench.name,
            **row,
            "sample_index": k,
            "seed": engines.sample_seed(base, f"{task.bench.name}/{row['prompt_id']}", k),
        }
        for row in task.problems.rows
        for k in range(cfg.eval.samples)
    ]


def write_result(cfg: ExperimentConfig, run: RunDir, task: Task, rows: list, backend: str):
    """A result file: rows in (problem, sample) order, provenance in the Parquet metadata."""
    rows.sort(key=lambda r: (r["prompt_id"], r["sample_index"]))
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
    }
    schema = EVAL_SCHEMA.with_metadata({"w2sr": json.dumps(meta)})
    run.write_parquet(pa.Table.from_pylist(rows, schema=schema), *task.parts)
    log.info("wrote %s (%d samples)", "/".join(task.parts), len(rows))


# --- offline: Ray Data + vLLM ----------------------------------------------------------------


def _evaluate_offline(cfg: ExperimentConfig, run: RunDir, todo: list[Task]) -> None:
    import ray

    engines.init_ray(cfg)
    model = todo[0].model
    path = resolve_model(model.spec) if "://" not in model.spec else model.spec
    # The eval engine's context length decides which prompts fit; the renderer reads it here.
    render_cfg = cfg.model_copy(
        update={"generation": cfg.generation.model_copy(update={"engine": cfg.eval.engine})}
    )
    score = _scorer(cfg, model.label)
    requests, pending, expected = [], defaultdict(list), {}
    for task in todo:
        kept, too_long = render_prompts(render_cfg, path, task.problems.rows)
        if too_long:
            log.warning(
                "%s on %s: %d prompts exceed max_model_len; counted wrong",
                model.label,
                task.bench.name,
                len(too_long),
            )
        rendered = {row["prompt_id"]: row for row in kept}
        expected[task.bench.name] = len(task.problems.rows) * cfg.eval.samples
        for sample in _sample_rows(cfg, task):
            row = rendered.get(sample["prompt_id"])
            if row is None:
                pending[task.bench.name].append(
                    score({**sample, "response": "", "finish_reason": TOO_LONG})
                )
                continue
            requests.append(
                {
                    **sample,
                    "prompt": row["prompt"],
                    "tokenized_prompt": row["prompt_token_ids"],
                    "sampling_params": engines.sampling_params(cfg.eval.sampling, sample["seed"]),
                }
            )
    tasks = {task.bench.name: task for task in todo}
    for name in [n for n in tasks if len(pending[n]) == expected[n]]:
        write_result(cfg, run, tasks[name], pending.pop(name), "offline")
    if not requests:
        return
    processor = engines.build_generator(
        path,
        cfg.eval.engine,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
        postprocess=_offline_row(cfg, score),
    )
    blocks = max(1, len(requests) // cfg.eval.engine.batch_size)
    dataset = processor(ray.data.from_items(requests, override_num_blocks=blocks))
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            name = row["benchmark"]
            pending[name].append(row)
            if len(pending[name]) == expected[name]:
                write_result(cfg, run, tasks[name], pending.pop(name), "offline")
    if pending:
        raise RuntimeError(f"evaluation of {model.label} ended incomplete: {sorted(pending)}")


def _offline_row(cfg: ExperimentConfig, score):
    max_tokens, max_len = cfg.eval.sampling.max_tokens, cfg.eval.engine.max_model_len

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        prompt_tokens, completion_tokens = row["num_input_tokens"], row["num_generated_tokens"]
        finish = engines.finish_reason(prompt_tokens, completion_tokens, max_tokens, max_len)
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


# --- through an OpenAI-compatible endpoint ---------------------------------------------------

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_TOO_LONG_MESSAGE = re.compile(r"maximum (?:context|model) length|longer than the maximum", re.I)


def api_base(endpoint: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` all name the same server."""
    return re.sub(r"/v1/?$", "", endpoint.rstrip("/"))


def _headers(cfg: ExperimentConfig) -> dict[str, str]:
    key = os.environ.get(cfg.eval.endpoint.api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


class EndpointError(RuntimeError):
    """A request the server refused for good, or that failed after every retry."""


def served_models(endpoint: str, cfg: ExperimentConfig) -> set[str]:
    """The model ids the server lists at /v1/models."""
    import httpx

    url = f"{api_base(endpoint)}/v1/models"
    try:
        response = httpx.get(url, headers=_headers(cfg), timeout=cfg.eval.endpoint.timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise EndpointError(f"cannot list the models at {url}: {error}") from error
    return {card["id"] for card in response.json()["data"]}


async def _chat(client, body: dict, retries: int, backoff_s: float) -> dict:
    """One chat completion, retried with jittered exponential back-off on transient failures."""
    import httpx

    for attempt in range(retries + 1):
        try:
            response = await client.post("/v1/chat/completions", json=body)
        except (httpx.TimeoutException, httpx.TransportError) as error:
            failure = f"{type(error).__name__}: {error}"
        else:
            if response.status_code == 200:
                return response.json()
            if response.status_code == 400 and _TOO_LONG_MESSAGE.search(response.text):
                return {"too_long": True}
            if response.status_code not in _RETRY_STATUS:
                raise EndpointError(f"HTTP {response.status_code}: {response.text[:500]}")
            failure = f"HTTP {response.status_code}: {response.text[:200]}"
        if attempt < retries:
            await asyncio.sleep(min(30.0, backoff_s * 2.0**attempt) * (0.5 + random.random()))
    raise EndpointError(f"{body['model']}: failed after {retries + 1} attempts; last: {failure}")


async def _evaluate_endpoint(
    cfg: ExperimentConfig, run: RunDir, todo: list[Task], endpoint: str
) -> None:
    import httpx

    ep, sampling = cfg.eval.endpoint, cfg.eval.sampling
    template = TEMPLATES[cfg.template]
    label = todo[0].model.label
    score = _scorer(cfg, label)
    gate = asyncio.Semaphore(ep.concurrency)
    limits = httpx.Limits(max_connections=ep.concurrency, max_keepalive_connections=ep.concurrency)
    async with httpx.AsyncClient(
        base_url=api_base(endpoint), headers=_headers(cfg), timeout=ep.timeout_s, limits=limits
    ) as client:

        async def complete(sample: dict, progress: list[int]) -> dict:
            body = {
                "model": label,
                "messages": template.messages(sample["problem"]),
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "seed": sample["seed"],
                "n": 1,
            }
            async with gate:
                reply = await _chat(client, body, ep.retries, ep.backoff_s)
            progress[0] += 1
            if progress[0] % max(1, progress[1] // 10) == 0:  # every tenth
                log.info("%s: %d of %d completions", label, *progress)
            if reply.get("too_long"):
                return {**sample, "response": "", "finish_reason": TOO_LONG}
            choice, usage = reply["choices"][0], reply.get("usage") or {}
            return {
                **sample,
                "response": choice["message"].get("content") or "",
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "finish_reason": "length" if choice.get("finish_reason") == "length" else "stop",
            }

        for task in todo:  # benchmark by benchmark, so a failure keeps the finished ones
            # Replies of an attempt that lost some requests wait here for a rerun to complete.
            partial = (*task.parts[:-1], task.parts[-1].removesuffix(".parquet") + ".partial.json")
            replies = run.read_json(*partial) if run.exists(*partial) else []
            have = {(r["prompt_id"], r["sample_index"]) for r in replies}
            samples = [
                s
                for s in _sample_rows(cfg, task)
                if (s["prompt_id"], s["sample_index"]) not in have
            ]
            progress = [0, len(samples)]
            log.info("%s on %s: %d requests", label, task.bench.name, len(samples))
            results = await asyncio.gather(
                *(complete(s, progress) for s in samples), return_exceptions=True
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            replies += [r for r in results if not isinstance(r, BaseException)]
            if failures:
                run.write_json(replies, *partial)
                if not isinstance(failures[0], EndpointError):
                    raise failures[0]
                raise EndpointError(
                    f"{label} on {task.bench.name}: {len(failures)} of {len(samples)} requests "
                    f"failed (first: {failures[0]}); the {len(replies)} replies are kept in "
                    f"{run.path(*partial)} and a rerun asks only for the rest"
                )
            rows = await asyncio.to_thread(list, map(score, replies))  # grading may take seconds
            write_result(cfg, run, task, rows, f"endpoint {api_base(endpoint)}")
            if have:
                run.delete(*partial)


# --- the summary -----------------------------------------------------------------------------


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


def _summary(
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
