"""The SFT learner, one Ray Train worker of it: each step takes the next global batch of the
sample stream (`w2sr.learner.batches`), this rank's share of it in micro-batches."""

from __future__ import annotations

import time
from typing import Any

from w2sr.learner.batches import assistant_end, micro_batch_plan, sft_rows, step_samples
from w2sr.learner.engine import build_engine, data_parallel_scale, token_loss
from w2sr.learner.fit import start_worker
from w2sr.learner.loop import StepLoop

TRACKED = ("loss", "lr", "grad_norm", "tokens_per_second", "samples_seen")


def worker_loop(config: dict[str, Any]) -> None:
    """Restore, train to the last step, checkpoint, export."""
    worker = start_worker(config)
    cfg, rank, world, tokenizer = worker.cfg, worker.rank, worker.world, worker.tokenizer

    import ray
    import torch
    import torch.distributed as dist

    tcfg = cfg.train
    data = ray.get(config["data"])
    steps = config["steps"]
    engine, _ds_config = build_engine(
        worker.model, tcfg, steps, use_gpu=cfg.use_gpu, trust_remote_code=cfg.trust_remote_code
    )
    loop = StepLoop(
        worker,
        engine,
        tcfg,
        run_name=config["name"],
        stage=config["stage"],
        steps=steps,
        workers=world,
        start={"samples_seen": 0},
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    global_batch = tcfg.global_batch_size

    def step(index: int, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        began = time.time()
        lr = engine.get_lr()[0]
        indices = step_samples(len(data), global_batch, worker.seed, state["samples_seen"])
        step_targets = int(data.target_counts[indices].sum())
        scale = data_parallel_scale(step_targets, world)  # the mean over the global batch
        loss_sum, tokens = 0.0, 0
        for micro in micro_batch_plan(indices, data.lengths, world, tcfg.micro_batch_size)[rank]:
            loss, _ = token_loss(engine, sft_rows(data, micro, tcfg.packing, pad_id))
            engine.backward(loss * scale, scale_wrt_gas=False)
            engine.step()
            loss_sum += loss.item()
            tokens += int(data.lengths[micro].sum())
        totals = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=engine.device)
        dist.all_reduce(totals)
        seconds = time.time() - began
        samples_seen = state["samples_seen"] + global_batch
        metrics = {
            "loss": float(totals[0]) / step_targets,
            "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm()),
            "tokens": int(totals[1]),
            "tokens_per_second": float(totals[1]) / seconds,
            "samples_seen": samples_seen,
            "epoch": samples_seen / len(data),
            "step_seconds": seconds,
        }
        return metrics, {"samples_seen": samples_seen}

    def describe(r: dict[str, Any]) -> str:
        return (
            f"step {r['step']}/{steps} loss {r['loss']:.4f} lr {r['lr']:.3g} "
            f"grad_norm {r['grad_norm']:.3f} tokens/s {r['tokens_per_second']:.0f} "
            f"samples {r['samples_seen']}"
        )

    loop.run(step, describe, TRACKED)
    loop.finish(assistant_end(tokenizer))
