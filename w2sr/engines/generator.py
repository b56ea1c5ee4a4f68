"""The Ray Data + vLLM pipeline that generation and offline evaluation run their requests through.

Stages hand over tokenized prompts, so the pipeline is the engine stage alone: no chat-template,
tokenize or detokenize actors competing for CPUs, and the prompt a stage recorded is exactly the
prompt the engine saw.

Results never pass through the driver. Each batch the engines finish is written by a worker as a
part file of its group (a shard of traces, a benchmark's samples); the driver only counts rows,
and once a group holds all its keys a Ray task seals it: its parts read, a replayed row kept
once, its artifact written whole and its parts deleted. A killed run therefore keeps every sealed
group, and a rerun generates only the rest.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from w2sr.config import EngineConfig
from w2sr.console import progress
from w2sr.engines import settings
from w2sr.rundir import RunDir


def build_generator(
    model: str,
    engine: EngineConfig,
    *,
    use_gpu: bool,
    trust_remote_code: bool,
    postprocess: Callable[[dict[str, Any]], dict[str, Any]],
    side_by_side: bool = False,
):
    """A Ray Data processor over rows with `tokenized_prompt` and `sampling_params`.

    Each row yields one completion: callers that want n samples repeat the row n times with
    distinct seeds (the processor keeps only a request's first completion). `side_by_side`: other
    pipelines' engines run at the same time (`settings.engine_env`).
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        batch_size=engine.batch_size,
        concurrency=(engine.replicas.min, engine.replicas.max),
        accelerator_type=engine.accelerator_type,
        engine_kwargs=settings.engine_kwargs(
            engine, use_gpu=use_gpu, trust_remote_code=trust_remote_code
        ),
        runtime_env=settings.engine_env(engine, use_gpu, side_by_side),
        placement_group_config={"bundle_per_worker": settings.engine_bundle(engine, use_gpu)},
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    processor = build_processor(config, postprocess=postprocess)
    processor.get_stage_by_name("vLLMEngineStage").map_batches_kwargs["max_restarts"] = (
        engine.max_restarts
    )
    return processor


@dataclass(frozen=True)
class Groups:
    """Where a pipeline's results go: rows are grouped by their `column`; group g's parts live in
    `run/folder/subfolders[g]/` (a subfolder may be a path) until `seal(g, rows)` makes them
    its artifact. `expected[g]` is how many distinct (prompt_id, sample_index) keys make the
    group whole."""

    run: RunDir
    folder: str
    column: str
    subfolders: dict[str, str]
    expected: dict[str, int]
    seal: Callable[[str, list[dict[str, Any]]], dict[str, Any]]


def generate_groups(
    processor, requests, groups: Groups, sealed: Callable[[str, dict], None], what: str
):
    """Run the `requests` dataset through `processor`, sealing each group as soon as it is whole
    and calling `sealed(group, facts)` with what its `seal` returned; the console's bar, named
    `what`, counts the rows as they arrive. A group left short once every row has arrived is an
    error naming its count."""
    import ray

    _delete_parts(groups)  # a killed attempt's parts of an unsealed group
    written = processor(requests).map_batches(
        _part_writer(groups), batch_size=None, batch_format="pyarrow", zero_copy_batch=True
    )
    seal = ray.remote(num_cpus=0)(_seal)
    arrived: Counter[str] = Counter()
    sealing: dict[str, Any] = {}  # group -> its seal task
    done: set[str] = set()
    shorts: dict[str, int] = {}

    def collect(wait: bool) -> None:
        refs = list(sealing.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0)
        for group in [g for g, ref in sealing.items() if ref in ready]:
            kept, facts = ray.get(sealing.pop(group))
            if facts is None:
                shorts[group] = kept  # a replayed row counted twice; more rows are on the way
                continue
            done.add(group)
            sealed(group, facts)

    def try_seal(group: str, every_row_arrived: bool = False) -> None:
        whole = every_row_arrived or arrived[group] >= groups.expected[group]
        if whole and group not in done and group not in sealing:
            parts = (groups.folder, groups.subfolders[group])
            sealing[group] = seal.remote(
                groups.run, parts, groups.expected[group], groups.seal, group
            )

    with progress(sum(groups.expected.values()), "requests", what) as bar:
        for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
            for group, rows in zip(
                batch["group"].to_pylist(), batch["rows"].to_pylist(), strict=True
            ):
                if group not in groups.expected:
                    raise RuntimeError(
                        f"a row of group {group!r}, which this pipeline does not make"
                    )
                arrived[group] += rows
                bar.update(rows)
                try_seal(group)
            if sealing:
                collect(wait=False)
        collect(wait=True)
    for group in groups.expected:  # a seal that ran short early, or a group of no rows
        try_seal(group, every_row_arrived=True)
    collect(wait=True)
    _delete_parts(groups)  # replays' parts that came after their seal
    short = {g: f"{shorts.get(g, 0)} of {groups.expected[g]}" for g in groups.expected}
    short = {g: n for g, n in short.items() if g not in done}
    if short:
        raise RuntimeError(f"generation ended with groups incomplete (keys present): {short}")


def _part_writer(groups: Groups):
    """A worker's side of the pipeline: each batch's rows written as one part file per group;
    what goes back to the driver is a row count per group."""

    def write(batch: pa.Table) -> pa.Table:
        column = batch[groups.column]
        names, counts = [], []
        for value in pc.unique(column).to_pylist():
            group = str(value)
            rows = batch.filter(pc.equal(column, value))
            part = f"part-{uuid.uuid4().hex}.parquet"
            groups.run.write_parquet(rows, groups.folder, groups.subfolders[group], part)
            names.append(group)
            counts.append(rows.num_rows)
        written = {"group": pa.array(names, pa.string()), "rows": pa.array(counts, pa.int64())}
        return pa.table(written)

    return write


def _delete_parts(groups: Groups) -> None:
    """The part folders of the pipeline's groups that exist, found in one listing per folder
    that holds them (a request per group would grow with the groups, thousands in a large
    generation)."""
    by_parent: dict[str, list[str]] = {}
    for name in groups.subfolders.values():
        parent, _, leaf = name.rpartition("/")
        by_parent.setdefault(parent, []).append(leaf)
    for parent, leaves in by_parent.items():
        folder = (groups.folder, parent) if parent else (groups.folder,)
        present = set(groups.run.list(*folder))
        for leaf in leaves:
            if leaf in present:
                groups.run.delete(*folder, leaf)


def _seal(
    run: RunDir,
    folder: tuple[str, str],
    expected: int,
    seal: Callable[[str, list[dict[str, Any]]], dict[str, Any]],
    group: str,
) -> tuple[int, dict[str, Any] | None]:
    """(distinct keys found, the group's facts), or no facts while keys are missing (runs in a Ray
    task, so the driver never holds a group's rows). It is sent its own group's folder and count
    only, so what the driver sends grows with the groups, not with their square."""
    parts = run.list(*folder, suffix=".parquet")
    rows: dict[tuple, dict[str, Any]] = {}
    for name in parts:
        for row in run.read_parquet(*folder, name).to_pylist():
            rows.setdefault((row["prompt_id"], row["sample_index"]), row)
    if len(rows) < expected:
        return len(rows), None
    facts = seal(group, list(rows.values()))
    for name in parts:  # not the folder: a replayed batch may be writing a part into it
        run.delete(*folder, name)
    return len(rows), facts
