"""A learner's Ray Train run: the worker group that SFT and GRPO train on, and the first steps
every worker takes."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, NamedTuple

from w2sr import layout
from w2sr.config import ExperimentConfig, LearnerConfig
from w2sr.console import progress
from w2sr.rundir import RunDir, last_record

FOLLOW_S = 2.0  # how often the driver reads the latest step, for the console's progress bar


class Worker(NamedTuple):
    """What a Ray Train worker of either stage knows about itself once started."""

    cfg: ExperimentConfig
    rank: int
    world: int
    seed: int
    tokenizer: Any
    model: str  # the model's folder on this worker's node
    started: float  # this attempt's start, for worker-seconds


def start_worker(config: dict[str, Any]) -> Worker:
    """The first steps of a worker loop: the run's config, DeepSpeed's accelerator chosen before
    deepspeed is imported, the rank, torch seeded with the learner's seed, `config["model"]` on
    this node (a model in object storage is downloaded once per node) and its tokenizer."""
    started = time.time()
    cfg = ExperimentConfig.model_validate(config["cfg"])
    if not cfg.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from w2sr.models import ModelSpec

    context = ray.train.get_context()
    seed = config["seed"]
    torch.manual_seed(seed)
    model = ModelSpec.parse(config["model"]).local()
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=cfg.trust_remote_code)
    rank, world = context.get_world_rank(), context.get_world_size()
    return Worker(cfg, rank, world, seed, tokenizer, model, started)


def fit(
    worker_loop,
    cfg: ExperimentConfig,
    run: RunDir,
    stage: str,
    name: str,
    learner: LearnerConfig,
    steps: int,
    loop_config: dict[str, Any],
    resources_per_worker: dict[str, float] | None = None,
):
    """Run `worker_loop` on a Ray Train worker group of `learner.num_workers`: checkpoints under
    `<stage>/ray/<name>`, so a rerun of the same config finds them, and `learner.max_failures`
    restarts. The console's bar follows the `steps` in the stage's metrics file. Returns Ray
    Train's result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "cfg": cfg.model_copy(update={"run_dir": run.location()}).model_dump(mode="json"),
            "name": name,
            "seed": cfg.seed + learner.seed,
            **loop_config,
        },
        scaling_config=ScalingConfig(
            num_workers=learner.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources_per_worker,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=run.location(stage, layout.CHECKPOINTS),
            checkpoint_config=CheckpointConfig(num_to_keep=learner.num_to_keep),
            failure_config=FailureConfig(max_failures=learner.max_failures),
        ),
    )

    def step() -> int:
        return last_record(run, stage).get("step", 0)

    with progress(steps, "steps", initial=step()) as bar:
        if bar.disable:
            return trainer.fit()
        ended = threading.Event()

        def follow() -> None:
            while not ended.wait(FOLLOW_S):
                bar.update(max(0, step() - bar.n))

        follower = threading.Thread(target=follow, name="w2sr-steps", daemon=True)
        follower.start()
        try:
            return trainer.fit()
        finally:
            ended.set()
            follower.join()
            bar.update(max(0, step() - bar.n))
