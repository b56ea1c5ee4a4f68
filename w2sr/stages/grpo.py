"""Stage `grpo`: the RL baseline, GRPO on the student with the run's grader as reward.

    w2sr grpo CONFIG grpo.steps=200

One Ray Train worker group (DeepSpeed ZeRO) is the learner and lives for the whole run
(`w2sr.learner.grpo`); its rank 0 drives the loop and owns the rollout engines, vLLM replicas held
in-process by Ray actors (`w2sr.learner.rollouts`). Each step:

1. rollout: rank 0 has the engines sample `group_size` completions for each of the step's
   `prompts_per_step` prompts (the run's problems, rendered with the student's chat template
   and `thinking`), grades them behind the `<think>` the template prefilled, if any (1 correct;
   `format_reward` for a readable wrong answer; else 0) and normalises rewards within each group
   into advantages;
2. learner: every rank takes its share of the samples and takes `mini_batches` optimizer
   steps on the clipped policy-gradient loss averaged over all response tokens of a mini-batch,
   plus `kl_coef` x the k3 estimate of KL to the frozen reference, minus `entropy_coef` x entropy
   (`w2sr.learner.rl_loss`);
3. sync: the updated weights are gathered (ZeRO-3 partitions one tensor at a time) and sent to
   every engine (`w2sr.engines.weight_sync`: a process group broadcast, NCCL on GPUs, or the Ray
   object store), and the engines reload them in place.

Colocated on GPUs, each engine shares its learner worker's device and sleeps (weights to host
memory, KV cache freed) from the end of its rollout until the next sync.

Artifacts, in `rl/<fingerprint>/` (`w2sr.lineage`): `metrics.jsonl` (one record per step:
reward, accuracy, KL, entropy, response length, clip fraction, and the step's seconds split into
rollout, learner and sync), `model/` (label `rl` for evaluation), `ray/` (checkpoints; a rerun of
the same config resumes from the last one) and `_DONE.json` (fingerprint, steps, final reward,
wall and worker seconds).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig
from w2sr.data.prompt_set import prepare_problems
from w2sr.data.prompts import load_tokenizer, render_prompts
from w2sr.data.templates import TEMPLATES, reasoning_prefill
from w2sr.evaluation.problems import load_problems
from w2sr.learner.fit import fit
from w2sr.learner.grpo import worker_loop
from w2sr.lineage import Lineage
from w2sr.models import ModelSpec
from w2sr.rundir import Claim, RunDir
from w2sr.session import init_ray
from w2sr.tracking import check_trackers

log = logging.getLogger(__name__)


def grpo(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the stage; returns its completion record (with wall and worker seconds)."""
    if cfg.student is None:
        raise ConfigError("student: not set; `w2sr grpo` trains the student model with RL")
    if cfg.grpo is None:
        raise ConfigError("grpo: not set; the RL baseline is trained only when asked for")
    run = RunDir(cfg.run_dir)
    table = prepare_problems(cfg, run)
    with run.stage(Lineage(cfg).rl) as claim:
        if claim.record:
            log.info("the GRPO student is trained for this config; nothing to do")
            return claim.record
        claim.facts = _grpo(cfg, run, claim, table)
    log.info("GRPO student trained: %s", claim.facts)
    return claim.record


def _grpo(cfg: ExperimentConfig, run: RunDir, claim: Claim, table: pa.Table) -> dict[str, Any]:
    """Train the GRPO student in `claim`'s folder on the problems of `table`; returns the done
    record's facts."""
    g, stage = cfg.grpo, claim.folder
    assert cfg.student is not None and g is not None  # `grpo` refused a config without them
    check_trackers(g, "grpo")
    start = time.time()
    # The student is the policy: its own chat template, not the teacher's rendering.
    tokenizer = load_tokenizer(ModelSpec.parse(cfg.student).local(), cfg.trust_remote_code)
    rendered, too_long = render_prompts(
        tokenizer,
        TEMPLATES[cfg.template],
        table.to_pylist(),
        g.engine.max_model_len,
        thinking=cfg.thinking,
    )
    if too_long:
        log.warning(
            "%d prompts leave no room to answer in %d tokens", len(too_long), g.engine.max_model_len
        )
    if not rendered:
        raise RuntimeError(f"no prompt fits grpo.engine.max_model_len ({table.num_rows} prompts)")
    prompts = _requests(rendered)
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
    init_ray(cfg)
    import ray

    heldout = _heldout_prompts(cfg, run, tokenizer, g.engine.max_model_len) if g.eval_every else {}
    loop_config = {
        "prompts": ray.put(prompts),
        "heldout": ray.put(heldout),
        "heldout_names": list(heldout),
        "model": ModelSpec.parse(cfg.student).for_cluster(run),
        "stage": stage,
    }
    resources: dict[str, float] = {"CPU": g.cpus_per_worker}
    name = f"grpo-{claim.fingerprint}"
    metrics = fit(worker_loop, cfg, run, stage, name, g, g.steps, loop_config, resources).metrics
    return {
        "student": cfg.student,
        "model": run.location(stage, layout.MODEL),
        "prompts": len(prompts),
        "steps": metrics["step"],
        "samples_seen": metrics["samples_seen"],
        "final_reward_mean": metrics["reward_mean"],
        "final_accuracy": metrics["accuracy"],
        "resumed_from": metrics["resumed_from"],
        "wall_seconds": round(time.time() - start, 2),
        "worker_seconds": round(metrics["worker_seconds"], 2),
    }


def _requests(rendered: list[dict]) -> list[dict]:
    """What the rollouts need of each prompt: its tokens, its gold answer, and the `<think>` its
    chat template prefilled, which the completions are graded behind."""
    return [
        {
            **{k: row[k] for k in ("prompt_id", "answer", "prompt_token_ids")},
            "prefill": reasoning_prefill(row["prompt"]),
        }
        for row in rendered
    ]


def _heldout_prompts(
    cfg: ExperimentConfig, run: RunDir, tokenizer, max_len: int
) -> dict[str, list[dict]]:
    """Each eval benchmark's problems as `w2sr eval` poses them to the student, for the
    accuracy along training (`grpo.eval_every`)."""
    out = {}
    for name, problems in load_problems(cfg, run).items():
        rendered, _ = render_prompts(
            tokenizer,
            TEMPLATES[cfg.template],
            problems.rows,
            max_len,
            thinking=cfg.thinking,
        )
        out[name] = _requests(rendered)
    return out
