"""Rollout engines: Ray actors that hold a vLLM engine in-process and sample GRPO's groups.

The engine runs in the actor's own process (no engine subprocess, one worker), so weights pushed
by the learner reach the model as tensors, through the worker extension of `w2sr.weight_sync`,
without restarting anything.
"""

from __future__ import annotations

import os
from typing import Any

from w2sr import engines
from w2sr.config import EngineConfig, SamplingConfig
from w2sr.weight_sync import EXTENSION


class RolloutEngine:
    """One vLLM replica. Create it with `rollout_actor(...)`, which sets its resources and env."""

    def __init__(self, model: str, engine: dict, use_gpu: bool, trust_remote_code: bool, seed: int):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when vLLM builds the engine
        from vllm import LLM

        config = EngineConfig.model_validate(engine)
        kwargs = engines.engine_kwargs(config, use_gpu=use_gpu, trust_remote_code=trust_remote_code)
        self.llm = LLM(
            model=model,
            distributed_executor_backend="uni",
            worker_extension_cls=EXTENSION,
            seed=seed,
            **kwargs,
        )

    def generate(
        self, prompts: list[list[int]], sampling: dict, n: int, seeds: list[int]
    ) -> list[list[dict[str, Any]]]:
        """`n` completions per tokenized prompt: token ids, text and finish reason.

        Sample i of a prompt with seed s draws from seed s + i (vLLM's parallel sampling), so
        a group is reproducible whatever the batching.
        """
        from vllm import SamplingParams

        params = [SamplingParams(n=n, seed=seed, **sampling) for seed in seeds]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False
        )
        return [
            [
                {
                    "token_ids": list(o.token_ids),
                    "text": o.text,
                    "finish_reason": o.finish_reason,
                }
                for o in sorted(out.outputs, key=lambda o: o.index)
            ]
            for out in outputs
        ]

    def load_weights(self, named_tensors: list) -> int:
        """Replace the engine's weights in place; returns how many tensors were loaded."""
        loaded = self.llm.collective_rpc("w2sr_load_weights", args=(named_tensors,))[0]
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        return loaded

    def get_weights(self, names: list[str]) -> dict:
        return self.llm.collective_rpc("w2sr_get_weights", args=(names,))[0]


def sampling_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }


def rollout_actor(
    model: str,
    engine: EngineConfig,
    *,
    use_gpu: bool,
    trust_remote_code: bool,
    seed: int,
    placement_group=None,
    bundle_index: int = 0,
    gpu_share: float = 1.0,
):
    """Start a RolloutEngine actor.

    With a placement group (colocated with the learner), the actor goes into the learner worker's
    bundle and takes no CPU of its own (on GPU, `gpu_share` of the bundle's device); otherwise it
    reserves a replica's resources.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    env = engines.engine_env(engine, use_gpu)
    env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if placement_group is not None:
        options = {
            "num_cpus": 0,
            "num_gpus": gpu_share if use_gpu else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=bundle_index
            ),
        }
    else:
        options = {"num_cpus": engine.cpus_per_replica, "num_gpus": 1 if use_gpu else 0}
    if engine.accelerator_type and use_gpu:
        options["accelerator_type"] = engine.accelerator_type
    return (
        ray.remote(RolloutEngine)
        .options(runtime_env=env, **options)
        .remote(model, engine.model_dump(mode="json"), use_gpu, trust_remote_code, seed)
    )
