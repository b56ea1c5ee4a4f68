"""Ray and vLLM plumbing shared by every stage that generates text.

Stages hand over tokenized prompts, so the Ray Data LLM pipeline is the engine stage alone: no
chat-template, tokenize or detokenize actors competing for CPUs, and the prompt a stage recorded is
exactly the prompt the engine saw.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

from w2sr.config import EngineConfig, ExperimentConfig, SamplingConfig

log = logging.getLogger(__name__)


def init_ray(cfg: ExperimentConfig) -> None:
    """Join the configured cluster (or the one `ray job submit` runs in), else start a local one.

    A local session gets more logical CPUs than cores: the data pipeline needs several actors
    alive at once and deadlocks when each must own a whole core.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"DS_ACCELERATOR": "cpu"}} if not cfg.use_gpu else None
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, runtime_env=env, include_dashboard=False)


def sample_seed(base: int, prompt_id: str, sample_index: int) -> int:
    """A distinct, reproducible seed per (prompt, sample): stable across runs and shard layouts."""
    digest = hashlib.sha256(f"{base}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sampling_params(sampling: SamplingConfig, seed: int) -> dict[str, Any]:
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": seed,
    }


def finish_reason(prompt_tokens: int, completion_tokens: int, max_tokens: int, max_len: int) -> str:
    """vLLM's finish reason, which Ray Data's engine stage does not pass on.

    A completion that stops short of both limits ended on a stop token.
    """
    if completion_tokens >= max_tokens or prompt_tokens + completion_tokens >= max_len:
        return "length"
    return "stop"


def engine_kwargs(engine: EngineConfig, *, use_gpu: bool, trust_remote_code: bool) -> dict:
    """vLLM engine arguments.

    On CPU, chunked prefill is off: when a seeded request's prompt is split across steps, vLLM
    rewinds its random generator, which CPU generators cannot do (the engine dies with "CPU
    Generator does not use offset"). Per-sample seeds matter more here than prefill chunking.
    """
    return {
        "enable_chunked_prefill": use_gpu,
        "max_model_len": engine.max_model_len,
        "dtype": engine.dtype,
        "enforce_eager": engine.enforce_eager,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "trust_remote_code": trust_remote_code,
    }


def engine_env(engine: EngineConfig, use_gpu: bool) -> dict[str, Any]:
    env = {} if use_gpu else {"VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_gib)}
    return {"env_vars": env}


def engine_bundle(engine: EngineConfig, use_gpu: bool) -> dict[str, float]:
    """Resources of one engine worker; a replica takes one per tensor/pipeline rank."""
    return (
        {"CPU": engine.cpus_per_replica, "GPU": 1} if use_gpu else {"CPU": engine.cpus_per_replica}
    )


def build_generator(
    model: str,
    engine: EngineConfig,
    *,
    use_gpu: bool,
    trust_remote_code: bool,
    postprocess: Callable[[dict[str, Any]], dict[str, Any]],
):
    """A Ray Data processor over rows with `tokenized_prompt` and `sampling_params`.

    Each row yields one completion: callers that want n samples repeat the row n times with
    distinct seeds (the processor keeps only a request's first completion).
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model,
        batch_size=engine.batch_size,
        concurrency=(engine.replicas.min, engine.replicas.max),
        accelerator_type=engine.accelerator_type,
        engine_kwargs=engine_kwargs(engine, use_gpu=use_gpu, trust_remote_code=trust_remote_code),
        runtime_env=engine_env(engine, use_gpu),
        placement_group_config={"bundle_per_worker": engine_bundle(engine, use_gpu)},
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    return build_processor(config, postprocess=postprocess)
