"""The GRPO learner, one Ray Train worker of it: rank 0 samples the step's groups through the
rollout engines and broadcasts them; every rank takes its share of the update; then the new
weights go to the engines.

Old-policy log-probabilities are the learner's own, not vLLM's: with one optimizer step per
rollout (the default) they are the current ones detached, at no cost, and the ratio is exactly 1
on the first pass instead of carrying the numerical gap between vLLM's and the learner's kernels
(which would make the clip fire on noise). With several mini-batches they are computed by one
no-grad pass before the first update.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

from w2sr.config import GRPOConfig
from w2sr.learner.batches import RolloutBatch, assistant_end, micro_batch_plan, rollout_rows
from w2sr.learner.engine import build_engine, data_parallel_scale
from w2sr.learner.fit import start_worker
from w2sr.learner.loop import StepLoop
from w2sr.learner.reference import reference_model
from w2sr.learner.rl_loss import micro_batch_loss, policy_loss, response_logprobs, response_loss
from w2sr.learner.rollouts import Generator, Rollouts, grpo_section

# The step metrics sent to MLflow / W&B when configured.
TRACKED = (
    "reward_mean",
    "accuracy",
    "kl",
    "entropy",
    "response_length",
    "clip_fraction",
    "loss",
    "lr",
    "grad_norm",
    "rollout_seconds",
    "learner_seconds",
    "sync_seconds",
    "step_seconds",
)


def worker_loop(config: dict[str, Any]) -> None:
    """One learner worker; rank 0 also drives the rollouts, the sync and the logs."""
    worker = start_worker(config)
    cfg, rank, world = worker.cfg, worker.rank, worker.world

    import ray

    g = grpo_section(cfg)
    model = worker.model
    # Only rank 0 samples and measures: the other ranks fetch no prompt, and know of the held-out
    # benchmarks only their names (a step that measures them is collective).
    if rank == 0:
        prompts, heldout = ray.get(config["prompts"]), ray.get(config["heldout"])
    else:
        prompts, heldout = [], {name: [] for name in config["heldout_names"]}
    # Engines start in their actors while DeepSpeed initializes here; each finds the model on
    # its own node.
    places = learner_places()
    rollouts = Rollouts.start(cfg, config["model"], places) if rank == 0 else None
    engine, _ds_config = build_engine(
        model,
        g,
        g.steps * g.mini_batches,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
    )
    reference = (
        reference_model(model, g, use_gpu=cfg.use_gpu, trust_remote_code=cfg.trust_remote_code)
        if g.kl_coef
        else None
    )
    separate = g.engine.replicas.max if g.placement == "separate" else 0
    loop = StepLoop(
        worker,
        engine,
        g,
        run_name=config["name"],
        stage=config["stage"],
        steps=g.steps,
        workers=world + separate,
        start={},
    )
    step = GRPOStep(engine, reference, rollouts, g, prompts, heldout, worker.seed)
    loop.run(step, describe, TRACKED)
    if rollouts:
        rollouts.close()
    loop.finish(assistant_end(worker.tokenizer))


class GRPOStep:
    """One GRPO step on every rank: rank 0 samples the step's groups through its `generator`
    (None on the other ranks) and broadcasts them, every rank takes its share of the update,
    the new weights go to the engines, and held-out accuracy is measured every `eval_every` steps
    and after the last. `engine` is the policy with its optimizer (DeepSpeed's engine in a run),
    `reference` the frozen policy of the KL term, if any. Collective: every rank calls it, in
    the same order."""

    def __init__(
        self,
        engine: Any,
        reference: Any,
        generator: Generator | None,
        g: GRPOConfig,
        prompts: list[dict],
        heldout: dict[str, list[dict]],
        seed: int,
    ):
        self.engine, self.reference, self.generator, self.g = engine, reference, generator, g
        self.prompts, self.heldout, self.seed = prompts, heldout, seed
        self.first = True

    def __call__(self, index: int, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch
        import torch.distributed as dist

        g, engine, generator = self.g, self.engine, self.generator
        if self.first and index:  # resumed: the engines start from the base weights
            sync_weights(engine, generator)
        self.first = False
        began = time.time()
        box: list[Any] = [generator.sample(self.prompts, index) if generator else None]
        if generator:
            generator.sleep()
        dist.broadcast_object_list(box, src=0)
        batch: RolloutBatch = box[0]
        rolled = time.time()
        lr = engine.get_lr()[0]
        stats = update(engine, self.reference, batch, g, index, self.seed)
        learned = time.time()
        if torch.cuda.is_available():
            # Engines beside the learners wake into what each learner's allocator gives back.
            torch.cuda.empty_cache()
            dist.barrier()
        if generator:
            generator.wake_up()
        sync_weights(engine, generator)
        synced = time.time()
        measured = {}
        every = g.eval_every
        if self.heldout and every and ((index + 1) % every == 0 or index + 1 == g.steps):
            box = [generator.evaluate(self.heldout) if generator else None]
            dist.broadcast_object_list(box, src=0)  # every rank waits, as it would for a step
            measured = {"heldout_accuracy": box[0], "heldout_seconds": time.time() - synced}
        tokens = stats["tokens"]
        samples_per_step = g.prompts_per_step * g.group_size
        metrics = {
            "reward_mean": float(np.mean(batch.rewards)),
            "accuracy": float(np.mean(batch.correct)),
            "answered": float(np.mean(batch.answered)),
            "kl": stats["kl"] / tokens if self.reference is not None else None,
            "entropy": stats["entropy"] / tokens,
            "response_length": tokens / samples_per_step,
            "truncated": float(np.mean(batch.truncated)),
            "clip_fraction": stats["clipped"] / tokens,
            "pg_loss": stats["pg_loss"] / tokens,
            "loss": stats["loss"] / tokens,
            "lr": lr,
            "grad_norm": stats["grad_norm"],
            "tokens": tokens,
            "tokens_per_second": tokens / (learned - rolled),
            "samples_seen": (index + 1) * samples_per_step,
            "rollout_seconds": rolled - began,
            "learner_seconds": learned - rolled,
            "sync_seconds": synced - learned,
            "step_seconds": synced - began,
            **measured,
        }
        return metrics, {}


def describe(r: dict[str, Any]) -> str:
    """A step's log line."""
    held = "".join(f" {k} {v:.3f}" for k, v in r.get("heldout_accuracy", {}).items())
    return (
        f"step {r['step']} reward {r['reward_mean']:.3f} accuracy {r['accuracy']:.3f} "
        f"length {r['response_length']:.1f} rollout {r['rollout_seconds']:.2f}s "
        f"learner {r['learner_seconds']:.2f}s sync {r['sync_seconds']:.2f}s{held}"
    )


def update(
    engine: Any, reference: Any, batch: RolloutBatch, g: GRPOConfig, step: int, seed: int
) -> dict[str, Any]:
    """`mini_batches` optimizer steps over the step's samples; returns summed statistics."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    packed = g.attn_implementation == "flash_attention_2"
    n = len(batch.completion_ids)
    lengths, response_lengths = batch.lengths, batch.response_lengths
    order = np.random.default_rng([seed, step]).permutation(n)
    minis = np.array_split(order, g.mini_batches)
    plans = [micro_batch_plan(mini, lengths, world, g.micro_batch_size)[rank] for mini in minis]

    old: dict[tuple[int, int], Any] = {}
    if g.mini_batches > 1:  # the policy that sampled: before any update of this step
        with torch.no_grad():
            for k, plan in enumerate(plans):
                for m, micro in enumerate(plan):
                    row = rollout_rows(batch, micro, packed)
                    old[k, m] = response_logprobs(engine, row, row["targets"])

    totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clipped": 0.0}
    grad_norms = []
    for k, (mini, plan) in enumerate(zip(minis, plans, strict=True)):
        # an optimizer step follows the mean over every response token of the mini-batch
        scale = data_parallel_scale(int(response_lengths[mini].sum()), world)
        for m, micro in enumerate(plan):
            row = rollout_rows(batch, micro, packed)
            ref_logp = None
            if reference is not None:
                ref_logp = response_logprobs(reference, row, row["targets"])
            old_logp, advantages = old.get((k, m)), row["advantages"]
            per_token = micro_batch_loss(old_logp, advantages, ref_logp, g)
            loss, logp, entropy = response_loss(
                engine, row, row["targets"], per_token, bool(g.entropy_coef)
            )
            before = logp if old_logp is None else old_logp
            stats = policy_loss(logp, before, advantages, ref_logp, entropy, g)[1]
            engine.backward(loss * scale, scale_wrt_gas=False)
            engine.step()
            totals["loss"] += float(loss.detach())
            for key, value in stats.items():
                totals[key] += value
        norm = engine.get_global_grad_norm()
        grad_norms.append(float(norm) if norm is not None else float("nan"))
    keys = list(totals)
    summed = torch.tensor([totals[key] for key in keys], dtype=torch.float64, device=engine.device)
    dist.all_reduce(summed)
    out: dict[str, Any] = dict(zip(keys, summed.cpu().tolist(), strict=True))
    out["grad_norm"] = float(np.mean(grad_norms))
    out["tokens"] = int(response_lengths.sum())
    return out


def sync_weights(engine: Any, generator: Generator | None) -> None:
    """Send the learner's weights to the engines (every rank gathers; rank 0 sends).

    Under ZeRO-3 each parameter is gathered on its own and sent before the next one is, so no
    rank ever holds the whole model twice.
    """
    params = list(engine.module.named_parameters())
    specs = [
        (name, str(p.dtype).removeprefix("torch."), list(getattr(p, "ds_shape", p.shape)))
        for name, p in params
    ]
    sender = generator.sender(specs) if generator else None
    for name, param in params:
        with gathered(param):
            if sender:
                sender.send(name, param.data)
    if sender:
        sender.finish()


def gathered(param: Any) -> contextlib.AbstractContextManager:
    """The whole of a parameter within the block: a ZeRO-3 partition (one with a `ds_id`) is
    gathered, as DeepSpeed's `GatheredParameters` would do nothing for any other."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param])


def learner_places() -> list[dict[str, Any]]:
    """Each learner worker's node, CPU count and GPU ids, by rank (collective): colocated engines
    go there."""
    import ray
    import torch.distributed as dist

    context = ray.get_runtime_context()
    place = {
        "node_id": context.get_node_id(),
        "cpus": max(1, int(context.get_assigned_resources().get("CPU", 1))),
        "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])],
    }
    places: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(places, place)
    return places
