"""Stage `generate`: the teacher writes graded chain-of-thought traces for every prompt.

    w2sr generate CONFIG generation.samples_per_prompt=8

Prompts are split into shards of `generation.prompts_per_shard`; one Ray Data pipeline reads the
missing shards' prompts from the run dir, feeds them through the vLLM replicas, and its workers
write the traces; a shard is sealed into its file the moment its last sample is written
(`w2sr.engines.generator`). The driver holds only the plan, prompts per shard. A killed run keeps
every sealed shard, and a rerun generates only the rest: no (prompt, sample) pair is lost or
written twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from w2sr import layout
from w2sr.config import EngineConfig, ExperimentConfig
from w2sr.data.prompt_set import prepare_prompts
from w2sr.data.templates import reasoning_prefill
from w2sr.engines import settings
from w2sr.engines.generator import Groups, build_generator, generate_groups
from w2sr.grading import GRADERS, extract_answer
from w2sr.lineage import Lineage
from w2sr.models import ModelSpec
from w2sr.rundir import Claim, RunDir
from w2sr.schemas import TRACE_SCHEMA
from w2sr.session import init_ray

log = logging.getLogger(__name__)


def generate(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the stage; returns its completion record (counts, accuracy, wall-clock)."""
    run = RunDir(cfg.run_dir)
    prompt_folder = prepare_prompts(cfg, run)
    with run.stage(Lineage(cfg).traces) as claim:
        if claim.record:
            log.info("traces are complete for this config; nothing to generate")
            return claim.record
        claim.facts = _traces(cfg, run, claim, prompt_folder)
    return claim.record


def _traces(cfg: ExperimentConfig, run: RunDir, claim: Claim, prompt_folder: str) -> dict[str, Any]:
    """Generate the shards an earlier attempt did not seal; returns the done record's facts."""
    folder = claim.folder
    devices = _devices(cfg.generation.engine)

    # The plan: prompts per shard. The prompts themselves are read by the workers.
    shard_column = run.read_parquet(prompt_folder, layout.PROMPT_SET, columns=["shard"])["shard"]
    prompts_in = {c["values"]: c["counts"] for c in pc.value_counts(shard_column).to_pylist()}
    finished = set(run.list(folder, suffix=".parquet"))
    missing = sorted(s for s in prompts_in if layout.trace_shard(s) not in finished)
    log.info("%d of %d shards to generate", len(missing), len(prompts_in))
    start = time.time()

    def spent() -> float:  # the pool at its largest, each replica once per device it spans
        return claim.prior_seconds + (time.time() - start) * devices

    shard_facts: dict[int, dict[str, int]] = {}
    if missing:

        def sealed(shard: int, facts: dict[str, int]) -> None:
            shard_facts[shard] = facts
            log.info("wrote %s/%s (%d traces)", folder, layout.trace_shard(shard), facts["traces"])
            claim.spent(spent())

        todo = {shard: prompts_in[shard] for shard in missing}
        _generate_shards(cfg, run, folder, prompt_folder, todo, sealed)
    wall = time.time() - start

    samples = cfg.generation.samples_per_prompt
    for shard in prompts_in:
        facts = shard_facts.get(shard) or _shard_facts(run, folder, shard)
        if facts["prompts"] != prompts_in[shard] or facts["traces"] != prompts_in[shard] * samples:
            raise RuntimeError(
                f"{run.path(folder, layout.trace_shard(shard))} holds {facts['traces']} traces "
                f"of {facts['prompts']} prompts, not {samples} of each of {prompts_in[shard]}"
            )
        shard_facts[shard] = facts
    traces = sum(f["traces"] for f in shard_facts.values())
    return {
        "traces": traces,
        "prompts": sum(f["prompts"] for f in shard_facts.values()),
        "accuracy": sum(f["correct"] for f in shard_facts.values()) / traces if traces else 0.0,
        "wall_seconds": round(wall, 2),  # this attempt's
        "worker_seconds": round(spent(), 2),  # every attempt's, killed ones too
    }


def _generate_shards(
    cfg: ExperimentConfig,
    run: RunDir,
    folder: str,
    prompt_folder: str,
    prompts_in: dict[int, int],
    sealed,
) -> None:
    """Generate the shards of `prompts_in` (shard -> prompts), each sealed by a Ray task."""
    import ray

    init_ray(cfg)
    gen = cfg.generation
    prompts = ray.data.read_parquet(run.path(prompt_folder, layout.PROMPT_SET), filesystem=run.fs)
    requests = prompts.flat_map(_sample_requests(cfg, set(prompts_in))).repartition(
        target_num_rows_per_block=gen.engine.batch_size
    )
    processor = build_generator(
        ModelSpec.parse(cfg.teacher).for_cluster(run),
        gen.engine,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
        postprocess=_trace_row(cfg),
    )
    samples = gen.samples_per_prompt
    groups = Groups(
        run=run,
        folder=f"{folder}/{layout.PARTS}",
        column="shard",
        subfolders={str(s): layout.shard_name(s) for s in prompts_in},
        expected={str(s): n * samples for s, n in prompts_in.items()},
        seal=_write_shard(run, folder, prompt_folder, samples),
    )
    generate_groups(processor, requests, groups, lambda g, facts: sealed(int(g), facts), "")


def _sample_requests(cfg: ExperimentConfig, shards: set[int]):
    """A prompt row's `samples_per_prompt` requests, each seeded by (prompt, sample) so that
    a shard's traces are the same whatever else runs (a worker's map; no row of another shard)."""
    gen = cfg.generation
    sampling, samples = gen.sampling, gen.samples_per_prompt
    base_seed = sampling.seed + cfg.seed

    def expand(row: dict[str, Any]) -> list[dict[str, Any]]:
        if row["shard"] not in shards:
            return []
        requests = []
        for k in range(samples):
            seed = settings.sample_seed(base_seed, row["prompt_id"], k)
            requests.append(
                {
                    **{
                        key: row[key]
                        for key in ("prompt_id", "problem", "answer", "prompt", "shard")
                    },
                    "sample_index": k,
                    "seed": seed,
                    "tokenized_prompt": row["prompt_token_ids"],
                    "sampling_params": settings.sampling_params(sampling, seed),
                }
            )
        return requests

    return expand


def _write_shard(run: RunDir, folder: str, prompt_folder: str, samples: int):
    """A shard's seal (runs in a Ray task): its traces checked against its prompts, one per
    (prompt, sample), and written as one file."""

    def seal(group: str, rows: list[dict[str, Any]]) -> dict[str, int]:
        shard = int(group)
        prompts = run.read_parquet(
            prompt_folder, layout.PROMPT_SET, columns=["prompt_id"], filters=[("shard", "=", shard)]
        )
        layout.check_keys(
            f"shard {shard}",
            [(r["prompt_id"], r["sample_index"]) for r in rows],
            {(p, k) for p in prompts["prompt_id"].to_pylist() for k in range(samples)},
        )
        rows.sort(key=lambda r: (r["prompt_id"], r["sample_index"]))
        table = pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)
        run.write_parquet(table, folder, layout.trace_shard(shard))
        return _facts(table)

    return seal


def _shard_facts(run: RunDir, folder: str, shard: int) -> dict[str, int]:
    """The counts of a shard an earlier attempt sealed."""
    table = run.read_parquet(folder, layout.trace_shard(shard), columns=["prompt_id", "correct"])
    return _facts(table)


def _facts(table: pa.Table) -> dict[str, int]:
    return {
        "traces": table.num_rows,
        "prompts": pc.count_distinct(table["prompt_id"]).as_py(),
        "correct": pc.sum(table["correct"].cast(pa.int64())).as_py() or 0,
    }


def _trace_row(cfg: ExperimentConfig):
    """The per-row postprocess: shape the engine output into a graded trace (runs in Ray).

    The trace is the completion behind the `<think>` a reasoning model's chat template
    prefilled, so that it holds the whole thought and one never closed is graded as such."""
    grader, policy = GRADERS[cfg.grader], cfg.grading_policy
    max_tokens = cfg.generation.sampling.max_tokens
    max_len = cfg.generation.engine.max_model_len
    teacher = cfg.teacher

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        trace = reasoning_prefill(row["prompt"]) + row["generated_text"]
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
            "shard": row["shard"],  # the group its seal writes it into
        }

    return postprocess


def _devices(engine: EngineConfig) -> int:
    return engine.replicas.max * engine.tensor_parallel_size * engine.pipeline_parallel_size
