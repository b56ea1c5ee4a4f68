"""The Ray Data + vLLM pipeline that generation and offline evaluation run their requests through.

Stages hand over tokenized prompts, so the pipeline is the engine stage alone: no chat-template,
tokenize or detokenize actors competing for CPUs, and the prompt a stage recorded is exactly the
prompt the engine saw. Results come back in groups (a shard of traces, a benchmark's samples),
each handed over the moment its last row arrives, so a killed run keeps every finished group.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any

from w2sr.config import EngineConfig
from w2sr.engines import settings


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


def generate_groups(
    processor,
    requests: list[dict[str, Any]],
    batch_size: int,
    group: Callable[[dict[str, Any]], Hashable],
    expected: dict[Hashable, set[tuple]],
    complete: Callable[[Hashable, list[dict[str, Any]]], None],
) -> None:
    """Run `requests` through `processor` and call `complete(group, rows)` as soon as a group
    (of `group(row)`) holds each of its `expected` (prompt_id, sample_index) keys. A row that
    arrives twice (a replayed task) is kept once; a group left short is an error naming its
    missing keys."""
    import ray

    blocks = max(1, len(requests) // batch_size)
    dataset = processor(ray.data.from_items(requests, override_num_blocks=blocks))
    pending: dict[Hashable, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    done: set[Hashable] = set()
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            name, key = group(row), (row["prompt_id"], row["sample_index"])
            if key not in expected[name]:
                raise RuntimeError(f"group {name}: unexpected key {key}")
            if name in done or key in pending[name]:
                continue  # a replay of a row already kept
            pending[name][key] = row
            if len(pending[name]) == len(expected[name]):
                complete(name, list(pending.pop(name).values()))
                done.add(name)
    short = {
        name: sorted(keys - pending.get(name, {}).keys())[:5]
        for name, keys in expected.items()
        if name not in done
    }
    if short:
        raise RuntimeError(f"generation ended with groups incomplete (first missing keys): {short}")
