"""Stage `train`: SFT of the student on a selected trace set, on Ray Train with DeepSpeed ZeRO.

    w2sr train CONFIG train.variant=correct      # W2SR-P

The driver tokenizes the set once (sft_data) and hands it to the workers through the object store;
each worker runs DeepSpeed over its share of every global batch. Per-step metrics go to stdout and
to `students/{variant}/metrics.jsonl` (and MLflow / W&B when configured); checkpoints go through
Ray Train under `students/{variant}/ray/`, so a failed worker (within `max_failures`) or a rerun of
the same config resumes at the last checkpoint's step and data position, with its optimizer and
schedule. The result is a Hugging Face folder, `students/{variant}/model`.

Layout (relative to the run dir):

    students/{variant}/metrics.jsonl   one JSON record per step (a resumed attempt rewrites the
                                       steps after its checkpoint; `resumed_from` tells them apart)
    students/{variant}/model/          the trained student (config, safetensors, tokenizer,
                                       chat template, generation config)
    students/{variant}/_DONE.json      fingerprint, steps, final loss, truncated samples, cost
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from w2sr.config import ConfigError, ExperimentConfig
from w2sr.rundir import DONE, MetricsLog, RunDir

log = logging.getLogger(__name__)


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the stage; returns its completion record."""
    if cfg.student is None:
        raise ConfigError(
            "student: not set; `w2sr train` fine-tunes the student model "
            "(a local Hugging Face folder, a hub id or builtin:NAME)"
        )
    run = RunDir(cfg.run_dir)
    variant = cfg.train.variant
    stage = f"students/{variant}"
    if not run.exists("sft", DONE):
        raise RuntimeError(f"no training sets in {cfg.run_dir}; run `w2sr select` first")
    fingerprint = "-".join(
        [
            cfg.fingerprint("train", "student", "template", "seed"),
            run.read_json("sft", DONE)["fingerprint"],
        ]
    )
    record = run.done(stage, fingerprint)
    if record:
        log.info("student %s is trained for this config; nothing to do", variant)
        return record

    from w2sr import learner

    learner.check_trackers(cfg.train, "train")
    start = time.time()
    run.begin(stage, fingerprint)
    data, model_path = _tokenize(cfg, run)
    final = _fit(cfg, run, stage, fingerprint, data, model_path).metrics
    steps = {}  # the record that stands for each step: a resumed attempt's replaces a killed one's
    for record in map(json.loads, run.read_text(stage, "metrics.jsonl").splitlines()):
        steps[record["step"]] = record
    tokens = sum(r["tokens"] for r in steps.values())
    facts = {
        "variant": variant,
        "student": cfg.student,
        "model": run.location(stage, "model"),
        "samples": len(data),
        "truncated": data.truncated,
        "dropped": data.dropped,
        "steps": final["step"],
        "final_loss": final["loss"],
        "tokens": tokens,
        "tokens_per_second": tokens / sum(r["step_seconds"] for r in steps.values()),
        "wall_seconds": round(time.time() - start, 2),
        "worker_seconds": round(final["worker_seconds"], 2),
    }
    run.mark_done(stage, fingerprint, **facts)
    log.info("student %s trained: %s", variant, json.dumps(facts))
    return run.read_json(stage, DONE)


def _tokenize(cfg: ExperimentConfig, run: RunDir):
    from transformers import AutoTokenizer

    from w2sr.models import resolve_model
    from w2sr.sft_data import build_sft_set
    from w2sr.templates import TEMPLATES

    model_path = resolve_model(cfg.student)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    traces = run.read_parquet("sft", f"{cfg.train.variant}.parquet")
    data = build_sft_set(tokenizer, TEMPLATES[cfg.template], traces, cfg.train.cutoff_len)
    if not len(data):
        raise RuntimeError(
            f"the {cfg.train.variant} set has no trainable sample ({traces.num_rows} rows)"
        )
    if data.truncated or data.dropped:
        log.warning(
            "%d of %d samples truncated at cutoff_len %d; %d dropped (prompt alone fills it)",
            data.truncated,
            traces.num_rows,
            cfg.train.cutoff_len,
            data.dropped,
        )
    return data, model_path


def _fit(cfg: ExperimentConfig, run: RunDir, stage: str, fingerprint: str, data, model_path: str):
    import ray

    from w2sr import engines, learner
    from w2sr.sft_data import total_steps

    tcfg = cfg.train
    steps = total_steps(len(data), tcfg.global_batch_size, tcfg.epochs, tcfg.max_steps)
    log.info(
        "training %s on %d samples: %d steps of %d (%d workers x %d micro-batches of %d), %s",
        cfg.student,
        len(data),
        steps,
        tcfg.global_batch_size,
        tcfg.num_workers,
        tcfg.grad_accum_steps,
        tcfg.micro_batch_size,
        "packed" if tcfg.packing else "padded",
    )
    engines.init_ray(cfg)
    loop_config = {"data": ray.put(data), "model": model_path, "steps": steps, "stage": stage}
    return learner.fit(_worker_loop, cfg, run, stage, f"sft-{fingerprint}", tcfg, loop_config)


# --- inside the Ray Train workers ------------------------------------------------------------


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: restore, train to the last step, checkpoint, export."""
    from w2sr import learner

    cfg, rank, world, seed, tokenizer, attempt_start = learner.start_worker(config, "train")

    import ray
    import torch
    import torch.distributed as dist

    from w2sr.sft_data import assistant_end, layout, packed_batch, padded_batch, step_samples

    tcfg = cfg.train
    data = ray.get(config["data"])
    steps = config["steps"]
    engine, _ds_config = learner.build_engine(
        config["model"], tcfg, steps, use_gpu=cfg.use_gpu, trust_remote_code=cfg.trust_remote_code
    )
    state = learner.restore(engine) or {"step": 0, "samples_seen": 0, "worker_seconds": 0.0}
    resumed_from, prior_seconds = state["step"], state["worker_seconds"]
    if resumed_from and rank == 0:
        log.info("resumed at step %d (sample %d)", resumed_from, state["samples_seen"])

    run = RunDir(cfg.run_dir)
    metrics_log = MetricsLog(run, config["stage"]) if rank == 0 else None
    trackers = learner.Trackers(tcfg, config["name"], tcfg.model_dump(mode="json"))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    global_batch = tcfg.global_batch_size
    for step in range(state["step"], steps):
        began = time.time()
        lr = engine.get_lr()[0]
        indices = step_samples(len(data), global_batch, seed, state["samples_seen"])
        # DeepSpeed averages gradients over ranks: scale so the step's loss is the mean over
        # every target token of the global batch, whatever the ranks' shares.
        step_targets = int(data.target_counts[indices].sum())
        scale = world / step_targets
        loss_sum, tokens = 0.0, 0
        for micro in layout(indices, data.lengths, world, tcfg.micro_batch_size)[rank]:
            batch = packed_batch(data, micro) if tcfg.packing else padded_batch(data, micro, pad_id)
            loss, _ = learner.token_loss(engine, batch)
            engine.backward(loss * scale, scale_wrt_gas=False)
            engine.step()
            loss_sum += loss.item()
            tokens += int(data.lengths[micro].sum())
        totals = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=engine.device)
        dist.all_reduce(totals)
        seconds = time.time() - began
        state = {
            "step": step + 1,
            "samples_seen": state["samples_seen"] + global_batch,
            "worker_seconds": prior_seconds + world * (time.time() - attempt_start),
        }
        record = {
            "step": step + 1,
            "loss": float(totals[0]) / step_targets,
            "lr": lr,
            "grad_norm": float(engine.get_global_grad_norm()),
            "tokens": int(totals[1]),
            "tokens_per_second": float(totals[1]) / seconds,
            "samples_seen": state["samples_seen"],
            "epoch": state["samples_seen"] / len(data),
            "step_seconds": seconds,
            "time": time.time(),
            "resumed_from": resumed_from,
        }
        if metrics_log:
            metrics_log.write(record)
            log.info(
                "step %d/%d loss %.4f lr %.3g grad_norm %.3f tokens/s %.0f samples %d",
                record["step"],
                steps,
                record["loss"],
                record["lr"],
                record["grad_norm"],
                record["tokens_per_second"],
                record["samples_seen"],
            )
            tracked = ("loss", "lr", "grad_norm", "tokens_per_second", "samples_seen")
            trackers.log({k: record[k] for k in tracked}, step + 1)
        if state["step"] % tcfg.checkpoint_every == 0 or state["step"] == steps:
            if metrics_log:
                metrics_log.flush()
            learner.save_checkpoint(
                engine, state, {**record, "worker_seconds": state["worker_seconds"]}
            )

    end_text = assistant_end(tokenizer)
    if rank == 0:
        with run.staged_folder(config["stage"], "model") as out:
            learner.export_hf(engine, tokenizer, out, end_text)
    else:
        learner.export_hf(engine, tokenizer, None, end_text)
    trackers.close()
