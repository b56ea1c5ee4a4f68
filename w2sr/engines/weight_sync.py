"""How the learner's weights reach the rollout engines, without restarting them.

Two transports, chosen by `grpo.weight_sync` (see `transport`):

- `object_store`: rank 0 gathers CPU copies of every tensor and puts them once in the Ray object
  store; each engine reads them there. Simple, and fast enough on one CPU machine.
- `collective`: rank 0 and the engines' workers form a process group of their own (NCCL on GPUs,
  gloo on CPU) and rank 0 broadcasts each tensor as soon as ZeRO has gathered it; an engine loads
  each one as it arrives. No full copy is held anywhere, and on GPUs tensors go device to device.

The engine side is `WeightSyncExtension`: vLLM imports it by its dotted path
(`worker_extension_cls`) and mixes it into its worker; callers reach its methods through
`LLM.collective_rpc`. Its methods carry a `w2sr_` prefix so they never shadow the worker's own
(the CPU worker already has `update_weights`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import secrets
import socket
from collections.abc import Iterator
from typing import Any

EXTENSION = "w2sr.engines.weight_sync.WeightSyncExtension"
GROUP_TIMEOUT = datetime.timedelta(minutes=10)
RELOAD_LOG = "vllm.model_executor.model_loader.reload.layerwise"  # vLLM's reload's logger


class ExpectedUnloaded(logging.Filter):
    """vLLM warns "<layer>: Failed to load weights" for each layer a reload gave no weight to.
    Two never get one, by design: rotary embeddings (their tables are computed) and, in a model
    with tied embeddings, the output head (its weight is the embedding's, reloaded as such).
    Those warnings, one per layer per step of GRPO, are dropped; any other layer's stays."""

    def __init__(self, tied: bool):
        super().__init__()
        self.expected = {"RotaryEmbedding", *(("ParallelLMHead",) if tied else ())}

    def filter(self, record: logging.LogRecord) -> bool:
        layer, _, what = record.getMessage().partition(": ")
        return not (what == "Failed to load weights" and layer in self.expected)


def transport(configured: str, *, use_gpu: bool, colocated: bool) -> str:
    """`grpo.weight_sync` resolved: `auto` is a collective for separate engines on GPUs, where
    NCCL moves tensors device to device, and the object store otherwise (on CPU it measured
    faster, and NCCL cannot join two processes on one GPU, as colocation would ask)."""
    if configured != "auto":
        return configured
    return "collective" if use_gpu and not colocated else "object_store"


def process_group(store, rank: int, world_size: int, backend: str, secret: str):
    """A process group apart from torch.distributed's default one (which is the learner's, or
    vLLM's own in an engine): only the transport's members take part in its collectives. Its
    keys in the store are named by a secret that reaches the engines through Ray alone, so a
    stranger who finds the port cannot join the group or feed it tensors."""
    import torch.distributed as dist

    store = dist.PrefixStore(f"w2sr-weights-{secret}", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, GROUP_TIMEOUT)
    # torch's stub lists only the constructor that takes options; the binding also has
    # (store, rank, size, timeout=default), the one called here.
    return dist.ProcessGroupNCCL(store, rank, world_size)  # type: ignore[call-arg]


class WeightSyncExtension:
    # Attributes of the vLLM worker this class is mixed into.
    device: Any
    model_runner: Any

    def w2sr_load_weights(self, named_tensors: list) -> int:
        """Reload every given weight in place; vLLM's loader maps HF names to its fused layers."""
        self._w2sr_reload(iter(named_tensors))
        return len(named_tensors)

    def w2sr_load_folder(self, folder: str) -> None:
        """Load another model of the engine's architecture in place, from its folder (vLLM reads
        the weights as it reads a model's at start-up)."""
        with self._w2sr_expected_unloaded():
            self.model_runner.reload_weights(weights_path=folder)
        self._w2sr_repack_tied_head()

    def w2sr_join_weight_group(
        self, host: str, port: int, rank: int, world_size: int, backend: str, secret: str
    ) -> None:
        import torch.distributed as dist

        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=GROUP_TIMEOUT)
        self._w2sr_group = process_group(store, rank, world_size, backend, secret)

    def w2sr_receive_weights(self, specs: list[tuple[str, str, list[int]]]) -> int:
        """Load the tensors rank 0 broadcasts, in the order of `specs` (name, dtype, shape)."""
        import torch

        def arriving() -> Iterator[tuple[str, Any]]:
            for name, dtype, shape in specs:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self._w2sr_group.broadcast(tensor, 0).wait()
                yield name, tensor

        weights = arriving()
        self._w2sr_reload(weights)
        for _ in weights:  # a loader that stops early must not leave rank 0 broadcasting
            pass
        return len(specs)

    def _w2sr_reload(self, weights: Iterator) -> None:
        """`reload_weights` rather than the model's `load_weights`: the CPU worker repacks weights
        after loading, and a second `load_weights` on repacked parameters fails."""
        with self._w2sr_expected_unloaded():
            self.model_runner.reload_weights(weights_iterator=weights)
        self._w2sr_repack_tied_head()

    def _w2sr_tied(self) -> bool:
        return getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False)

    @contextlib.contextmanager
    def _w2sr_expected_unloaded(self) -> Iterator[None]:
        quiet, log = ExpectedUnloaded(self._w2sr_tied()), logging.getLogger(RELOAD_LOG)
        log.addFilter(quiet)
        try:
            yield
        finally:
            log.removeFilter(quiet)

    def _w2sr_repack_tied_head(self) -> None:
        """A tied output head shares the embedding's weight, but no weight is loaded into it, so
        vLLM does not re-run its processing: on CPU it would keep computing logits from a packed
        copy of the old embedding."""
        head = getattr(self.model_runner.get_model(), "lm_head", None)
        if self._w2sr_tied() and head is not None and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)


# --- the learner's side (rank 0) -------------------------------------------------------------


class ObjectStoreSender:
    """Collects CPU copies, then hands them to every engine through one object-store entry."""

    def __init__(self, actors: list):
        self.actors = actors
        self.named: list = []

    def send(self, name: str, tensor) -> None:
        self.named.append((name, tensor.detach().to("cpu", copy=True)))

    def finish(self) -> list[int]:
        """How many tensors each engine loaded."""
        import ray

        from w2sr.engines import rollout

        ref = ray.put(self.named)
        loads = [actor.load_weights.remote(ref) for actor in self.actors]
        return rollout.answers(loads, "load_weights", rollout.SYNC_TIMEOUT_S)


class CollectiveSender:
    """Rank 0 of a process group whose other ranks are the engines' workers.

    Open it once per run (`open`); each sync announces the tensors (`start`), broadcasts them
    one by one (`send`), and waits for every engine to have loaded them (`finish`).
    """

    def __init__(self, actors: list, group, store, listener):
        self.actors, self.group, self.store, self.listener = actors, group, store, listener
        self.pending: list = []

    @classmethod
    def open(cls, actors: list, backend: str) -> CollectiveSender:
        """The store listens where Ray does on this node (its node address), not on every
        interface."""
        import ray
        import torch.distributed as dist

        from w2sr.engines import rollout

        host = ray.util.get_node_ip_address()
        listener = socket.create_server((host, 0))
        port = listener.getsockname()[1]
        world, secret = 1 + len(actors), secrets.token_hex(16)
        store = dist.TCPStore(
            host,
            port,
            world,
            is_master=True,
            wait_for_workers=False,
            timeout=GROUP_TIMEOUT,
            master_listen_fd=listener.fileno(),
        )
        joined = [
            actor.join_weight_group.remote(host, port, rank, world, backend, secret)
            for rank, actor in enumerate(actors, start=1)
        ]
        group = process_group(store, 0, world, backend, secret)  # returns once all have joined
        rollout.answers(joined, "join_weight_group", rollout.SYNC_TIMEOUT_S)
        return cls(actors, group, store, listener)

    def start(self, specs: list[tuple[str, str, list[int]]]) -> CollectiveSender:
        self.pending = [actor.receive_weights.remote(specs) for actor in self.actors]
        return self

    def send(self, name: str, tensor) -> None:
        self.group.broadcast(tensor.detach().contiguous(), 0).wait()

    def finish(self) -> list[int]:
        """How many tensors each engine loaded."""
        from w2sr.engines import rollout

        return rollout.answers(self.pending, "receive_weights", rollout.SYNC_TIMEOUT_S)
