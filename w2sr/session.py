"""The Ray session a command runs in: one per command, shared by every stage it runs."""

from __future__ import annotations

import os
import socket
from typing import Any

from w2sr.config import ConfigError, ExperimentConfig

CONNECT_TIMEOUT_S = 10.0  # for a cluster's address to answer


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
        key = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
        check_reachable(address, key)
        try:
            ray.init(address=address, runtime_env=job_env(env), log_to_driver=True)
        except ConnectionError as error:  # something answered, but no Ray cluster
            raise _unreachable(key, address, str(error)) from error
    else:
        start_local(cfg.ray.num_cpus, runtime_env=env)


def check_reachable(address: str, key: str) -> None:
    """`ray.init` retries an address where nothing answers for minutes, logging as it goes; a
    connection to its port says so in seconds, as one line naming the key."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    if address in ("auto", "local") or not port.isdigit():
        return  # Ray finds these itself, or says what is wrong with them
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise _unreachable(key, address, error.strerror or str(error)) from error


def _unreachable(key: str, address: str, why: str) -> ConfigError:
    return ConfigError(
        f"{key}: no Ray cluster answers at {address} ({why}); start one (`ray start --head`) or "
        "correct the address, or leave ray.address and RAY_ADDRESS unset for a session on this "
        "machine"
    )


def job_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """The command's runtime env, with the setup every worker process of it runs first: the
    engines' logs (`w2sr.engines.logs`; a setup hook is a job's, not an actor's)."""
    return {**(runtime_env or {}), "worker_process_setup_hook": "w2sr.engines.logs.install"}


def start_local(
    num_cpus: int | None, runtime_env: dict[str, Any] | None = None, log_to_driver: bool = True
) -> None:
    """A new Ray session on this machine (even where `ray start` left a cluster it would join),
    with its API server on a free loopback port that its processes are told of.

    Ray Train asks the state API, from a worker, whether a training's controller lives. Told of
    no server, a worker looks for a cluster in Ray's temp folder and can find one that is gone
    (a `ray start` head that was killed): every training's end then waits 12 s for it and logs
    a traceback, and without the server each second of training logs a warning. The raylet and
    every worker inherit this process's environment, so the address is set before the start.
    """
    import ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        runtime_env=job_env(runtime_env),
        log_to_driver=log_to_driver,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
    )


def resource_asks(cfg: ExperimentConfig, sections: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """What each named section asks of Ray at once (CPUs, GPUs), by the config key that sets it:
    an engine pool at its minimum size (evaluation's once per model it runs side by side), a
    learner's whole worker group (and, placed apart, its rollout engines)."""
    gpu = 1.0 if cfg.use_gpu else 0.0
    asks = {}
    for name in sections:
        section = getattr(cfg, name)
        if section is None:
            continue
        if name in ("generation", "eval", "serve"):
            e = section.engine
            ranks = e.replicas.min * e.tensor_parallel_size * e.pipeline_parallel_size
            key = f"{name}.engine.replicas.min"
            if name == "eval" and section.concurrent_models > 1:
                ranks *= section.concurrent_models
                key = f"eval.concurrent_models x {key}"
            asks[key] = {
                "CPU": ranks * e.cpus_per_replica,
                "GPU": ranks * gpu,
            }
        elif name == "train":
            asks["train.num_workers"] = {
                "CPU": section.num_workers,
                "GPU": section.num_workers * gpu,
            }
        elif name == "grpo":
            e = section.engine
            separate = e.replicas.max if section.placement == "separate" else 0
            asks["grpo.num_workers"] = {
                "CPU": section.num_workers * section.cpus_per_worker
                + separate * e.cpus_per_replica,
                "GPU": (section.num_workers + separate) * gpu,
            }
    return asks


def resource_request(cfg: ExperimentConfig, sections: tuple[str, ...]) -> dict[str, float]:
    """The most a command asks of Ray at once: its sections run one after another."""
    asks = resource_asks(cfg, sections).values()
    return {kind: max((ask[kind] for ask in asks), default=0.0) for kind in ("CPU", "GPU")}


def check_local_resources(cfg: ExperimentConfig, sections: tuple[str, ...]) -> None:
    """A local session has a fixed number of CPUs and GPUs: a stage that asks for more than it
    will ever have would wait forever, so it fails here, before Ray starts, naming the key."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster's size is the cluster's to say (an autoscaler can grow it)
    have = {
        "CPU": cfg.ray.num_cpus or os.cpu_count() or 1,
        "GPU": _local_gpus() if cfg.use_gpu else 0,
    }
    lines = [
        f"  {key}: needs {ask[kind]:g} {kind}s at once, the local session has {have[kind]:g}"
        for key, ask in resource_asks(cfg, sections).items()
        for kind in ("CPU", "GPU")
        if ask[kind] > have[kind]
    ]
    if lines:
        raise ConfigError(
            "the local Ray session is too small (ray.num_cpus; use_gpu):\n" + "\n".join(lines)
        )


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
