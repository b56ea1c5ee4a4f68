"""Stage `train`: SFT of the student on a selected trace set, on Ray Train with DeepSpeed ZeRO.

    w2sr train CONFIG train.variant=correct      # W2SR-P

A Ray task tokenizes the set once, reading it batch by batch (`w2sr.learner.batches`), into the
object store, where the workers find it and the driver never holds it; each worker runs DeepSpeed
over its share of every global batch (`w2sr.learner.sft`). The stage folder is
`students/{variant}/<fingerprint>` (`w2sr.lineage`). Per-step metrics go to stdout and to its
`metrics.jsonl` (and MLflow / W&B when configured); checkpoints go through Ray Train under its
`ray/`, so a failed worker (within `max_failures`) or a rerun of the same config resumes at the
last checkpoint's step and data position, with its optimizer and schedule. The result is a
Hugging Face folder, `model/`; `_DONE.json` beside it holds the fingerprint, steps, final loss,
truncated and left-out samples and cost.

Prompts are the student's own chat template's, rendered with `thinking`; `train.reasoning` says
whether the teacher's thought is in the targets (`w2sr.learner.batches.sft_target`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig
from w2sr.data.prompts import load_tokenizer
from w2sr.data.templates import TEMPLATES
from w2sr.learner.batches import SFTSet, build_sft_set, total_steps
from w2sr.learner.fit import fit
from w2sr.learner.sft import worker_loop
from w2sr.lineage import Lineage
from w2sr.models import ModelSpec
from w2sr.rundir import METRICS, Claim, RunDir
from w2sr.session import init_ray
from w2sr.tracking import check_trackers

log = logging.getLogger(__name__)

SFT_COLUMNS = ("problem", "trace", "finish_reason")  # what a sample is made of


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the stage; returns its completion record."""
    if cfg.student is None:
        raise ConfigError(
            "student: not set; `w2sr train` fine-tunes the student model "
            "(a local Hugging Face folder, a hub id or builtin:NAME)"
        )
    run = RunDir(cfg.run_dir)
    variant = cfg.train.variant
    sets = Lineage(cfg).sft
    if not run.done(sets.folder, sets.fingerprint):
        raise RuntimeError(
            f"no training sets for this config in {cfg.run_dir}; run `w2sr select` first"
        )
    with run.stage(Lineage(cfg).student(variant)) as claim:
        if claim.record:
            log.info("student %s is trained for this config; nothing to do", variant)
            return claim.record
        claim.facts = _train(cfg, run, claim)
    log.info("student %s trained: %s", variant, json.dumps(claim.facts))
    return claim.record


def _train(cfg: ExperimentConfig, run: RunDir, claim: Claim) -> dict[str, Any]:
    """Fine-tune the student in `claim`'s folder; returns the done record's facts."""
    assert cfg.student is not None  # `train` refused a config without one
    tcfg, variant = cfg.train, cfg.train.variant
    stage, sets = claim.folder, Lineage(cfg).sft
    check_trackers(tcfg, "train")
    start = time.time()

    tokenizer = load_tokenizer(ModelSpec.parse(cfg.student).local(), cfg.trust_remote_code)
    init_ray(cfg)
    import ray

    # Tokenized in a task, into the object store: this driver holds the set's counts, never
    # its tokens, however many traces it has.
    tokenize: Any = ray.remote(num_returns=2)(_tokenize)  # Ray's types know one return
    data, counts_ref = tokenize.remote(cfg, run, tokenizer)
    counts: dict[str, int] = ray.get(counts_ref)
    if not counts["samples"]:
        raise RuntimeError(f"the {variant} set has no trainable sample ({counts['traces']} rows)")
    if counts["unanswered"]:
        log.warning(
            "%d of %d traces left out: reasoning is stripped and they have no answer after "
            "their thought (one never closed, or nothing after it)",
            counts["unanswered"],
            counts["traces"],
        )
    if counts["truncated"] or counts["dropped"]:
        log.warning(
            "%d of %d samples truncated at cutoff_len %d; %d dropped (prompt alone fills it)",
            counts["truncated"],
            counts["traces"],
            tcfg.cutoff_len,
            counts["dropped"],
        )
    steps = total_steps(counts["samples"], tcfg.global_batch_size, tcfg.epochs, tcfg.max_steps)
    log.info(
        "training %s on %d samples: %d steps of %d (%d workers x %d micro-batches of %d), %s",
        cfg.student,
        counts["samples"],
        steps,
        tcfg.global_batch_size,
        tcfg.num_workers,
        tcfg.grad_accum_steps,
        tcfg.micro_batch_size,
        "packed" if tcfg.packing else "padded",
    )
    loop_config = {
        "data": data,
        "model": ModelSpec.parse(cfg.student).for_cluster(run),
        "steps": steps,
        "stage": stage,
    }
    name = f"sft-{claim.fingerprint}"
    final = fit(worker_loop, cfg, run, stage, name, tcfg, steps, loop_config).metrics

    # The record that stands for each step: a resumed attempt's replaces a killed one's.
    by_step = {}
    for step_record in map(json.loads, run.read_text(stage, METRICS).splitlines()):
        by_step[step_record["step"]] = step_record
    tokens = sum(r["tokens"] for r in by_step.values())
    return {
        "variant": variant,
        "student": cfg.student,
        "model": run.location(stage, layout.MODEL),
        "training_set": sets.folder,
        **{key: counts[key] for key in ("samples", "truncated", "dropped", "unanswered")},
        "steps": final["step"],
        "final_loss": final["loss"],
        "tokens": tokens,
        "tokens_per_second": tokens / sum(r["step_seconds"] for r in by_step.values()),
        "wall_seconds": round(time.time() - start, 2),
        "worker_seconds": round(final["worker_seconds"], 2),
    }


def _tokenize(cfg: ExperimentConfig, run: RunDir, tokenizer) -> tuple[SFTSet, dict[str, int]]:
    """The training set's tokens, read batch by batch, and their counts."""
    traces = run.iter_parquet(
        Lineage(cfg).sft.folder, layout.sft_set(cfg.train.variant), columns=SFT_COLUMNS
    )
    data = build_sft_set(
        tokenizer,
        TEMPLATES[cfg.template],
        traces,
        cfg.train.cutoff_len,
        thinking=cfg.thinking,
        reasoning=cfg.train.reasoning,
    )
    counts = {
        "samples": len(data),
        "traces": data.traces,
        "truncated": data.truncated,
        "dropped": data.dropped,
        "unanswered": data.unanswered,
    }
    return data, counts
