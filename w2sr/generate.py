"""Stage `generate`: the teacher writes graded chain-of-thought traces for every prompt.

Prompts are split into shards of `generation.prompts_per_shard`; one Ray Data pipeline feeds all
missing shards through the vLLM replicas and the driver writes a shard the moment its last sample
arrives. A killed run therefore keeps every finished shard, and a rerun generates only the rest:
no (prompt, sample) pair is lost or written twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa

from w2sr import engines
from w2sr.config import ConfigError, EngineConfig, ExperimentConfig
from w2sr.data import load_prompts
from w2sr.grading import GRADERS, extract_answer
from w2sr.models import resolve_model
from w2sr.rundir import RunDir
from w2sr.templates import TEMPLATES

log = logging.getLogger(__name__)

PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("prompt", pa.string()),  # the rendered chat prompt, exactly as the engine saw it
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("shard", pa.int32()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("prompt_id", pa.string()),
        ("reason", pa.string()),
        ("row", pa.string()),  # the source row as JSON
    ]
)
TRACE_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("problem", pa.string()),
        ("answer", pa.string()),  # gold
        ("teacher", pa.string()),  # the model spec from the config
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("trace", pa.string()),
        ("extracted_answer", pa.string()),  # null when the trace gives no final answer
        ("correct", pa.bool_()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("finish_reason", pa.string()),  # "stop" or "length" (truncated)
    ]
)


def render_prompts(cfg: ExperimentConfig, model_path: str, rows: list[dict]) -> tuple[list, list]:
    """Apply the template and the model's chat template; set aside prompts the model cannot fit."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    template = TEMPLATES[cfg.template]
    limit = cfg.generation.engine.max_model_len
    kept, rejected = [], []
    for index, row in enumerate(rows):
        prompt = template.render(tokenizer, row["problem"])
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) >= limit:
            reason = f"prompt has {len(ids)} tokens; max_model_len is {limit}"
            rejected.append(_rejection(index, row, reason))
            continue
        kept.append({**row, "prompt": prompt, "prompt_token_ids": ids})
    return kept, rejected


def _rejection(index: int, row: dict, reason: str) -> dict:
    return {"index": index, "prompt_id": row["prompt_id"], "reason": reason, "row": json.dumps(row)}


def prepare_prompts(cfg: ExperimentConfig, run: RunDir) -> pa.Table:
    """Load, validate and render the prompt set once; later stages read it from the run dir."""
    fingerprint = (
        cfg.fingerprint("prompts", "template", "teacher")
        + str(cfg.generation.engine.max_model_len)
        + str(cfg.generation.prompts_per_shard)
    )
    if run.done("prompts", fingerprint):
        return run.read_parquet("prompts", "prompts.parquet")
    rows, rejected = load_prompts(cfg.prompts)
    rows, too_long = render_prompts(cfg, resolve_model(cfg.teacher), rows)
    rejected += too_long
    per_shard = cfg.generation.prompts_per_shard
    for position, row in enumerate(rows):
        row["shard"] = position // per_shard
    table = pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)
    run.write_parquet(table, "prompts", "prompts.parquet")
    run.write_parquet(
        pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA), "prompts", "rejected.parquet"
    )
    if rejected:
        log.warning(
            "%d prompt rows set aside; see %s",
            len(rejected),
            run.path("prompts", "rejected.parquet"),
        )
    if not rows:
        raise ConfigError(
            f"prompts: none of {len(rejected)} rows is usable; the reasons are in "
            f"{run.path('prompts', 'rejected.parquet')}"
        )
    run.mark_done("prompts", fingerprint, prompts=len(rows), rejected=len(rejected))
    return table


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def generation_fingerprint(cfg: ExperimentConfig, prompts_fingerprint: str) -> str:
    gen = cfg.fingerprint("generation", "grader", "seed")
    return f"{prompts_fingerprint}-{gen}"


def generate(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the stage; returns its completion record (counts, accuracy, wall-clock)."""
    run = RunDir(cfg.run_dir)
    prompts = prepare_prompts(cfg, run)
    fingerprint = generation_fingerprint(cfg, run.read_json("prompts", "_DONE.json")["fingerprint"])
    record = run.done("traces", fingerprint)
    if record:
        log.info("traces are complete for this config; nothing to generate")
        return record
    run.begin("traces", fingerprint)

    shards = sorted(set(prompts.column("shard").to_pylist()))
    finished = {name for name in run.list("traces", suffix=".parquet")}
    missing = [s for s in shards if shard_name(s) not in finished]
    log.info("%d of %d shards to generate", len(missing), len(shards))
    start = time.time()
    if missing:
        _generate_shards(cfg, run, prompts, missing)
    wall = time.time() - start
    return _finish(cfg, run, fingerprint, shards, wall)


def _generate_shards(
    cfg: ExperimentConfig, run: RunDir, prompts: pa.Table, missing: list[int]
) -> None:
    import ray

    engines.init_ray(cfg)
    gen = cfg.generation
    wanted = set(missing)
    requests = []
    for row in prompts.to_pylist():
        if row["shard"] not in wanted:
            continue
        for k in range(gen.samples_per_prompt):
            seed = engines.sample_seed(gen.sampling.seed + cfg.seed, row["prompt_id"], k)
            requests.append(
                {
                    **{
                        key: row[key]
                        for key in ("prompt_id", "problem", "answer", "prompt", "shard")
                    },
                    "sample_index": k,
                    "seed": seed,
                    "tokenized_prompt": row["prompt_token_ids"],
                    "sampling_params": engines.sampling_params(gen.sampling, seed),
                }
            )
    processor = engines.build_generator(
        resolve_model(cfg.teacher),
        gen.engine,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
        postprocess=_trace_row(cfg),
    )
    blocks = max(1, len(requests) // gen.engine.batch_size)
    dataset = processor(ray.data.from_items(requests, override_num_blocks=blocks))

    expected = defaultdict(int)
    for request in requests:
        expected[request["shard"]] += 1
    pending: dict[int, list[dict]] = defaultdict(list)
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            shard = row.pop("shard")
            pending[shard].append(row)
            if len(pending[shard]) == expected[shard]:
                _write_shard(run, shard, pending.pop(shard))
    if pending:
        raise RuntimeError(f"generation ended with shards incomplete: {sorted(pending)}")


def _trace_row(cfg: ExperimentConfig):
    """The per-row postprocess: shape the engine output into a graded trace (runs in Ray)."""
    grader = GRADERS[cfg.grader]
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
            "extracted_answer": extract_answer(trace),
            "correct": grader(trace, row["answer"]),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "finish_reason": engines.finish_reason(
                prompt_tokens, completion_tokens, max_tokens, max_len
            ),
            "shard": row["shard"],
        }

    return postprocess


def _write_shard(run: RunDir, shard: int, rows: list[dict]) -> None:
    rows.sort(key=lambda r: (r["prompt_id"], r["sample_index"]))
    run.write_parquet(pa.Table.from_pylist(rows, schema=TRACE_SCHEMA), "traces", shard_name(shard))
    log.info("wrote traces/%s (%d traces)", shard_name(shard), len(rows))


def _finish(
    cfg: ExperimentConfig, run: RunDir, fingerprint: str, shards: list[int], wall: float
) -> dict:
    import pyarrow.compute as pc

    traces = read_traces(run)
    present = len(run.list("traces", suffix=".parquet"))
    if present != len(shards):
        raise RuntimeError(f"{present} of {len(shards)} trace shards present after generation")
    facts = {
        "traces": traces.num_rows,
        "prompts": len(set(traces.column("prompt_id").to_pylist())),
        "accuracy": pc.mean(traces.column("correct").cast(pa.float64())).as_py()
        if traces.num_rows
        else 0.0,
        "wall_seconds": round(wall, 2),
        # the pool at its largest, each replica counted once per device it spans
        "worker_seconds": round(wall * _devices(cfg.generation.engine), 2),
    }
    run.mark_done("traces", fingerprint, **facts)
    return run.read_json("traces", "_DONE.json")


def _devices(engine: EngineConfig) -> int:
    return engine.replicas.max * engine.tensor_parallel_size * engine.pipeline_parallel_size


def read_traces(run: RunDir) -> pa.Table:
    names = run.list("traces", suffix=".parquet")
    if not names:
        return TRACE_SCHEMA.empty_table()
    return pa.concat_tables([run.read_parquet("traces", name) for name in names])
