"""GRPO's rollouts, driven by the learner's rank 0: what the loop asks of its rollout engines
(`Generator`), the step's graded groups with their rewards and advantages, and the production
engines (`Rollouts`: vLLM replicas in Ray actors, `w2sr.engines.rollout`) with the sender that
brings them the learner's new weights."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from w2sr.config import ExperimentConfig, GRPOConfig, SamplingConfig
from w2sr.engines import rollout
from w2sr.engines.rollout import answers, rollout_actor
from w2sr.engines.settings import sample_seed, sampling_params
from w2sr.engines.weight_sync import CollectiveSender, ObjectStoreSender, transport
from w2sr.grading import extract_answer, grade_batch
from w2sr.learner.batches import RolloutBatch, step_samples
from w2sr.learner.rl_loss import group_advantages


def graded(
    prompts: list[dict], groups: list[list[dict]], grader: str, policy: str
) -> tuple[np.ndarray, np.ndarray]:
    """(correct, answered) of each completion, the groups' in order. A completion is what the
    policy wrote and what the loss covers; it is graded behind the `<think>` its prompt's chat
    template prefilled, so that a thought it never closed reads as one."""
    pairs = [(p, o) for p, group in zip(prompts, groups, strict=True) for o in group]
    texts = [p["prefill"] + o["text"] for p, o in pairs]
    golds = [p["answer"] for p, _ in pairs]
    correct = np.array(grade_batch(texts, golds, grader, policy), dtype=bool)
    answered = np.array([extract_answer(t, policy) is not None for t in texts], dtype=bool)
    return correct, answered


def grpo_section(cfg: ExperimentConfig) -> GRPOConfig:
    """The config's `grpo` section; the stage refuses a config without one before Ray starts."""
    if cfg.grpo is None:
        raise ValueError("grpo: not set")
    return cfg.grpo


def step_requests(
    cfg: ExperimentConfig, prompts: list[dict], step: int
) -> tuple[list[dict], list[int]]:
    """The step's prompts and the sampling seed of each: both depend only on (seed, step), so a
    resumed run samples the groups the killed one did."""
    g = grpo_section(cfg)
    seed = cfg.seed + g.seed
    chosen = [
        prompts[i]
        for i in step_samples(len(prompts), g.prompts_per_step, seed, step * g.prompts_per_step)
    ]
    seeds = [sample_seed(seed + g.sampling.seed, f"{step}/{p['prompt_id']}", 0) for p in chosen]
    return chosen, seeds


def rollout_batch(
    cfg: ExperimentConfig, chosen: list[dict], groups: list[list[dict]]
) -> RolloutBatch:
    """The step's groups graded: reward 1 for a correct completion, `format_reward` for a
    readable wrong one, else 0, and advantages normalised within each group."""
    g = grpo_section(cfg)
    correct, answered = graded(chosen, groups, cfg.grader, cfg.grading_policy)
    rewards = np.where(correct, 1.0, np.where(answered, g.format_reward, 0.0))
    return RolloutBatch(
        prompt_ids=[p["prompt_token_ids"] for p in chosen for _ in range(g.group_size)],
        completion_ids=[o["token_ids"] for group in groups for o in group],
        advantages=group_advantages(rewards, g.group_size).tolist(),
        rewards=rewards.tolist(),
        correct=correct.tolist(),
        answered=answered.tolist(),
        truncated=[o["finish_reason"] == "length" for group in groups for o in group],
    )


class WeightSender(Protocol):
    """One weight sync's way to the engines: every tensor in turn, then the engines' loads."""

    def send(self, name: str, tensor: Any) -> None: ...

    def finish(self) -> list[int]:
        """How many tensors each engine loaded."""
        ...


class Generator(Protocol):
    """What GRPO's rank 0 asks of its rollout engines: `Rollouts` (vLLM in Ray actors) in a run,
    an in-process sampler in tests of the loop."""

    def sample(self, prompts: list[dict], step: int) -> RolloutBatch:
        """The step's graded groups (`step_requests`, `rollout_batch`)."""
        ...

    def evaluate(self, benchmarks: dict[str, list[dict]]) -> dict[str, float]:
        """The current policy's accuracy on each benchmark."""
        ...

    def sender(self, specs: list[tuple[str, str, list[int]]]) -> WeightSender:
        """The way of one sync's tensors, announced as (name, dtype, shape)."""
        ...

    def sleep(self) -> None:
        """Free the learner's device, if the engines share it, until `wake_up`."""
        ...

    def wake_up(self) -> None: ...

    def close(self) -> None: ...


class Rollouts:
    """The rollout engines of a run (a `Generator`).

    Every wait on the engines is bounded (`w2sr.engines.rollout.answers`)."""

    @classmethod
    def start(cls, cfg: ExperimentConfig, model: str, learners: list[dict]) -> Rollouts:
        """Start the run's engines. `learners`: each learner worker's `node_id`, `cpus` and
        `gpu_ids`, by rank."""
        g = grpo_section(cfg)
        colocated = g.placement == "colocated"
        actors = [
            rollout_actor(
                model,
                g.engine,
                use_gpu=cfg.use_gpu,
                trust_remote_code=cfg.trust_remote_code,
                seed=cfg.seed + g.seed,
                beside=learners[i] if colocated else None,
            )
            for i in range(g.engine.replicas.max)
        ]
        return cls(cfg, actors)

    def __init__(self, cfg: ExperimentConfig, actors: list):
        """`actors`: the engines (`RolloutEngine` actors)."""
        g = grpo_section(cfg)
        colocated = g.placement == "colocated"
        self.actors = actors
        self.sleeps = colocated and cfg.use_gpu
        self.transport = transport(g.weight_sync, use_gpu=cfg.use_gpu, colocated=colocated)
        self.backend = "nccl" if cfg.use_gpu else "gloo"
        self.collective: CollectiveSender | None = None  # opened at the first sync
        self.cfg = cfg
        self.g = g

    def sample(self, prompts: list[dict], step: int) -> RolloutBatch:
        chosen, seeds = step_requests(self.cfg, prompts, step)
        groups = self._generate(chosen, self.g.sampling, self.g.group_size, seeds)
        return rollout_batch(self.cfg, chosen, groups)

    def evaluate(self, benchmarks: dict[str, list[dict]]) -> dict[str, float]:
        """Accuracy on each benchmark's problems, one answer each at `eval.sampling` with the
        evaluation's seeds and grading policy: the current policy measured as `w2sr eval`
        measures a model."""
        sampling, base = self.cfg.eval.sampling, self.cfg.eval.sampling.seed + self.cfg.seed
        out = {}
        for name, problems in benchmarks.items():
            seeds = [sample_seed(base, f"{name}/{p['prompt_id']}", 0) for p in problems]
            groups = self._generate(problems, sampling, 1, seeds)
            correct, _ = graded(problems, groups, self.cfg.grader, self.cfg.eval_grading_policy)
            out[name] = float(np.mean(correct))
        return out

    def _generate(
        self, prompts: list[dict], sampling: SamplingConfig, n: int, seeds: list[int]
    ) -> list[list[dict]]:
        """`n` completions of each prompt, the prompts dealt round-robin to the engines."""
        shares = [list(range(i, len(prompts), len(self.actors))) for i in range(len(self.actors))]
        pending = [
            actor.generate.remote(
                [prompts[i]["prompt_token_ids"] for i in share],
                sampling_params(sampling),
                n,
                [seeds[i] for i in share],
            )
            for actor, share in zip(self.actors, shares, strict=True)
        ]
        groups: list[list[dict]] = [[] for _ in prompts]
        results = answers(pending, "generate", rollout.GENERATE_TIMEOUT_S)
        for share, outputs in zip(shares, results, strict=True):
            for i, group in zip(share, outputs, strict=True):
                groups[i] = group
        return groups

    def sender(self, specs: list[tuple[str, str, list[int]]]) -> WeightSender:
        """What rank 0 sends this sync's tensors through (`w2sr.engines.weight_sync`)."""
        if self.transport == "object_store":
            return ObjectStoreSender(self.actors)
        if self.collective is None:
            self.collective = CollectiveSender.open(self.actors, self.backend)
        return self.collective.start(specs)

    def sleep(self) -> None:
        if self.sleeps:
            refs = [actor.sleep.remote() for actor in self.actors]
            answers(refs, "sleep", rollout.SLEEP_TIMEOUT_S)

    def wake_up(self) -> None:
        if self.sleeps:
            refs = [actor.wake_up.remote() for actor in self.actors]
            answers(refs, "wake_up", rollout.SLEEP_TIMEOUT_S)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
