"""Stage `generate`: the teacher writes graded chain-of-thought traces for every prompt.

    w2sr generate CONFIG generation.samples_per_prompt=8

Prompts are split into shards of `generation.prompts_per_shard`; one Ray Data pipeline feeds all
missing shards through the vLLM replicas and the driver writes a shard the moment its last sample
arrives. A killed run therefore keeps every finished shard, and a rerun generates only the rest:
no (prompt, sample) pair is lost or written twice.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from w2sr import layout, lineage
from w2sr.config import EngineConfig, ExperimentConfig
from w2sr.data.prompt_set import prepare_prompts
from w2sr.engines import settings
from w2sr.engines.generator import build_generator, generate_groups
from w2sr.grading import GRADERS, extract_answer
from w2sr.registry import published
from w2sr.rundir import DONE, RunDir
from w2sr.schemas import TRACE_SCHEMA
from w2sr.session import init_ray

log = logging.getLogger(__name__)


def generate(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the stage; returns its completion record (counts, accuracy, wall-clock)."""
    run = RunDir(cfg.run_dir)
    prompts = prepare_prompts(cfg, run)
    artifact = lineage.traces(cfg)
    folder, fingerprint = artifact.folder, artifact.fingerprint
    record = run.done(folder, fingerprint)
    if record:
        log.info("traces are complete for this config; nothing to generate")
        return record
    prior_seconds = run.begin(folder, fingerprint)
    devices = _devices(cfg.generation.engine)

    shards = sorted(set(prompts.column("shard").to_pylist()))
    finished = set(run.list(folder, suffix=".parquet"))
    missing = [s for s in shards if layout.trace_shard(s) not in finished]
    log.info("%d of %d shards to generate", len(missing), len(shards))
    start = time.time()

    def spent() -> float:  # the pool at its largest, each replica once per device it spans
        return prior_seconds + (time.time() - start) * devices

    if missing:
        _generate_shards(
            cfg, run, folder, prompts, missing, lambda: run.spent(folder, fingerprint, spent())
        )
    wall = time.time() - start

    traces = layout.read_traces(run, folder)
    present = len(run.list(folder, suffix=".parquet"))
    if present != len(shards):
        raise RuntimeError(f"{present} of {len(shards)} trace shards present after generation")
    samples = range(cfg.generation.samples_per_prompt)
    layout.check_keys(
        f"traces in {run.path(folder)}",
        list(zip(traces["prompt_id"].to_pylist(), traces["sample_index"].to_pylist(), strict=True)),
        {(p, k) for p in prompts["prompt_id"].to_pylist() for k in samples},
    )
    facts = {
        "traces": traces.num_rows,
        "prompts": len(set(traces.column("prompt_id").to_pylist())),
        "accuracy": pc.mean(traces.column("correct").cast(pa.float64())).as_py()
        if traces.num_rows
        else 0.0,
        "wall_seconds": round(wall, 2),  # this attempt's
        "worker_seconds": round(spent(), 2),  # every attempt's, killed ones too
    }
    run.mark_done(folder, fingerprint, **facts)
    return run.read_json(folder, DONE)


def _generate_shards(
    cfg: ExperimentConfig,
    run: RunDir,
    folder: str,
    prompts: pa.Table,
    missing: list[int],
    record_cost,
) -> None:
    init_ray(cfg)
    gen = cfg.generation
    wanted = set(missing)
    requests = []
    for row in prompts.to_pylist():
        if row["shard"] not in wanted:
            continue
        for k in range(gen.samples_per_prompt):
            seed = settings.sample_seed(gen.sampling.seed + cfg.seed, row["prompt_id"], k)
            requests.append(
                {
                    **{
                        key: row[key]
                        for key in ("prompt_id", "problem", "answer", "prompt", "shard")
                    },
                    "sample_index": k,
                    "seed": seed,
                    "tokenized_prompt": row["prompt_token_ids"],
                    "sampling_params": settings.sampling_params(gen.sampling, seed),
                }
            )
    processor = build_generator(
        published(cfg.teacher, run),
        gen.engine,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
        postprocess=_trace_row(cfg),
    )
    expected = defaultdict(set)
    for request in requests:
        expected[request["shard"]].add((request["prompt_id"], request["sample_index"]))

    def write_shard(shard: int, rows: list[dict]) -> None:
        rows.sort(key=lambda r: (r["prompt_id"], r["sample_index"]))
        table = pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)
        run.write_parquet(table, folder, layout.trace_shard(shard))
        log.info("wrote %s/%s (%d traces)", folder, layout.trace_shard(shard), len(rows))
        record_cost()

    generate_groups(
        processor,
        requests,
        gen.engine.batch_size,
        lambda row: row.pop("shard"),
        expected,
        write_shard,
    )


def _trace_row(cfg: ExperimentConfig):
    """The per-row postprocess: shape the engine output into a graded trace (runs in Ray)."""
    grader, policy = GRADERS[cfg.grader], cfg.grading_policy
    max_tokens = cfg.generation.sampling.max_tokens
    max_len = cfg.generation.engine.max_model_len
    teacher = cfg.teacher

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        trace = row["generated_text"]
        prompt_tokens, completion_tokens = row["num_input_tokens"], row["num_generated_tokens"]
        return {
            "prompt_id": row["prompt_id"],
            "problem": row["problem"],
            "answer": row["answer"],
            "teacher": teacher,
            "sample_index": row["sample_index"],
            "seed": row["seed"],
            "prompt": row["prompt"],
            "trace": trace,
            "extracted_answer": extract_answer(trace, policy),
            "correct": grader(trace, row["answer"], policy),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "finish_reason": settings.finish_reason(
                prompt_tokens, completion_tokens, max_tokens, max_len
            ),
            "shard": row["shard"],
        }

    return postprocess


def _devices(engine: EngineConfig) -> int:
    return engine.replicas.max * engine.tensor_parallel_size * engine.pipeline_parallel_size
