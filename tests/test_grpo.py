"""GRPO: the loss pieces on their own (the step's logic is in test_grpo_loop.py), then one real
run (vLLM rollout actors, a Ray Train + DeepSpeed ZeRO-3 learner, weight sync by broadcast in a
gloo process group, the CPU twin of the NCCL one) that gets a worker SIGKILLed midway and resumes
from its checkpoint, a check that an engine synced by either transport computes with exactly the
weights sent, and a run with a separate engine on an object-store run dir.

The task must give a tiny model a reward signal from the first step: every problem's answer is 7,
and the student is first taught (a few seconds of plain SFT) to answer `\\boxed{d}` with d drawn
from 3, 5, 7 and 9, so about one sample in four is right and GRPO has something to reinforce; a
wrong but readable answer earns the format reward, 0.1.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from w2sr import layout
from w2sr.config import ConfigError, GRPOConfig, validate
from w2sr.data.prompts import load_tokenizer, render_prompts
from w2sr.data.templates import TEMPLATES
from w2sr.learner.batches import RolloutBatch, rollout_rows
from w2sr.learner.rl_loss import group_advantages, policy_loss
from w2sr.learner.rollouts import graded
from w2sr.lineage import Lineage
from w2sr.registry import model_table
from w2sr.rundir import RunDir
from w2sr.stages.grpo import _requests, grpo

PROBLEMS = [f"What is {a} + {7 - a}?" for a in range(8)] + [
    f"What is {a + 7} - {a}?" for a in range(8)
]
STEPS = 14
# A kill two steps past a checkpoint: two steps are replayed, the second on weights the
# restored optimizer state updated.
KILL_AFTER = 5
CHECKPOINT_EVERY = 3


def config(run_dir: Path | str, student: str, prompts: Path, **grpo_overrides):
    return validate(
        {
            "run_dir": str(run_dir),
            "teacher": student,
            "student": student,
            "grader": "exact",
            "prompts": {"source": {"type": "file", "path": str(prompts)}},
            "grpo": {
                "steps": STEPS,
                "prompts_per_step": 4,
                "group_size": 8,
                "mini_batches": 2,
                "micro_batch_size": 8,
                "num_workers": 2,
                "zero_stage": 3,
                "lr": 3e-4,
                "kl_coef": 1e-3,
                "entropy_coef": 0.0,
                "format_reward": 0.1,
                "sampling": {"max_tokens": 8},
                "engine": {"max_model_len": 256},
                "checkpoint_every": CHECKPOINT_EVERY,
                "max_failures": 1,
                "weight_sync": "collective",
                **grpo_overrides,
            },
        }
    )


@contextlib.contextmanager
def one_thread():
    """Torch in the test process: on a few shared cores, several OpenMP threads spin against
    the Ray workers and a tiny model's step gets 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rl_dir(run_dir: Path) -> Path:
    """The one GRPO folder of a run that trained one config."""
    (folder,) = (run_dir / "rl").iterdir()
    return folder


def metrics(run_dir: Path) -> list[dict]:
    path = rl_dir(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the loss --------------------------------------------------------------------------------


def test_group_advantages_are_normalised_within_each_group():
    rewards = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, group_size=4)
    assert adv[:4] == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)  # std with ddof=1 is 0.5
    assert adv[4:].tolist() == [0.0] * 4  # all right: nothing to learn from this group


def test_policy_loss_clips_the_ratio_on_the_advantage_side():
    g = GRPOConfig().model_copy(update={"kl_coef": 0.0, "entropy_coef": 0.0})
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.0]))  # ratios
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, stats = policy_loss(logp, old, adv, None, torch.zeros(4), g)
    # min(r A, clip(r) A): the gain of a good token is capped at 1.2; bad tokens are not spared
    assert loss.tolist() == pytest.approx([-1.2, 1.5, 0.8, -2.0], rel=1e-5)
    assert stats["clipped"] == 2 and stats["kl"] == 0.0  # the 1st and 3rd lose their gradient
    g = g.model_copy(update={"kl_coef": 0.5, "entropy_coef": 0.1})
    entropy = torch.full((4,), 2.0)
    loss_kl, stats = policy_loss(old, old, torch.zeros(4), old - 1.0, entropy, g)
    k3 = float(np.exp(-1.0) + 1.0 - 1.0)  # exp(ref - logp) - (ref - logp) - 1 at ref - logp = -1
    assert stats["kl"] == pytest.approx(4 * k3, rel=1e-5)
    assert loss_kl.tolist() == pytest.approx([0.5 * k3 - 0.2] * 4, rel=1e-5)


def test_entropy_carries_a_gradient_only_when_the_loss_has_its_bonus():
    from w2sr.learner.rl_loss import token_logprobs

    logits = torch.randn(3, 11, requires_grad=True)
    targets = torch.tensor([1, 5, 10])
    for bonus in (False, True):
        logp, entropy = token_logprobs(logits, targets, entropy_grad=bonus)
        assert logp.requires_grad and entropy.requires_grad == bonus
        probs = torch.softmax(logits.detach(), -1)
        assert entropy.tolist() == pytest.approx((-(probs * probs.log()).sum(-1)).tolist(), 1e-5)


def test_data_parallel_scale_gives_the_mean_over_every_token_whatever_the_shares():
    """Ranks with unequal token shares each scale their summed loss; DeepSpeed averages their
    gradients: the result is the gradient of the mean over every token of the batch."""
    from w2sr.learner.engine import data_parallel_scale

    weight = torch.tensor(0.5, requires_grad=True)
    tokens = torch.arange(1.0, 11.0)
    shares = [tokens[:7], tokens[7:]]  # 7 tokens on rank 0, 3 on rank 1
    grads = []
    for share in shares:
        loss = (weight * share).square().sum() * data_parallel_scale(len(tokens), len(shares))
        grads.append(torch.autograd.grad(loss, weight)[0])
    averaged = torch.stack(grads).mean()  # what DeepSpeed's all-reduce leaves on every rank
    (expected,) = torch.autograd.grad((weight * tokens).square().mean(), weight)
    torch.testing.assert_close(averaged, expected)
    assert data_parallel_scale(0, 2) == 2.0  # a mini-batch of empty completions divides by 1


def rollout_batch(prompt_ids, completion_ids, advantages) -> RolloutBatch:
    """Sampled groups with only what the update reads."""
    n = len(prompt_ids)
    return RolloutBatch(prompt_ids, completion_ids, advantages, [0.0] * n, *[[False] * n] * 3)


@pytest.mark.parametrize("packed", [True, False])
def test_rollout_rows_score_exactly_the_completion_tokens(packed):
    batch = rollout_batch(
        prompt_ids=[[1, 2, 3], [4, 5]], completion_ids=[[6, 7], [8, 9, 10]], advantages=[0.5, -1.0]
    )
    row = rollout_rows(batch, [0, 1], packed)
    if packed:
        assert row["input_ids"].tolist() == [[1, 2, 3, 6, 7, 4, 5, 8, 9, 10]]
        assert row["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    else:
        assert row["input_ids"].tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 9, 10]]
        assert row["attention_mask"].tolist() == [[1] * 5, [1] * 5]
    ids = row["input_ids"].flatten()
    # position t predicts token t + 1: the scored positions predict the completions, in order
    assert ids[row["response"] + 1].tolist() == row["targets"].tolist() == [6, 7, 8, 9, 10]
    assert row["advantages"].tolist() == [0.5, 0.5, -1.0, -1.0, -1.0]


def test_padded_and_packed_rows_give_the_same_logprobs(tiny_student):
    from transformers import AutoModelForCausalLM

    from w2sr.learner.rl_loss import response_logits, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    batch = rollout_batch(
        prompt_ids=[[11, 12, 13, 14], [15, 16]],
        completion_ids=[[20, 21], [22, 23, 24, 25, 26]],
        advantages=[1.0, -1.0],
    )
    with torch.no_grad():
        out = [
            token_logprobs(response_logits(model, row), row["targets"])
            for row in (rollout_rows(batch, [0, 1], p) for p in (True, False))
        ]
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)
    # the head at the response positions only: the logits of the whole rows, at those positions
    for packed in (True, False):
        row = rollout_rows(batch, [0, 1], packed)
        inputs = {k: row[k] for k in ("input_ids", "position_ids", "attention_mask") if k in row}
        with torch.no_grad():
            whole = model(**inputs, use_cache=False).logits.flatten(0, 1)[row["response"]]
            torch.testing.assert_close(response_logits(model, row), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bonus", [False, True])
def test_the_chunked_head_loss_equals_the_loss_over_whole_logits(tiny_student, bonus):
    """`response_loss` (the head at completion positions, a few rows of logits at a time, the
    loss's gradient taken in the forward) gives the loss, log-probabilities, entropies and
    gradients of GRPO's loss over whole logits, on packed and padded rows, with the entropy in
    the loss or not; `response_logprobs` gives the same log-probabilities without gradient."""
    from transformers import AutoModelForCausalLM

    from w2sr.learner import lm_head
    from w2sr.learner.rl_loss import (
        micro_batch_loss,
        response_logprobs,
        response_loss,
        token_logprobs,
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    batch = rollout_batch(
        prompt_ids=[[11, 12, 13, 14], [15, 16], [17]],
        completion_ids=[[20, 21], [22, 23, 24, 25, 26], [27, 28, 29]],
        advantages=[1.0, -1.0, 0.5],
    )
    g = GRPOConfig().model_copy(update={"kl_coef": 0.1, "entropy_coef": 0.01 if bonus else 0.0})
    for packed in (True, False):
        row = rollout_rows(batch, [0, 1, 2], packed)
        inputs = {k: row[k] for k in ("input_ids", "position_ids", "attention_mask") if k in row}
        ref = response_logprobs(model, row, row["targets"]) - torch.linspace(0.0, 0.5, 10)
        old = ref + 0.05 * torch.arange(10.0).cos()  # some ratios outside the clip
        per_token = micro_batch_loss(old, row["advantages"], ref, g)
        results = []
        for chunked in (True, False):
            model.zero_grad()
            if chunked:
                loss, logp, entropy = response_loss(model, row, row["targets"], per_token, bonus)
            else:
                logits = model(**inputs, use_cache=False).logits.flatten(0, 1)[row["response"]]
                logp, entropy = token_logprobs(logits.float(), row["targets"], bonus)
                loss = per_token(logp, entropy, slice(None)).sum()
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            results.append((loss.detach(), logp.detach(), entropy.detach(), grads))
        for fast, plain in zip(*results, strict=True):
            torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)
        assert results[0][3].abs().sum() > 0
        torch.testing.assert_close(ref + torch.linspace(0.0, 0.5, 10), results[1][1])
    # in chunks of 3 rows, a ragged last one, what one chunk gives
    hidden = (0.1 * torch.randn(10, 64)).requires_grad_()  # log-probabilities near the model's
    weight = torch.randn(500, 64, requires_grad=True)
    targets = torch.randint(0, 500, (10,))
    out = []
    for chunk in (3, 4096):
        hidden.grad = weight.grad = None
        loss, logp, _ = lm_head.linear_token_loss(hidden, weight, targets, per_token, bonus, chunk)
        (2 * loss).backward()
        chunked = lm_head.linear_logprobs(hidden, weight, targets, chunk)
        out.append((loss.detach(), logp, chunked, hidden.grad.clone(), weight.grad.clone()))
    for chunked, whole in zip(*out, strict=True):
        torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(out[0][1], out[0][2])


def test_rollouts_are_graded_behind_the_prefilled_think(tmp_path):
    """A completion is what the policy wrote; it is graded behind the `<think>` the student's
    template prefilled, so one that never closes its thought has no answer, and the held-out
    accuracy reads completions the same way."""
    from w2sr.models import build_tiny_model

    tokenizer = load_tokenizer(str(build_tiny_model(tmp_path / "thinking", thinking=True)), False)
    rows = [{"prompt_id": "p", "problem": "What is 1 + 2?", "answer": "3"}]
    completions = [
        {"text": "1 + 2 = 3.</think>\n\n\\boxed{3}"},
        {"text": "1 + 2 = \\boxed{3}"},  # still thinking
        {"text": "</think>\\boxed{4}"},
    ]
    expected = {None: ([1, 0, 0], [1, 0, 1]), False: ([1, 1, 0], [1, 1, 1])}
    for thinking, (correct, answered) in expected.items():
        rendered, _ = render_prompts(tokenizer, TEMPLATES["paper"], rows, 256, thinking=thinking)
        prompts = _requests(rendered)
        assert prompts[0]["prefill"] == ("<think>\n" if thinking is None else "")
        got = graded(prompts, [completions], "math", "strict")
        assert [a.tolist() for a in got] == [list(map(bool, correct)), list(map(bool, answered))]


def test_config_errors_come_before_any_ray_work(tmp_path):
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size"):
        config(tmp_path, "s", tmp_path / "p.jsonl", prompts_per_step=3, group_size=3)
    with pytest.raises(ConfigError, match="temperature 0"):
        config(tmp_path, "s", tmp_path / "p.jsonl", sampling={"temperature": 0})
    with pytest.raises(ConfigError, match="colocated engines"):
        config(tmp_path, "s", tmp_path / "p.jsonl", engine={"replicas": 3})
    on_gpu = config(tmp_path, "s", tmp_path / "p.jsonl").model_dump() | {"use_gpu": True}
    with pytest.raises(ConfigError, match="grpo.weight_sync: collective .NCCL. cannot join"):
        validate(on_gpu)


def test_weight_sync_auto_picks_nccl_only_for_separate_gpu_engines():
    from w2sr.engines.weight_sync import transport

    assert transport("auto", use_gpu=True, colocated=False) == "collective"
    assert transport("auto", use_gpu=True, colocated=True) == "object_store"
    assert transport("auto", use_gpu=False, colocated=False) == "object_store"
    assert transport("collective", use_gpu=False, colocated=True) == "collective"


def test_colocated_engines_sit_beside_their_learner_worker():
    """Colocated: the learner worker's node and device, no resources of its own (Ray Train holds
    the worker's bundle); separate: a replica's own resources."""
    from w2sr.config import EngineConfig
    from w2sr.engines.rollout import actor_options

    engine = EngineConfig(cpus_per_replica=2, accelerator_type="A100")
    beside = {"node_id": "ab" * 28, "cpus": 4, "gpu_ids": ["3"]}
    on_gpu = actor_options(engine, use_gpu=True, beside=beside)
    assert (on_gpu["num_cpus"], on_gpu["num_gpus"]) == (0, 0) and "accelerator_type" not in on_gpu
    strategy = on_gpu["scheduling_strategy"]
    assert (strategy.node_id, strategy.soft) == (beside["node_id"], False)
    assert on_gpu["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert on_gpu["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "4"
    on_cpu = actor_options(engine, use_gpu=False, beside=beside)
    assert "CUDA_VISIBLE_DEVICES" not in on_cpu["runtime_env"]["env_vars"]
    apart = actor_options(engine, use_gpu=True)
    assert (apart["num_cpus"], apart["num_gpus"], apart["accelerator_type"]) == (2, 1, "A100")


# --- a real run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answerer(tiny_student, tmp_path_factory) -> str:
    """The tiny student taught to answer `\\boxed{d}`, d one of 3, 5, 7, 9 at random."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    rng = random.Random(0)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with one_thread():
        _teach(model, tokenizer, optimizer, rng)
    out = tmp_path_factory.mktemp("models") / "answerer"
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _teach(model, tokenizer, optimizer, rng: random.Random) -> None:
    for _ in range(100):
        rows, labels = [], []
        for _ in range(16):
            prompt = tokenizer.apply_chat_template(
                TEMPLATES["paper"].messages(rng.choice(PROBLEMS)),
                tokenize=False,
                add_generation_prompt=True,
            )
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer = f"\\boxed{{{rng.choice([3, 5, 7, 9])}}}<|im_end|>"
            c = tokenizer(answer, add_special_tokens=False)["input_ids"]
            rows.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, rows))
        pad = [[0] * (width - len(r)) for r in rows]
        loss = model(
            input_ids=torch.tensor([r + z for r, z in zip(rows, pad, strict=True)]),
            attention_mask=torch.tensor([[1] * len(r) + z for r, z in zip(rows, pad, strict=True)]),
            labels=torch.tensor(
                [lab + [-100] * len(z) for lab, z in zip(labels, pad, strict=True)]
            ),
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _kill_a_worker_once_checkpointed(run_dir: Path, step: int, killed: list, timeout=600.0):
    """SIGKILL one Ray Train worker (a process this test started) once `step` is in the metrics
    and Ray Train has registered a checkpoint (a checkpoint reported but not yet registered by
    the controller is lost with the worker)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = [
            line
            for path in run_dir.glob("rl/*/metrics.jsonl")
            for line in path.read_text().splitlines()
        ]
        logged = any(json.loads(line)["step"] >= step for line in lines if line.endswith("}"))
        snapshots = list(run_dir.glob("rl/*/ray/*/checkpoint_manager_snapshot.json"))
        if logged and any("checkpoint-" in path.read_text() for path in snapshots):
            for proc in psutil.Process().children(recursive=True):
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed_run(ray_session, answerer, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo")
    prompts = run_dir.parent / f"{run_dir.name}-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": p, "answer": "7"}) + "\n" for p in PROBLEMS))
    killed: list[int] = []
    watcher = threading.Thread(
        target=_kill_a_worker_once_checkpointed,
        args=(run_dir, KILL_AFTER, killed),
        daemon=True,
    )
    watcher.start()
    cfg = config(run_dir, answerer, prompts, mlflow_tracking_uri=f"file://{run_dir}-mlruns")
    record = grpo(cfg)
    watcher.join(timeout=1)
    assert killed, "the run ended before a worker could be killed"
    return run_dir, record, cfg


@pytest.mark.slow
def test_reward_rises(killed_run):
    run_dir, record, _ = killed_run
    rewards = [r["reward_mean"] for r in {r["step"]: r for r in metrics(run_dir)}.values()]
    assert len(rewards) == STEPS == record["steps"]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    # the frozen reference, built apart from the learner under ZeRO-3, starts as the policy
    records = metrics(run_dir)
    assert records[0]["kl"] < 0.01 < max(r["kl"] for r in records)


@pytest.mark.slow
def test_step_metrics_reach_mlflow(killed_run):
    """Every step's metrics are in MLflow (the attempt before the kill and the resumed one log
    to runs of the same name)."""
    import mlflow

    run_dir, _, cfg = killed_run
    client = mlflow.MlflowClient(cfg.grpo.mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("w2sr").experiment_id])
    assert len({r.info.run_name for r in runs}) == 1 and len(runs) == 2
    logged = {
        m.step: m.value
        for r in sorted(runs, key=lambda r: r.info.start_time)
        for m in client.get_metric_history(r.info.run_id, "reward_mean")
    }
    final = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(logged) == sorted(final) == list(range(1, STEPS + 1))
    assert logged[STEPS] == pytest.approx(final[STEPS]["reward_mean"])
    assert client.get_run(runs[0].info.run_id).data.params["group_size"] == "8"


@pytest.mark.slow
def test_killed_run_resumes_at_its_checkpoint_step(killed_run):
    """After the kill, Ray Train restarts the group (and rank 0 its engines) at the last
    checkpoint: every replayed step samples the same groups from the same weights, and its
    update (weights and optimizer state restored) gives the same losses."""
    run_dir, record, _ = killed_run
    records = metrics(run_dir)
    first = [r for r in records if r["resumed_from"] == 0]
    resumed = [r for r in records if r["resumed_from"] > 0]
    start = resumed[0]["resumed_from"]
    assert start % CHECKPOINT_EVERY == 0 and start < first[-1]["step"]
    assert record["resumed_from"] == start
    assert [r["step"] for r in resumed] == list(range(start + 1, STEPS + 1))
    killed = {r["step"]: r for r in first if r["step"] > start}
    replayed = {r["step"]: r for r in resumed if r["step"] in killed}
    assert len(replayed) >= 2 and sorted(replayed) == sorted(killed), sorted(killed)
    for step, again in replayed.items():
        for key in ("reward_mean", "accuracy", "response_length"):
            assert again[key] == killed[step][key], (step, key)
        for key in ("loss", "pg_loss", "kl", "grad_norm"):
            assert again[key] == pytest.approx(killed[step][key], rel=1e-6), (step, key)


@pytest.mark.slow
def test_stage_records_cost_and_is_skipped_when_done(killed_run):
    run_dir, record, cfg = killed_run
    assert record["wall_seconds"] > 0 and record["worker_seconds"] > record["wall_seconds"] / 2
    assert record["samples_seen"] == STEPS * 4 * 8
    started = time.time()
    assert grpo(cfg) == record and time.time() - started < 5


@pytest.mark.slow
def test_synced_engine_computes_with_the_sent_weights(killed_run, answerer):
    """Send weights to an engine started on the base student, as rank 0 does after every update:
    the learner's final weights (its HF export) through the object store, then the base ones
    back through a gloo process group. After each sync the engine's tensors are the ones sent
    and its greedy tokens are those of transformers' `generate` on them."""
    import ray
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from w2sr.engines.rollout import rollout_actor
    from w2sr.engines.weight_sync import CollectiveSender, ObjectStoreSender

    run_dir, _, cfg = killed_run
    exported = rl_dir(run_dir) / "model"
    learned = load_file(exported / "model.safetensors")
    base = load_file(Path(answerer) / "model.safetensors")
    assert not torch.equal(learned["model.norm.weight"], base["model.norm.weight"])
    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template(
                TEMPLATES["paper"].messages(p), tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )["input_ids"]
        for p in PROBLEMS[:4]
    ]
    names = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
    ]

    def engine_weights(rollout_engine, names: list[str]) -> dict:
        """Copies of the engine's parameters by vLLM name (unfused ones match HF names).
        Local, so that Ray ships it by value to the actor."""

        def read(worker, names):
            params = dict(worker.model_runner.get_model().named_parameters())
            return {name: params[name].detach().to("cpu", copy=True) for name in names}

        return rollout_engine.llm.collective_rpc(read, args=(names,))[0]

    def reload_warnings(rollout_engine, start: bool) -> list[str]:
        """What vLLM's reload logs at WARNING in the engine's process, from `start` on."""
        import logging

        from w2sr.engines.weight_sync import RELOAD_LOG

        log = logging.getLogger(RELOAD_LOG)
        found = [h for h in log.handlers if hasattr(h, "seen")]
        if start:
            kept = logging.Handler(logging.WARNING)
            kept.seen = []  # type: ignore[attr-defined]
            kept.emit = lambda record: kept.seen.append(record.getMessage())  # type: ignore
            log.addHandler(kept)
            return []
        return found[0].seen

    actor = rollout_actor(answerer, cfg.grpo.engine, use_gpu=False, trust_remote_code=False, seed=0)
    ray.get(actor.__ray_call__.remote(reload_warnings, True))
    try:
        for transport, weights, folder in (
            ("object_store", learned, exported),
            ("collective", base, Path(answerer)),
        ):
            named = [(name, tensor) for name, tensor in weights.items() if name != "lm_head.weight"]
            if transport == "collective":
                specs = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named]
                sender = CollectiveSender.open([actor], "gloo").start(specs)
            else:
                sender = ObjectStoreSender([actor])
            for name, tensor in named:
                sender.send(name, tensor)
            assert sender.finish() == [len(named)], transport
            engine = ray.get(actor.__ray_call__.remote(engine_weights, names))
            for name in names:
                rows = weights[name].shape[0]  # vLLM pads the vocabulary
                assert torch.equal(engine[name][:rows], weights[name]), (transport, name)
            outputs = ray.get(
                actor.generate.remote(prompts, {"temperature": 0.0, "max_tokens": 12}, 1, [0] * 4)
            )
            model = AutoModelForCausalLM.from_pretrained(folder)
            for ids, out in zip(prompts, outputs, strict=True):
                with one_thread():
                    expected = model.generate(
                        torch.tensor([ids]), max_new_tokens=12, do_sample=False
                    )
                assert out[0]["token_ids"] == expected[0, len(ids) :].tolist(), transport
        # The tied head and the rotary tables get no weight by design: no warning says they failed
        assert ray.get(actor.__ray_call__.remote(reload_warnings, False)) == []
    finally:
        ray.kill(actor)


@pytest.mark.slow
def test_separate_engines_train_and_count_as_workers(ray_session, answerer, tmp_path, s3_bucket):
    """An engine with a CPU of its own beside a one-worker learner, weights through the object
    store, the run dir on the loopback S3 server: the run trains, keeps its checkpoints and
    exports there, and the engine's time counts in the worker-seconds."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": p, "answer": "7"}) + "\n" for p in PROBLEMS))
    run_dir = f"{s3_bucket}/grpo-{uuid.uuid4().hex[:8]}"
    cfg = config(
        run_dir,
        answerer,
        prompts,
        steps=2,
        num_workers=1,
        placement="separate",
        weight_sync="object_store",
        kl_coef=0.0,
        max_failures=0,
    )
    record = grpo(cfg)
    run, folder = RunDir(run_dir), Lineage(cfg).rl.folder
    records = [json.loads(line) for line in run.read_text(folder, "metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert run.size(folder, layout.MODEL, "model.safetensors") > 0
    assert run.list(folder, layout.CHECKPOINTS)  # Ray Train's storage, on the store
    models, _ = model_table(cfg)
    assert models["rl"].spec == run.location(folder, layout.MODEL)
    # one learner worker + one engine: each second between the steps is billed twice
    first, last = records
    billed = (last["worker_seconds"] - first["worker_seconds"]) / (last["time"] - first["time"])
    assert billed == pytest.approx(2.0)
    # the stage record keeps two decimals
    assert last["worker_seconds"] - 0.01 <= record["worker_seconds"] <= 2 * record["wall_seconds"]
