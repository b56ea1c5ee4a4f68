"""Stage `grpo`: the RL baseline, GRPO on the student with the run's grader as reward.

    w2sr grpo CONFIG grpo.steps=200

One Ray Train worker group (DeepSpeed ZeRO) is the learner and lives for the whole run; its rank 0
drives the loop and owns the rollout engines, vLLM replicas held in-process by Ray actors
(`w2sr.rollout`). Each step:

1. rollout: rank 0 has the engines sample `group_size` completions for each of the step's
   `prompts_per_step` prompts (the same prompt set as generation, rendered with the student's chat
   template), grades them (1 correct; `format_reward` for a readable wrong answer; else 0) and
   normalises rewards within each group into advantages;
2. learner: every rank takes its share of the samples and takes `mini_batches` optimizer
   steps on the clipped policy-gradient loss averaged over all response tokens of a mini-batch,
   plus `kl_coef` x the k3 estimate of KL to the frozen reference, minus `entropy_coef` x entropy;
3. sync: the updated weights are gathered (ZeRO-3 partitions one tensor at a time) and sent to
   every engine (`w2sr.weight_sync`: a process group broadcast, NCCL on GPUs, or the Ray object
   store), and the engines reload them in place.

Colocated on GPUs, each engine shares its learner worker's device and sleeps (weights to host
memory, KV cache freed) from the end of its rollout until the next sync.

Old-policy log-probabilities are the learner's own, not vLLM's: with one optimizer step per
rollout (the default) they are the current ones detached, at no cost, and the ratio is exactly 1
on the first pass instead of carrying the numerical gap between vLLM's and the learner's kernels
(which would make the clip fire on noise). With several mini-batches they are computed by one
no-grad pass before the first update.

Layout (relative to the run dir):

    rl/metrics.jsonl   one record per step: reward, accuracy, KL, entropy, response length,
                       clip fraction, and the step's seconds split into rollout, learner and sync
    rl/model/          the GRPO student (config, safetensors, tokenizer, chat template,
                       generation config): label `rl` for evaluation
    rl/ray/            Ray Train checkpoints; a rerun of the same config resumes from the last one
    rl/_DONE.json      fingerprint, steps, final reward, wall_seconds and worker_seconds
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from w2sr.config import ConfigError, ExperimentConfig, GRPOConfig, TrainConfig
from w2sr.rundir import DONE, MetricsLog, RunDir

log = logging.getLogger(__name__)

STAGE = "rl"
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


def grpo(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the stage; returns its completion record (with wall and worker seconds)."""
    if cfg.student is None:
        raise ConfigError("student: not set; `w2sr grpo` trains the student model with RL")
    from w2sr import learner
    from w2sr.generate import prepare_prompts
    from w2sr.models import resolve_model

    run = RunDir(cfg.run_dir)
    table = prepare_prompts(cfg, run)  # the generation prompt set, recorded for decontamination
    fingerprint = "-".join(
        [
            cfg.fingerprint("grpo", "student", "template", "grader", "seed"),
            run.read_json("prompts", DONE)["fingerprint"],
        ]
    )
    record = run.done(STAGE, fingerprint)
    if record:
        log.info("the GRPO student is trained for this config; nothing to do")
        return record
    learner.check_trackers(cfg.grpo, "grpo")
    start = time.time()
    run.begin(STAGE, fingerprint)
    model_path = resolve_model(cfg.student)
    prompts = student_prompts(cfg, model_path, table.to_pylist())
    if not prompts:
        raise RuntimeError(f"no prompt fits grpo.engine.max_model_len ({table.num_rows} prompts)")
    metrics = _fit(cfg, run, fingerprint, prompts, model_path).metrics
    facts = {
        "student": cfg.student,
        "model": run.location(STAGE, "model"),
        "prompts": len(prompts),
        "steps": metrics["step"],
        "samples_seen": metrics["samples_seen"],
        "final_reward_mean": metrics["reward_mean"],
        "final_accuracy": metrics["accuracy"],
        "resumed_from": metrics["resumed_from"],
        "wall_seconds": round(time.time() - start, 2),
        "worker_seconds": round(metrics["worker_seconds"], 2),
    }
    run.mark_done(STAGE, fingerprint, **facts)
    log.info("GRPO student trained: %s", facts)
    return run.read_json(STAGE, DONE)


def student_prompts(cfg: ExperimentConfig, model_path: str, rows: list[dict]) -> list[dict]:
    """The prompts rendered with the student's chat template (the student is the policy; the
    prompt set's own rendering is the teacher's). Prompts leaving no room to answer are dropped."""
    from transformers import AutoTokenizer

    from w2sr.templates import TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    template = TEMPLATES[cfg.template]
    texts = [template.render(tokenizer, row["problem"]) for row in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    limit = cfg.grpo.engine.max_model_len
    kept = [
        {"prompt_id": row["prompt_id"], "answer": row["answer"], "prompt_token_ids": tokens}
        for row, tokens in zip(rows, ids, strict=True)
        if len(tokens) < limit
    ]
    if len(kept) < len(rows):
        log.warning("%d prompts leave no room to answer in %d tokens", len(rows) - len(kept), limit)
    return kept


def learner_config(g: GRPOConfig) -> TrainConfig:
    """The DeepSpeed learner's settings: a mini-batch of samples per optimizer step, constant lr."""
    return TrainConfig(
        num_workers=g.num_workers,
        zero_stage=g.zero_stage,
        lr=g.lr,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_grad_norm=g.max_grad_norm,
        global_batch_size=g.prompts_per_step * g.group_size // g.mini_batches,
        micro_batch_size=g.micro_batch_size,
        bf16=g.bf16,
        gradient_checkpointing=g.gradient_checkpointing,
        attn_implementation=g.attn_implementation,
        seed=g.seed,
    )


def _fit(cfg: ExperimentConfig, run: RunDir, fingerprint: str, prompts: list[dict], model: str):
    import ray

    from w2sr import engines, learner

    g = cfg.grpo
    log.info(
        "GRPO on %s: %d steps of %d prompts x %d samples, %d learners, %d %s rollout engines",
        cfg.student,
        g.steps,
        g.prompts_per_step,
        g.group_size,
        g.num_workers,
        g.engine.replicas.max,
        g.placement,
    )
    engines.init_ray(cfg)
    loop_config = {"prompts": ray.put(prompts), "model": model}
    return learner.fit(
        _worker_loop,
        cfg,
        run,
        STAGE,
        f"grpo-{fingerprint}",
        g,
        loop_config,
        resources_per_worker={"CPU": g.cpus_per_worker},
    )


# --- rank 0: rollouts ------------------------------------------------------------------------


class Rollouts:
    """The rollout engines of a run and the step's groups: samples, rewards and advantages."""

    def __init__(self, cfg: ExperimentConfig, model: str, learners: list[dict]):
        """`learners`: each learner worker's `node_id`, `cpus` and `gpu_ids`, by rank."""
        from w2sr.rollout import rollout_actor
        from w2sr.weight_sync import transport

        g = cfg.grpo
        colocated = g.placement == "colocated"
        self.actors = [
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
        self.sleeps = colocated and cfg.use_gpu
        self.transport = transport(g.weight_sync, use_gpu=cfg.use_gpu, colocated=colocated)
        self.backend = "nccl" if cfg.use_gpu else "gloo"
        self.collective = None  # opened at the first sync, once the engines are up
        self.cfg = cfg

    def sample(self, prompts: list[dict], step: int) -> dict[str, Any]:
        """The step's groups, graded. Prompts and seeds depend only on (seed, step)."""
        import ray

        from w2sr import engines
        from w2sr.grading import extract_answer, grade_batch
        from w2sr.rollout import sampling_kwargs
        from w2sr.sft_data import step_samples

        g = self.cfg.grpo
        seed = self.cfg.seed + g.seed
        chosen = [
            prompts[i]
            for i in step_samples(len(prompts), g.prompts_per_step, seed, step * g.prompts_per_step)
        ]
        seeds = [
            engines.sample_seed(seed + g.sampling.seed, f"{step}/{p['prompt_id']}", 0)
            for p in chosen
        ]
        shares = [list(range(i, len(chosen), len(self.actors))) for i in range(len(self.actors))]
        pending = [
            actor.generate.remote(
                [chosen[i]["prompt_token_ids"] for i in share],
                sampling_kwargs(g.sampling),
                g.group_size,
                [seeds[i] for i in share],
            )
            for actor, share in zip(self.actors, shares, strict=True)
        ]
        groups: list[list[dict]] = [[] for _ in chosen]
        for share, outputs in zip(shares, ray.get(pending), strict=True):
            for i, group in zip(share, outputs, strict=True):
                groups[i] = group
        texts = [o["text"] for group in groups for o in group]
        golds = [p["answer"] for p, group in zip(chosen, groups, strict=True) for _ in group]
        correct = np.array(grade_batch(texts, golds, self.cfg.grader), dtype=bool)
        answered = np.array([extract_answer(t) is not None for t in texts], dtype=bool)
        rewards = np.where(correct, 1.0, np.where(answered, g.format_reward, 0.0))
        return {
            "prompt_ids": [p["prompt_token_ids"] for p in chosen for _ in range(g.group_size)],
            "completion_ids": [o["token_ids"] for group in groups for o in group],
            "advantages": group_advantages(rewards, g.group_size).tolist(),
            "rewards": rewards.tolist(),
            "correct": correct.tolist(),
            "answered": answered.tolist(),
            "truncated": [o["finish_reason"] == "length" for group in groups for o in group],
        }

    def sender(self, specs: list[tuple[str, str, list[int]]]):
        """What the learner's rank 0 sends this sync's tensors through (`w2sr.weight_sync`)."""
        from w2sr.weight_sync import CollectiveSender, ObjectStoreSender

        if self.transport == "object_store":
            return ObjectStoreSender(self.actors)
        if self.collective is None:
            self.collective = CollectiveSender.open(self.actors, self.backend)
        return self.collective.start(specs)

    def sleep(self) -> None:
        import ray

        if self.sleeps:
            ray.get([actor.sleep.remote() for actor in self.actors])

    def wake_up(self) -> None:
        import ray

        if self.sleeps:
            ray.get([actor.wake_up.remote() for actor in self.actors])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """GRPO's advantages: each reward minus its group's mean, over the group's (sample) std.

    A group whose samples all earn the same reward teaches nothing: its advantages are 0.
    """
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, ddof=1, keepdims=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


# --- every rank: the update ------------------------------------------------------------------


def rollout_rows(batch: dict[str, Any], indices: list[int], packed: bool) -> dict[str, Any]:
    """The samples (prompt + completion) of a micro-batch as model inputs.

    Packed: one row, positions restarting at each sample (flash-attention reads it without a
    mask). Padded: one right-padded row per sample with an attention mask; with SDPA or eager
    attention this is the cheaper layout, since a packed row costs a dense mask over all its
    tokens. `response` indexes the flattened (row, position) pairs whose next token is a
    completion token, `targets` holds those tokens and `advantages` their sample's advantage.
    """
    import torch

    samples = [batch["prompt_ids"][i] + batch["completion_ids"][i] for i in indices]
    width = sum(map(len, samples)) if packed else max(map(len, samples))
    response, targets, advantages = [], [], []
    offset = 0
    for i, sample in zip(indices, samples, strict=True):
        prompt, completion = batch["prompt_ids"][i], batch["completion_ids"][i]
        start = offset + len(prompt) - 1
        response += range(start, start + len(completion))
        targets += completion
        advantages += [batch["advantages"][i]] * len(completion)
        offset += len(sample) if packed else width
    row = {
        "response": torch.tensor(response),
        "targets": torch.tensor(targets),
        "advantages": torch.tensor(advantages, dtype=torch.float32),
    }
    if packed:
        row["input_ids"] = torch.tensor([[t for sample in samples for t in sample]])
        row["position_ids"] = torch.tensor([[p for sample in samples for p in range(len(sample))]])
    else:
        pads = [[0] * (width - len(sample)) for sample in samples]
        row["input_ids"] = torch.tensor([s + z for s, z in zip(samples, pads, strict=True)])
        row["attention_mask"] = torch.tensor(
            [[1] * len(s) + z for s, z in zip(samples, pads, strict=True)]
        )
    return row


def _response_logits(model, row: dict[str, Any]):
    device = next(iter(model.parameters())).device
    inputs = ("input_ids", "position_ids", "attention_mask")
    logits = model(**{k: row[k].to(device) for k in inputs if k in row}, use_cache=False).logits
    return logits.flatten(0, 1)[row["response"].to(device)].float()


def token_logprobs(logits, targets):
    """Log-probabilities of the sampled tokens and the policy's entropy at each position."""
    import torch

    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.to(logits.device)[:, None])[:, 0] - logz
    entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def policy_loss(logp, old_logp, advantages, ref_logp, entropy, g: GRPOConfig):
    """Per-token loss and statistics: clipped surrogate, k3 KL to the reference, entropy bonus."""
    import torch

    advantages = advantages.to(logp.device)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - g.clip_eps, 1 + g.clip_eps)
    pg = -torch.minimum(ratio * advantages, clipped * advantages)
    loss = pg
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + g.kl_coef * kl
    if g.entropy_coef:
        loss = loss - g.entropy_coef * entropy
    stats = {
        "pg_loss": float(pg.detach().sum()),
        "kl": float(kl.detach().sum()) if kl is not None else 0.0,
        "entropy": float(entropy.detach().sum()),
        # tokens whose gradient the clip removed (TRL's and OpenRLHF's clip fraction)
        "clipped": float(((ratio - clipped) * advantages > 0).sum()),
    }
    return loss, stats


def _update(engine, reference, batch: dict[str, Any], g: GRPOConfig, step: int, seed: int):
    """`mini_batches` optimizer steps over the step's samples; returns summed statistics."""
    import torch
    import torch.distributed as dist

    from w2sr.sft_data import layout

    rank, world = dist.get_rank(), dist.get_world_size()
    packed = g.attn_implementation == "flash_attention_2"
    n = len(batch["completion_ids"])
    lengths = np.array(
        [len(p) + len(c) for p, c in zip(batch["prompt_ids"], batch["completion_ids"], strict=True)]
    )
    response_lengths = np.array([len(c) for c in batch["completion_ids"]])
    order = np.random.default_rng([seed, step]).permutation(n)
    minis = np.array_split(order, g.mini_batches)
    plans = [layout(mini, lengths, world, g.micro_batch_size)[rank] for mini in minis]

    old: dict[tuple[int, int], Any] = {}
    if g.mini_batches > 1:  # the policy that sampled: before any update of this step
        with torch.no_grad():
            for k, plan in enumerate(plans):
                for m, micro in enumerate(plan):
                    row = rollout_rows(batch, micro, packed)
                    old[k, m] = token_logprobs(_response_logits(engine, row), row["targets"])[0]

    totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clipped": 0.0}
    grad_norms = []
    for k, (mini, plan) in enumerate(zip(minis, plans, strict=True)):
        # DeepSpeed averages gradients over ranks: scale so that an optimizer step follows the
        # mean over every response token of the mini-batch, whatever each rank's share.
        scale = world / max(1, int(response_lengths[mini].sum()))
        for m, micro in enumerate(plan):
            row = rollout_rows(batch, micro, packed)
            logp, entropy = token_logprobs(_response_logits(engine, row), row["targets"])
            if not g.entropy_coef:
                entropy = entropy.detach()  # a metric only
            ref_logp = None
            if reference is not None:
                with torch.no_grad():
                    ref_logp = token_logprobs(_response_logits(reference, row), row["targets"])[0]
            old_logp = old[k, m] if old else logp.detach()
            loss, stats = policy_loss(logp, old_logp, row["advantages"], ref_logp, entropy, g)
            loss = loss.sum()
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
    out = dict(zip(keys, summed.cpu().tolist(), strict=True))
    out["grad_norm"] = float(np.mean(grad_norms))
    out["tokens"] = int(response_lengths.sum())
    return out


def sync_weights(engine, rollouts: Rollouts | None) -> None:
    """Send the learner's weights to the engines (every rank gathers; rank 0 sends).

    Under ZeRO-3 each parameter is gathered on its own and sent before the next one is, so no
    rank ever holds the whole model twice.
    """
    import deepspeed

    params = list(engine.module.named_parameters())
    specs = [
        (name, str(p.dtype).removeprefix("torch."), list(getattr(p, "ds_shape", p.shape)))
        for name, p in params
    ]
    sender = rollouts.sender(specs) if rollouts else None
    for name, param in params:
        with deepspeed.zero.GatheredParameters([param]):
            if sender:
                sender.send(name, param.data)
    if sender:
        sender.finish()


def learner_places() -> list[dict]:
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
    places: list = [None] * dist.get_world_size()
    dist.all_gather_object(places, place)
    return places


def _reference(model_path: str, cfg: ExperimentConfig, train: TrainConfig):
    """The frozen reference policy; under ZeRO-3 partitioned like the learner (no optimizer)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from w2sr.learner import deepspeed_config

    config = deepspeed_config(train, cfg.use_gpu)
    config.pop("optimizer")
    config["zero_optimization"] = {"stage": 3 if train.zero_stage == 3 else 0}
    model = AutoModelForCausalLM.from_pretrained(  # zero.Init'ed under the learner's ZeRO-3
        model_path,
        dtype=torch.bfloat16 if train.bf16 else torch.float32,
        attn_implementation=train.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _worker_loop(config: dict[str, Any]) -> None:
    """One learner worker; rank 0 also drives the rollouts, the sync and the logs."""
    from w2sr import learner

    cfg, rank, world, seed, tokenizer, attempt_start = learner.start_worker(config, "grpo")

    import ray
    import torch.distributed as dist

    from w2sr.sft_data import assistant_end

    g = cfg.grpo
    model, prompts = config["model"], ray.get(config["prompts"])
    # Engines start in their actors while DeepSpeed initializes here.
    places = learner_places()
    rollouts = Rollouts(cfg, model, places) if rank == 0 else None
    train = learner_config(g)
    engine, _ds_config = learner.build_engine(
        model,
        train,
        g.steps * g.mini_batches,
        use_gpu=cfg.use_gpu,
        trust_remote_code=cfg.trust_remote_code,
    )
    reference = _reference(model, cfg, train) if g.kl_coef else None
    state = learner.restore(engine) or {"step": 0, "worker_seconds": 0.0}
    resumed_from, prior_seconds = state["step"], state["worker_seconds"]
    workers = world + (g.engine.replicas.max if g.placement == "separate" else 0)

    run = RunDir(cfg.run_dir)
    metrics_log = MetricsLog(run, STAGE) if rank == 0 else None
    trackers = learner.Trackers(g, config["name"], g.model_dump(mode="json"))
    if resumed_from:  # the engines start from the base weights
        sync_weights(engine, rollouts)
        log.info("resumed at step %d", resumed_from)
    samples_per_step = g.prompts_per_step * g.group_size
    for step in range(state["step"], g.steps):
        began = time.time()
        box = [rollouts.sample(prompts, step) if rollouts else None]
        if rollouts:
            rollouts.sleep()
        dist.broadcast_object_list(box, src=0)
        batch = box[0]
        rolled = time.time()
        lr = engine.get_lr()[0]
        stats = _update(engine, reference, batch, g, step, seed)
        learned = time.time()
        if rollouts:
            rollouts.wake_up()
        sync_weights(engine, rollouts)
        synced = time.time()
        tokens = stats["tokens"]
        state = {
            "step": step + 1,
            "worker_seconds": prior_seconds + workers * (time.time() - attempt_start),
        }
        record = {
            "step": step + 1,
            "reward_mean": float(np.mean(batch["rewards"])),
            "accuracy": float(np.mean(batch["correct"])),
            "answered": float(np.mean(batch["answered"])),
            "kl": stats["kl"] / tokens if reference is not None else None,
            "entropy": stats["entropy"] / tokens,
            "response_length": tokens / samples_per_step,
            "truncated": float(np.mean(batch["truncated"])),
            "clip_fraction": stats["clipped"] / tokens,
            "pg_loss": stats["pg_loss"] / tokens,
            "loss": stats["loss"] / tokens,
            "lr": lr,
            "grad_norm": stats["grad_norm"],
            "tokens": tokens,
            "tokens_per_second": tokens / (learned - rolled),
            "samples_seen": (step + 1) * samples_per_step,
            "rollout_seconds": rolled - began,
            "learner_seconds": learned - rolled,
            "sync_seconds": synced - learned,
            "step_seconds": synced - began,
            "time": time.time(),
            "resumed_from": resumed_from,
        }
        if metrics_log:
            metrics_log.write(record)
            tracked = {k: v for k, v in record.items() if k in TRACKED and v is not None}
            trackers.log(tracked, step + 1)
            log.info(
                "step %d reward %.3f accuracy %.3f length %.1f rollout %.2fs learner %.2fs "
                "sync %.2fs",
                step + 1,
                record["reward_mean"],
                record["accuracy"],
                record["response_length"],
                record["rollout_seconds"],
                record["learner_seconds"],
                record["sync_seconds"],
            )
        if state["step"] % g.checkpoint_every == 0 or state["step"] == g.steps:
            if metrics_log:
                metrics_log.flush()
            learner.save_checkpoint(
                engine, state, {**record, "worker_seconds": state["worker_seconds"]}
            )

    if rollouts:
        rollouts.close()
    trackers.close()
    end_text = assistant_end(tokenizer)
    if rank == 0:
        with run.staged_folder(STAGE, "model") as out:
            learner.export_hf(engine, tokenizer, out, end_text)
    else:
        learner.export_hf(engine, tokenizer, None, end_text)
