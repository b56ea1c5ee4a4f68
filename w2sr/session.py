"""The Ray session a command runs in: one per command, shared by every stage it runs."""

from __future__ import annotations

import os

from w2sr.config import ConfigError, ExperimentConfig


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


def check_local_resources(cfg: ExperimentConfig, sections: tuple[str, ...]) -> None:
    """A local session has a fixed number of CPUs: a stage that asks for more than it will ever
    have would wait forever, so it fails here, before Ray starts, naming the key."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster's size is the cluster's to say (an autoscaler can grow it)
    have = cfg.ray.num_cpus or os.cpu_count() or 1
    asks = {}
    for name in sections:
        section = getattr(cfg, name)
        if section is None:
            continue
        if name in ("generation", "eval", "serve"):
            e = section.engine
            per_replica = e.cpus_per_replica * e.tensor_parallel_size * e.pipeline_parallel_size
            asks[f"{name}.engine.replicas.min"] = e.replicas.min * per_replica
        elif name == "train":
            asks["train.num_workers"] = section.num_workers
        elif name == "grpo":
            engines = section.engine.replicas.max * section.engine.cpus_per_replica
            separate = engines if section.placement == "separate" else 0
            asks["grpo.num_workers"] = section.num_workers * section.cpus_per_worker + separate
    over = {key: cpus for key, cpus in asks.items() if cpus > have}
    if over:
        lines = [f"  {key}: needs {cpus} CPUs at once" for key, cpus in over.items()]
        raise ConfigError(
            f"the local Ray session has {have} CPUs (ray.num_cpus):\n" + "\n".join(lines)
        )
