"""vLLM settings, the one source of them for generation, evaluation, rollouts and serving:
engine arguments, environment and resources, and per-sample sampling."""

from __future__ import annotations

import hashlib
from typing import Any

from w2sr.config import EngineConfig, SamplingConfig


def sample_seed(base: int, prompt_id: str, sample_index: int) -> int:
    """A distinct, reproducible seed per (prompt, sample): stable across runs and shard layouts."""
    digest = hashlib.sha256(f"{base}/{prompt_id}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sampling_params(sampling: SamplingConfig, seed: int | None = None) -> dict[str, Any]:
    """vLLM sampling parameters; without `seed`, the caller seeds each request itself."""
    params = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    return params if seed is None else {**params, "seed": seed}


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


def engine_env(engine: EngineConfig, use_gpu: bool, side_by_side: bool = False) -> dict[str, Any]:
    """The engine's environment; `side_by_side`: other engines share its node's CPUs, and vLLM's
    CPU thread binding would pin them all to the same cores, so the OS places their threads.

    On CPU, a one-rank engine runs its model in the engine-core process: vLLM otherwise starts
    a worker process for it, one more import of vLLM and torch per engine (about 8 s of an
    engine's 20-30 s start on 2 cores). The engine's threads are its Ray actor's CPUs either way.
    """
    if use_gpu:
        return {"env_vars": {}}
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_gib),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    if side_by_side:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return {"env_vars": env}


def engine_bundle(engine: EngineConfig, use_gpu: bool) -> dict[str, float]:
    """Resources of one engine worker; a replica takes one per tensor/pipeline rank."""
    return (
        {"CPU": engine.cpus_per_replica, "GPU": 1} if use_gpu else {"CPU": engine.cpus_per_replica}
    )
