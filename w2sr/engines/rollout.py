"""Rollout engines: Ray actors that hold a vLLM engine in-process and sample GRPO's groups.

The engine runs in the actor's own process (no engine subprocess, one worker), so weights pushed
by the learner reach the model as tensors, through the worker extension of
`w2sr.engines.weight_sync`, without restarting anything. An engine colocated with a learner
worker on a GPU shares its device and sleeps (weights to host memory, KV cache freed) while the
learner updates.

Every wait on the engines is bounded (`answers`): an engine that hangs (a stuck device, a lost
node whose actor Ray has not yet declared dead) fails the step with an error naming the call and
the engines, instead of holding the run until its job's deadline.
"""

from __future__ import annotations

import os
from typing import Any

from w2sr.config import EngineConfig
from w2sr.engines import settings
from w2sr.engines.weight_sync import EXTENSION

# Bounds of the waits on the engines, in seconds. Generation covers a step's groups or a held-out
# evaluation of long sequences on a large model, and the engines' start before their first call;
# the others move or free weights.
GENERATE_TIMEOUT_S = 3600.0
SLEEP_TIMEOUT_S = 600.0  # sleep and wake-up
SYNC_TIMEOUT_S = 1800.0  # a weight sync: loading the learner's weights, joining the weight group


class RolloutEngine:
    """One vLLM replica. Create it with `rollout_actor(...)`, which sets its resources and env."""

    def __init__(
        self,
        model: str,
        engine: dict,
        use_gpu: bool,
        trust_remote_code: bool,
        seed: int,
        sleep_mode: bool = False,
    ):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when vLLM builds the engine
        from vllm import LLM

        from w2sr.models import ModelSpec

        config = EngineConfig.model_validate(engine)
        kwargs = settings.engine_kwargs(
            config, use_gpu=use_gpu, trust_remote_code=trust_remote_code
        )
        self.llm = LLM(
            model=ModelSpec.parse(model).local(),
            # One rank runs in this process; several (evaluation's shared engines) are
            # processes on this actor's node, with its GPUs.
            distributed_executor_backend="uni"
            if config.tensor_parallel_size * config.pipeline_parallel_size == 1
            else "mp",
            worker_extension_cls=EXTENSION,
            seed=seed,
            enable_sleep_mode=sleep_mode,
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
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, seed=seed, **sampling) for seed in seeds]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
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

    def complete(self, prompts: list[list[int]], params: list[dict]) -> list[dict[str, Any]]:
        """One completion per tokenized prompt, each with its own sampling parameters (seed
        included): its text and how many tokens it took."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
            [SamplingParams(**p) for p in params],
            use_tqdm=False,
        )
        return [
            {
                "generated_text": o.outputs[0].text,
                "num_generated_tokens": len(o.outputs[0].token_ids),
            }
            for o in outputs
        ]

    def load_folder(self, folder: str) -> None:
        """Replace the engine's weights in place by those of another model of its
        architecture, read from that model's folder."""
        self._reloaded(self.llm.collective_rpc("w2sr_load_folder", args=(folder,)))

    def load_weights(self, named_tensors: list) -> int:
        """Replace the engine's weights in place; returns how many tensors were loaded."""
        return self._reloaded(self.llm.collective_rpc("w2sr_load_weights", args=(named_tensors,)))

    def join_weight_group(
        self, host: str, port: int, rank: int, world_size: int, backend: str, secret: str
    ):
        self.llm.collective_rpc(
            "w2sr_join_weight_group", args=(host, port, rank, world_size, backend, secret)
        )

    def receive_weights(self, specs: list) -> int:
        """Load the weights the learner broadcasts to its weight group (see weight_sync)."""
        return self._reloaded(self.llm.collective_rpc("w2sr_receive_weights", args=(specs,)))

    def _reloaded(self, results: list) -> int:
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        return results[0]

    def sleep(self) -> None:
        """Free the device for the learner: weights to host memory, KV cache dropped."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()


def answers(refs: list, call: str, timeout_s: float) -> list:
    """`ray.get` of one call's results, one per engine in order, within `timeout_s`; past it,
    `GetTimeoutError` names the call and the engines that had not answered."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        late = [str(i) for i, ref in enumerate(refs) if ref not in ready]
        raise GetTimeoutError(
            f"rollout engine(s) {', '.join(late)} of {len(refs)} did not answer {call} within "
            f"{timeout_s:g}s"
        ) from None


def actor_options(engine: EngineConfig, *, use_gpu: bool, beside: dict | None = None) -> dict:
    """Ray options of a rollout actor.

    `beside` (a learner worker's `node_id`, `cpus` and `gpu_ids`) colocates the engine with that
    worker: same node, no resources of its own (Ray Train holds the worker's), as many threads as
    the worker has CPUs (they take turns) and, on GPUs, the worker's device. Otherwise the engine
    reserves a replica's resources.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    env = settings.engine_env(engine, use_gpu)
    if beside is not None:
        options = {
            "num_cpus": 0,
            "num_gpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(beside["node_id"], soft=False),
        }
        # Ray gives an actor without CPUs one thread unless told otherwise.
        env["env_vars"]["OMP_NUM_THREADS"] = str(beside["cpus"])
        if use_gpu:
            env["env_vars"]["CUDA_VISIBLE_DEVICES"] = ",".join(beside["gpu_ids"])
    else:
        options = {"num_cpus": engine.cpus_per_replica, "num_gpus": 1 if use_gpu else 0}
        if engine.accelerator_type and use_gpu:
            options["accelerator_type"] = engine.accelerator_type
    return {"runtime_env": env, **options}


def rollout_actor(
    model: str,
    engine: EngineConfig,
    *,
    use_gpu: bool,
    trust_remote_code: bool,
    seed: int,
    beside: dict | None = None,
):
    """Start a RolloutEngine actor (see `actor_options` for `beside`)."""
    import ray

    sleep_mode = use_gpu and beside is not None
    return (
        ray.remote(RolloutEngine)
        .options(**actor_options(engine, use_gpu=use_gpu, beside=beside))
        .remote(model, engine.model_dump(mode="json"), use_gpu, trust_remote_code, seed, sleep_mode)
    )
