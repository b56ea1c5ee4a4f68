"""The Ray session a command runs in: one per command, shared by every stage it runs."""

from __future__ import annotations

import os

from w2sr.config import ExperimentConfig


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
