"""Checkpoints through Ray Train: every rank's ZeRO shards in one persisted checkpoint, and the
resume from the latest one."""

from __future__ import annotations

import tempfile
from typing import Any

CHECKPOINT_TAG = "step{step}"  # never "latest": DeepSpeed writes a file of that name beside tags


def save_checkpoint(engine, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every rank writes its ZeRO shards; Ray Train merges them into one persisted checkpoint.

    `state` (at least `step`) is DeepSpeed's client state and comes back from `restore`.
    """
    import ray.train

    with tempfile.TemporaryDirectory(prefix="w2sr-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG.format(**state), client_state=state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint-{state['step']:07d}",
        )


def restore(engine) -> dict[str, Any] | None:
    """Load the latest Ray Train checkpoint (weights, optimizer, schedule); its client state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        loaded, state = engine.load_checkpoint(
            path, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if loaded is None:
        raise RuntimeError(
            f"Ray Train handed back checkpoint {checkpoint.path} but it did not load"
        )
    return state
