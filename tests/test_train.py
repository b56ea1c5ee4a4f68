"""SFT of the student: data rendering and masking, packing, and real Ray Train + DeepSpeed runs.

Two trainings on the same synthetic traces serve most integration tests: a padded ZeRO-2 run and a
packed ZeRO-3 run that gets one of its workers SIGKILLed midway and resumes from its checkpoint.
A shorter packed run is trained twice more: once whole, once with its driver SIGKILLed midway and
the config run again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from w2sr import layout
from w2sr.config import ConfigError, validate
from w2sr.data.templates import TEMPLATES
from w2sr.grading import extract_answer
from w2sr.learner.attention import attention as attention_for
from w2sr.learner.batches import (
    IGNORE,
    build_sft_set,
    epoch_permutation,
    micro_batch_plan,
    sft_rows,
    sft_target,
    step_samples,
    total_steps,
)
from w2sr.learner.engine import deepspeed_config, param_groups, token_loss
from w2sr.lineage import Lineage
from w2sr.rundir import RunDir
from w2sr.schemas import TRACE_SCHEMA
from w2sr.stages.train import train

STEPS = 24
GLOBAL_BATCH = 8


KILLED = {"zero_stage": 3, "packing": True, "checkpoint_every": 4, "max_failures": 1}


def packed_batch(data, indices):
    return sft_rows(data, indices, packed=True, pad_id=0)


def padded_batch(data, indices, pad_id):
    return sft_rows(data, indices, packed=False, pad_id=pad_id)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trace_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """Arithmetic traces of varied length (1-6 reasoning lines): learnable and worth packing."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        lines = " ".join(
            f"First, compute {a} + {b}. Then, we check {j}." for j in range(rng.randint(1, 6))
        )
        trace = f"{lines} Therefore the result is \\boxed{{{a + b}}}."
        rows.append(
            {
                "prompt_id": f"p{i}",
                "problem": f"What is {a} + {b}?",
                "answer": str(a + b),
                "teacher": "tiny",
                "sample_index": 0,
                "seed": i,
                "prompt": "",
                "trace": trace,
                "extracted_answer": str(a + b),
                "correct": True,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "finish_reason": "stop",
            }
        )
    return rows


def write_sft_set(cfg, rows: list[dict], variant: str = "all") -> None:
    """A training set where the config's lineage looks for it, as `w2sr select` leaves it."""
    run, sets = RunDir(cfg.run_dir), Lineage(cfg).sft
    table = pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)
    run.write_parquet(table, sets.folder, layout.sft_set(variant))
    run.mark_done(sets.folder, sets.fingerprint)


def stage_dir(run_dir: Path, variant: str = "all") -> Path:
    """The one student folder of a run that trained one config."""
    (folder,) = (run_dir / "students" / variant).iterdir()
    return folder


def config(run_dir: Path, student: str | None, **train):
    return validate(
        {
            "run_dir": str(run_dir),
            "teacher": student or "unused",
            "student": student,
            "train": {
                "num_workers": 2,
                "global_batch_size": GLOBAL_BATCH,
                "micro_batch_size": 2,
                "lr": 1e-3,
                "max_steps": STEPS,
                **train,
            },
        }
    )


def tokenizer_of(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def metrics(run_dir: Path, variant: str = "all") -> list[dict]:
    path = stage_dir(run_dir, variant) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_per_step(records: list[dict]) -> dict[int, dict]:
    """The record that stands for each step: a resumed attempt's replaces the killed one's."""
    return {r["step"]: r for r in records}


# --- data ------------------------------------------------------------------------------------


def test_prompt_tokens_carry_no_loss(tiny_student):
    """Labels are -100 on exactly the prompt, which is the generation prompt token for token."""
    tokenizer = tokenizer_of(tiny_student)
    rows = trace_rows(4)
    data = build_sft_set(tokenizer, TEMPLATES["paper"], pa.Table.from_pylist(rows), cutoff_len=4096)
    assert len(data) == 4 and data.truncated == 0 and data.dropped == 0
    for i, row in enumerate(rows):
        ids, labels, p = data.ids(i), data.labels(i), int(data.prompt_lens[i])
        prompt = tokenizer.apply_chat_template(
            TEMPLATES["paper"].messages(row["problem"]), tokenize=False, add_generation_prompt=True
        )
        assert ids[:p].tolist() == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert (labels[:p] == IGNORE).all()
        assert (labels[p:] == ids[p:]).all()
        assert tokenizer.decode(ids[p:]) == row["trace"] + "<|im_end|>"
        targets = data.targets(i)  # shifted: position t predicts token t + 1
        assert (targets[: p - 1] == IGNORE).all() and targets[-1] == IGNORE
        assert (targets[p - 1 : -1] == ids[p:]).all()


def test_truncation_is_counted_and_unfinished_traces_do_not_end(tiny_student):
    tokenizer = tokenizer_of(tiny_student)
    rows = trace_rows(3)
    rows[1]["trace"] = "First, compute the sum. " * 200
    rows[2]["finish_reason"] = "length"
    data = build_sft_set(tokenizer, TEMPLATES["paper"], pa.Table.from_pylist(rows), cutoff_len=256)
    assert data.truncated == 1 and data.dropped == 0
    assert data.lengths.tolist()[1] == 256
    assert tokenizer.decode(data.ids(0)).endswith("<|im_end|>")
    assert not tokenizer.decode(data.ids(2)).endswith("<|im_end|>")

    tight = build_sft_set(tokenizer, TEMPLATES["paper"], pa.Table.from_pylist(rows), cutoff_len=20)
    assert len(tight) == 0 and tight.dropped == 3  # the prompt alone fills the cutoff


def test_a_set_read_batch_by_batch_is_tokenized_as_the_whole_table(tiny_student, tmp_path):
    """The stage reads a training set from its file a few rows at a time: the samples, their
    order and every count are the whole table's."""
    tokenizer = tokenizer_of(tiny_student)
    rows = trace_rows(10)
    rows[3]["trace"] = "First, compute the sum. " * 200  # truncated
    rows[5]["finish_reason"] = "length"
    table = pa.Table.from_pylist(rows)
    run = RunDir(str(tmp_path / "run"))
    run.write_parquet(table, "set.parquet")
    whole = build_sft_set(tokenizer, TEMPLATES["paper"], table, cutoff_len=256)
    read = run.iter_parquet(
        "set.parquet", columns=["problem", "trace", "finish_reason"], batch_size=3
    )
    batched = build_sft_set(tokenizer, TEMPLATES["paper"], read, cutoff_len=256)
    assert (batched.traces, batched.truncated) == (whole.traces, whole.truncated) == (10, 1)
    for name in ("tokens", "offsets", "prompt_lens"):
        assert np.array_equal(getattr(batched, name), getattr(whole, name)), name


THOUGHT = "<think>\nFirst, compute 1 + 2. Wait, verify.</think>\n\nThe answer is \\boxed{3}."
ANSWER = "\n\nThe answer is \\boxed{3}."


@pytest.mark.parametrize(
    ("trace", "reasoning", "prefill", "target"),
    [
        (THOUGHT, "keep", "", THOUGHT),  # a student that opens its thought itself
        (THOUGHT, "strip", "", ANSWER),
        (THOUGHT, "keep", "<think>\n", THOUGHT.removeprefix("<think>\n")),  # not learned twice
        ("<think>3</think>\\boxed{3}", "keep", "<think>\n", "3</think>\\boxed{3}"),
        ("3</think>\\boxed{3}", "keep", "<think>\n", "3</think>\\boxed{3}"),  # opened unseen
        (THOUGHT, "strip", "<think>\n", "</think>" + ANSWER),  # the prefilled thought closed
        ("\\boxed{3}", "keep", "<think>\n", "</think>\\boxed{3}"),  # a teacher that does not think
        ("\\boxed{3}", "strip", "", "\\boxed{3}"),
        ("<think>\nFirst, compute", "keep", "", "<think>\nFirst, compute"),
        ("<think>\nFirst, compute", "keep", "<think>\n", "First, compute"),
        ("<think>\nFirst, compute", "strip", "", None),  # a thought never closed: no answer
        ("<think>\nFirst, compute", "strip", "<think>\n", None),
        ("<think>\n3</think>\n", "strip", "", None),  # nothing after the thought
    ],
)
def test_sft_targets_keep_or_strip_the_thought_and_read_the_teachers_answer(
    trace, reasoning, prefill, target
):
    assert sft_target(trace, reasoning, prefill) == target
    if target is not None:  # the student's response, read behind its prefill as evaluation does
        assert extract_answer(prefill + target) == extract_answer(trace)


@pytest.fixture(scope="module")
def tiny_thinking(tmp_path_factory) -> str:
    """A tiny reasoning model: its chat template prefills `<think>` unless thinking is off."""
    from w2sr.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "thinking", thinking=True))


def thinking_traces() -> pa.Table:
    rows = trace_rows(2)
    rows[0] |= {"problem": "What is 1 + 2?", "trace": THOUGHT}
    rows[1] |= {"trace": "<think>\nFirst, compute the sum. Then", "finish_reason": "length"}
    return pa.Table.from_pylist(rows)


def test_sft_samples_of_a_thinking_student_under_keep_and_strip(tiny_thinking):
    """The prompt is the student's own, rendered with `thinking`; what follows it is the target
    `train.reasoning` asks for, behind the `<think>` the prompt holds already."""
    tokenizer = tokenizer_of(tiny_thinking)

    def samples(reasoning: str, thinking: bool | None) -> list[tuple[str, str]]:
        data = build_sft_set(
            tokenizer,
            TEMPLATES["paper"],
            thinking_traces(),
            4096,
            thinking=thinking,
            reasoning=reasoning,
        )
        assert data.truncated == data.dropped == 0
        assert data.unanswered == (1 if reasoning == "strip" else 0)
        return [
            (tokenizer.decode(data.ids(i)[:p]), tokenizer.decode(data.ids(i)[p:]))
            for i, p in enumerate(data.prompt_lens.tolist())
        ]

    kept = samples("keep", None)
    assert [prompt.endswith("<|im_start|>assistant\n<think>\n") for prompt, _ in kept] == [True] * 2
    assert [target for _, target in kept] == [
        THOUGHT.removeprefix("<think>\n") + "<|im_end|>",
        "First, compute the sum. Then",  # unfinished: no end of turn
    ]
    [(prompt, target)] = samples("strip", None)  # the unclosed thought is left out
    assert prompt == kept[0][0] and target == "</think>" + ANSWER + "<|im_end|>"

    off = samples("keep", False)
    assert [prompt.endswith("<|im_start|>assistant\n") for prompt, _ in off] == [True] * 2
    assert off[0][1] == THOUGHT + "<|im_end|>"
    [(_, target)] = samples("strip", False)
    assert target == ANSWER + "<|im_end|>"


def test_data_order_is_deterministic_under_the_seed():
    """A step's samples depend only on (seed, data position): epochs are fresh permutations."""
    n, batch = 10, 4
    stream = np.concatenate([step_samples(n, batch, seed=3, position=p) for p in range(0, 20, 4)])
    assert (
        stream.tolist()
        == np.concatenate([epoch_permutation(10, 3, 0), epoch_permutation(10, 3, 1)]).tolist()
    )
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert stream[:10].tolist() != stream[10:].tolist()
    assert step_samples(n, batch, 3, 8).tolist() == stream[8:12].tolist()  # straddles an epoch
    assert step_samples(n, batch, 4, 0).tolist() != stream[:4].tolist()
    assert total_steps(10, 4, epochs=3, max_steps=None) == 7
    assert total_steps(10, 4, epochs=3, max_steps=20) == 20
    with pytest.raises(ValueError, match="do not fill one global batch"):
        total_steps(3, 4, epochs=1, max_steps=None)


def test_layout_deals_every_sample_once_with_balanced_ranks():
    lengths = np.array([5, 50, 7, 40, 9, 30, 11, 20, 13, 10, 15, 60])
    indices = np.arange(12)
    plan = micro_batch_plan(indices, lengths, world=2, micro=3)
    assert [len(rank) for rank in plan] == [2, 2] and all(len(m) == 3 for r in plan for m in r)
    assert sorted(i for rank in plan for micro in rank for i in micro) == list(range(12))
    loads = [sum(lengths[i] for micro in rank for i in micro) for rank in plan]
    assert abs(loads[0] - loads[1]) <= lengths.max() - lengths.min()


def load_model(path: str, attention: str, **overrides):
    """fp32, with transformers' `sdpa` or `eager`, or w2sr's `sample_sdpa` (what training uses)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **overrides)
    name = attention_for("sdpa", config) if attention == "sample_sdpa" else attention
    assert name != "sdpa" or attention == "sdpa"
    return AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, attn_implementation=name
    )


def forward(model, batch: dict) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def logits_alone(model, data, indices) -> list[torch.Tensor]:
    return [
        forward(model, {"input_ids": torch.from_numpy(data.ids(i).astype(np.int64))[None]})[0]
        for i in indices
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "sample_sdpa"])
def test_packed_rows_do_not_attend_across_samples(tiny_student, attention):
    """A packed row is read from its position ids: each sample gets the logits it gets alone
    (transformers' masks for sdpa and eager; sample by sample for sample_sdpa)."""
    data = build_sft_set(
        tokenizer_of(tiny_student), TEMPLATES["paper"], pa.Table.from_pylist(trace_rows(3)), 4096
    )
    model = load_model(tiny_student, attention).eval()
    batch = packed_batch(data, [0, 1, 2])
    assert batch["position_ids"][0, int(data.lengths[0])] == 0  # positions restart
    alone = logits_alone(model, data, range(3))
    torch.testing.assert_close(forward(model, batch)[0], torch.cat(alone), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here"
)
def test_flash_attention_without_flash_attn_says_what_to_install(tiny_student):
    from transformers import AutoConfig

    with pytest.raises(ImportError, match=r"attn_implementation: .*pip install flash-attn"):
        attention_for("flash_attention_2", AutoConfig.from_pretrained(tiny_student))


def test_sample_sdpa_keeps_sliding_windows_and_padding(tiny_student):
    """With a window shorter than the samples, on packed rows and on padded batches, sample_sdpa
    gives transformers' sdpa logits."""
    layers = ["full_attention", "sliding_attention", "sliding_attention"]
    window = {"use_sliding_window": True, "sliding_window": 8, "layer_types": layers}
    data = build_sft_set(
        tokenizer_of(tiny_student), TEMPLATES["paper"], pa.Table.from_pylist(trace_rows(3)), 4096
    )
    reference = load_model(tiny_student, "sdpa", **window).eval()
    model = load_model(tiny_student, "sample_sdpa", **window).eval()
    alone = logits_alone(reference, data, range(3))
    unwindowed = logits_alone(load_model(tiny_student, "sdpa").eval(), data, range(3))
    assert not torch.allclose(torch.cat(alone), torch.cat(unwindowed))  # the window matters
    packed = forward(model, packed_batch(data, [0, 1, 2]))[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-4, rtol=1e-4)
    padded = forward(model, padded_batch(data, [0, 1, 2], pad_id=0))
    for row, logits in enumerate(alone):
        torch.testing.assert_close(padded[row, : len(logits)], logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "sample_sdpa"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tiny_student, attention):
    data = build_sft_set(
        tokenizer_of(tiny_student), TEMPLATES["paper"], pa.Table.from_pylist(trace_rows(6)), 4096
    )
    assert len(set(data.lengths.tolist())) > 1  # padding does happen
    model = load_model(tiny_student, attention)
    results = []
    for batch in (packed_batch(data, list(range(6))), padded_batch(data, list(range(6)), 0)):
        model.zero_grad()
        loss, count = token_loss(model, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((loss.detach(), count, grads))
    (packed_loss, packed_n, packed_grads), (padded_loss, padded_n, padded_grads) = results
    assert packed_n == padded_n == int(data.target_counts.sum())
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(packed_grads, padded_grads, atol=1e-5, rtol=1e-4)


def test_the_chunked_head_loss_equals_cross_entropy_over_full_logits(tiny_student):
    """The head at target positions only, a few rows at a time, gives F.cross_entropy's sum and
    gradients, on packed and padded rows, for both model families the paper's studies use."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from w2sr.learner import lm_head

    data = build_sft_set(
        tokenizer_of(tiny_student), TEMPLATES["paper"], pa.Table.from_pylist(trace_rows(6)), 4096
    )
    qwen = load_model(tiny_student, "sdpa")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=qwen.config.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    )
    for model in (qwen, llama):
        assert lm_head.heads_at_positions(model)
        for batch in (packed_batch(data, list(range(6))), padded_batch(data, list(range(6)), 0)):
            results = []
            for fused in (True, False):
                model.zero_grad()
                if fused:
                    loss, count = token_loss(model, batch)
                else:
                    inputs = {k: v for k, v in batch.items() if k != "targets"}
                    logits = model(**inputs, use_cache=False).logits
                    flat = batch["targets"].flatten()
                    loss = torch.nn.functional.cross_entropy(
                        logits.flatten(0, 1).float(), flat, ignore_index=-100, reduction="sum"
                    )
                    count = int((flat != -100).sum())
                loss.backward()
                grads = torch.cat([p.grad.flatten() for p in model.parameters()])
                results.append((loss.detach(), count, grads))
            (fused_loss, fused_n, fused_grads), (plain_loss, plain_n, plain_grads) = results
            assert fused_n == plain_n == int(data.target_counts.sum())
            torch.testing.assert_close(fused_loss, plain_loss, atol=1e-3, rtol=1e-5)
            torch.testing.assert_close(fused_grads, plain_grads, atol=1e-5, rtol=1e-4)
    # in chunks of 7 rows, a ragged last one, the same sum and gradients as in one chunk
    hidden = torch.randn(40, 64, requires_grad=True)
    weight = torch.randn(qwen.config.vocab_size, 64, requires_grad=True)
    targets = torch.randint(0, qwen.config.vocab_size, (40,))
    sums = []
    for chunk in (7, 4096):
        hidden.grad = weight.grad = None
        loss = lm_head.linear_cross_entropy(hidden, weight, targets, chunk)
        (2 * loss).backward()
        sums.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
    for chunked, whole in zip(*sums, strict=True):
        torch.testing.assert_close(chunked, whole)


def test_weight_decay_spares_vectors_even_when_partitioned():
    """ZeRO-3 leaves a parameter empty and keeps its shape in `ds_shape`."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[0].weight.data = torch.empty(0)
    model[0].weight.ds_shape = torch.Size([4, 4])
    decay, rest = param_groups(model, 0.1)
    assert decay == {"params": [model[0].weight], "weight_decay": 0.1}
    assert rest["weight_decay"] == 0.0
    assert {id(p) for p in rest["params"]} == {id(model[0].bias), *map(id, model[1].parameters())}


@pytest.mark.parametrize("use_gpu", [False, True])
def test_the_optimizer_is_one_no_op_must_be_compiled_for(tmp_path, use_gpu):
    """Without offload, torch's AdamW: DeepSpeed's fused Adam would be compiled on a GPU node's
    first training (minutes with nvcc, a failure without it). Offloaded, DeepSpeed's CPU Adam."""
    for offload in (False, True):
        cfg = config(tmp_path, "unused", offload_optimizer=offload)
        params = deepspeed_config(cfg.train, use_gpu)["optimizer"]["params"]
        assert params["torch_adam"] is not offload


def test_config_errors_come_before_any_ray_work(tmp_path):
    with pytest.raises(ConfigError, match=r"global_batch_size \(10\) is not a multiple"):
        config(tmp_path, "s", global_batch_size=10, micro_batch_size=2, num_workers=2)
    with pytest.raises(ConfigError, match="student: not set"):
        train(config(tmp_path, None))
    with pytest.raises(RuntimeError, match="run `w2sr select` first"):
        train(config(tmp_path, "s"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_fails_before_ray_work(tmp_path):
    cfg = config(tmp_path, "s", wandb_project="w2sr")
    write_sft_set(cfg, trace_rows(8))
    with pytest.raises(RuntimeError, match="train.wandb_project is set but wandb"):
        train(cfg)


def test_run_dir_locations_are_what_other_processes_open(tmp_path):
    """Workers and vLLM get a local path for a local run dir (`file://` too), a URI otherwise."""
    model = str(tmp_path / "students" / "all" / "model")
    assert RunDir(str(tmp_path)).location("students", "all", "model") == model
    assert RunDir(f"file://{tmp_path}").location("students", "all", "model") == model
    assert RunDir("mock:///bucket/run/").location("rl", "model") == "mock:///bucket/run/rl/model"


# --- training --------------------------------------------------------------------------------


def test_the_sessions_workers_ask_its_own_state_api(ray_session):
    """Ray Train's placement-group cleaner asks the state API, from a worker, whether a
    training's controller lives. The session's own server must answer: a cluster that Ray's temp
    folder still names may be gone, and every training's end would then wait for it."""
    from ray.util.state import get_actor

    @ray_session.remote(num_cpus=0)
    class Alive:
        def ping(self) -> bool:
            return True

    @ray_session.remote(num_cpus=0)
    def state_of(actor_id: str) -> str:
        return get_actor(actor_id, timeout=10).state

    actor = Alive.remote()
    assert ray_session.get(actor.ping.remote())
    assert ray_session.get(state_of.remote(actor._actor_id.hex())) == "ALIVE"


@pytest.fixture(scope="module")
def padded_run(ray_session, tiny_student, tmp_path_factory) -> tuple[Path, dict]:
    """ZeRO-2 with the optimizer offloaded to the CPU, padded micro-batches, gradient
    checkpointing, bf16; step 3 profiled."""
    run_dir = tmp_path_factory.mktemp("padded")
    padded = {"packing": False, "gradient_checkpointing": True, "offload_optimizer": True}
    padded["profile_step"] = 3
    padded["mlflow_tracking_uri"] = f"file://{run_dir}-mlruns"
    cfg = config(run_dir, tiny_student, zero_stage=2, **padded)
    write_sft_set(cfg, trace_rows())
    record = train(cfg)
    return run_dir, record


def _past_a_checkpoint(stage: Path, steps: int) -> tuple[int, int] | None:
    """(the checkpoint's step, the last logged step) once Ray Train has registered a checkpoint
    (a reported one counts only from then on) and a later step, not the last, is logged."""
    try:
        snapshot = next(stage.glob("ray/*/checkpoint_manager_snapshot.json")).read_text()
        registered = json.loads(snapshot)["checkpoint_results"][-1]["metrics"]["step"]
        lines = (stage / "metrics.jsonl").read_text().splitlines()
        logged = [json.loads(line)["step"] for line in lines]
    except (StopIteration, ValueError, IndexError, FileNotFoundError):  # not there yet
        return None
    # Not once the last step is logged: its checkpoint may be registered before the restart,
    # which would then have nothing left to train.
    if logged and registered < logged[-1] < steps:
        return registered, logged[-1]
    return None


def _kill_a_worker_after_a_checkpoint(stage: Path, killed: list, timeout: float = 600.0) -> None:
    """SIGKILL one Ray Train worker (a process this test started) once past a checkpoint."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.05)
        past = _past_a_checkpoint(stage, STEPS)
        if past:
            spent = json.loads((stage / "_RUN.json").read_text())["worker_seconds"]
            for proc in psutil.Process().children(recursive=True):
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    proc.kill()
                    killed.append(past[0])
                    (stage / "spent-at-kill").write_text(str(spent))
                    return


@pytest.fixture(scope="module")
def killed_run(ray_session, tiny_student, tmp_path_factory) -> tuple[Path, dict, int]:
    """ZeRO-3, packed, bf16; a worker is killed after a checkpoint and Ray Train restarts the
    group. Returns the step of the checkpoint registered at the kill (or a later one)."""
    run_dir = tmp_path_factory.mktemp("killed")
    cfg = config(run_dir, tiny_student, **KILLED)
    write_sft_set(cfg, trace_rows())
    killed: list[int] = []
    watcher = threading.Thread(
        target=_kill_a_worker_after_a_checkpoint,
        args=(run_dir / Lineage(cfg).student("all").folder, killed),
        daemon=True,
    )
    watcher.start()
    record = train(cfg)
    watcher.join(timeout=1)
    assert killed, "the run ended before a worker could be killed"
    return run_dir, record, killed[0]


def test_loss_falls(killed_run, padded_run):
    for run_dir, record in (killed_run[:2], padded_run):
        losses = [r["loss"] for r in last_per_step(metrics(run_dir)).values()]
        assert len(losses) == STEPS == record["steps"]
        assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
        assert record["final_loss"] == losses[-1]


def test_step_metrics_reach_mlflow(padded_run):
    import mlflow

    run_dir, _ = padded_run
    client = mlflow.MlflowClient(f"file://{run_dir}-mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("w2sr").experiment_id])
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == {r["step"]: pytest.approx(r["loss"]) for r in metrics(run_dir)}
    assert run.data.params["zero_stage"] == "2"


def test_a_profiled_step_says_where_its_time_goes(padded_run):
    """`profile_step` leaves rank 0's operator table of that step, and of no other, in the
    stage folder, headed by the step's wall-clock and the share of it spent in operators."""
    run_dir, _ = padded_run
    profiles = sorted(p.name for p in stage_dir(run_dir).glob("profile-step-*"))
    assert profiles == ["profile-step-3.txt"]
    head, table = (stage_dir(run_dir) / profiles[0]).read_text().split("\n", 1)
    wall, in_ops = (float(x) for x in re.findall(r"([\d.]+) s\b", head))
    assert head.startswith("step 3 of students/all/") and 0 < in_ops < wall
    assert "Self CPU" in table and "aten::mm" in table  # the layers' matrix products


def test_the_killed_attempt_is_counted_in_the_cost(killed_run):
    """Worker-seconds cover the killed attempt up to its last step, past its last checkpoint:
    the replayed steps were paid for twice."""
    run_dir, record, _ = killed_run
    spent_at_kill = float((stage_dir(run_dir) / "spent-at-kill").read_text())
    resumed = [r for r in metrics(run_dir) if r["resumed_from"]]
    resumed_seconds = 2 * (resumed[-1]["time"] - resumed[0]["time"])  # two workers
    assert record["worker_seconds"] > spent_at_kill + resumed_seconds


def test_killed_run_resumes_at_its_checkpoint_step(killed_run):
    """The steps replayed after the restart equal the killed attempt's: same weights, optimizer,
    schedule and data position."""
    run_dir, _, registered = killed_run
    records = metrics(run_dir)
    first = [r for r in records if r["resumed_from"] == 0]
    resumed = [r for r in records if r["resumed_from"] > 0]
    start = resumed[0]["resumed_from"]
    assert start % 4 == 0 and registered <= start < first[-1]["step"]
    assert [r["step"] for r in resumed] == list(range(start + 1, STEPS + 1))
    assert [r["step"] for r in first] == list(range(1, first[-1]["step"] + 1))
    replayed = {r["step"]: r for r in first if r["step"] > start}
    assert replayed
    for again in resumed:
        if again["step"] in replayed:
            before = replayed[again["step"]]
            assert again["samples_seen"] == before["samples_seen"] == again["step"] * GLOBAL_BATCH
            assert again["lr"] == pytest.approx(before["lr"], rel=1e-9)
            assert again["loss"] == pytest.approx(before["loss"], rel=1e-5)
            assert again["grad_norm"] == pytest.approx(before["grad_norm"], rel=1e-4)


def test_packed_and_padded_training_agree(killed_run, padded_run):
    """Same data, same steps: packing and ZeRO stage change the layout, not the training."""
    packed = last_per_step(metrics(killed_run[0]))
    padded = last_per_step(metrics(padded_run[0]))
    assert packed[1]["loss"] == pytest.approx(padded[1]["loss"], rel=5e-3)
    for step in range(1, STEPS + 1):
        assert packed[step]["lr"] == pytest.approx(padded[step]["lr"], rel=1e-9)
        assert packed[step]["tokens"] == padded[step]["tokens"]
        assert packed[step]["loss"] == pytest.approx(padded[step]["loss"], rel=3e-2)


def test_first_step_matches_a_single_process_reference(padded_run, tiny_student):
    """Loss and gradient norm of step 1 over 2 ranks x 2 accumulated micro-batches equal one
    process computing them over the whole global batch: the token mean is normalized right."""
    from transformers import AutoModelForCausalLM

    run_dir, _ = padded_run
    tokenizer = tokenizer_of(tiny_student)
    data = build_sft_set(tokenizer, TEMPLATES["paper"], pa.Table.from_pylist(trace_rows()), 4096)
    indices = step_samples(len(data), GLOBAL_BATCH, seed=0, position=0).tolist()
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    loss, count = token_loss(model, padded_batch(data, indices, tokenizer.pad_token_id))
    (loss / count).backward()
    norm = math.sqrt(sum(float((p.grad.float() ** 2).sum()) for p in model.parameters()))
    first = metrics(run_dir)[0]
    assert first["loss"] == pytest.approx(loss.item() / count, rel=1e-2)
    assert first["grad_norm"] == pytest.approx(norm, rel=5e-2)


def test_stage_records_cost_and_is_skipped_when_done(killed_run, tiny_student):
    run_dir, record, _ = killed_run
    assert record["samples"] == 64 and record["truncated"] == 0
    assert record["wall_seconds"] > 0 and record["worker_seconds"] > record["wall_seconds"] / 2
    steps = last_per_step(metrics(run_dir)).values()
    assert record["tokens"] == sum(r["tokens"] for r in steps)
    assert record["tokens_per_second"] == pytest.approx(
        record["tokens"] / sum(r["step_seconds"] for r in steps)
    )
    assert record["model"] == str(stage_dir(run_dir) / "model")
    size = (stage_dir(run_dir) / "metrics.jsonl").stat().st_size
    started = time.time()
    again = train(config(run_dir, tiny_student, **KILLED))
    assert again == record and time.time() - started < 5
    assert (stage_dir(run_dir) / "metrics.jsonl").stat().st_size == size


def test_export_is_a_standard_hugging_face_folder(killed_run, tiny_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir = stage_dir(killed_run[0]) / "model"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template == tokenizer_of(tiny_student).chat_template
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ([eos] if isinstance(eos, int) else eos)
    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_student)
    assert trained.dtype == torch.bfloat16
    data = build_sft_set(tokenizer, TEMPLATES["paper"], pa.Table.from_pylist(trace_rows()), 4096)
    batch = packed_batch(data, list(range(16)))
    with torch.no_grad():
        after, n = token_loss(trained, batch)
        before, _ = token_loss(base, batch)
    assert float(after) / n < 0.75 * float(before) / n


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True,
                  gpu_memory_utilization=0.3, max_model_len=512)
        params = SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=0)
        out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], params)[0]
        prompt_logprobs = [None if d is None else d[t].logprob
                           for d, t in zip(out.prompt_logprobs, out.prompt_token_ids)]
        print("RESULT " + json.dumps({"tokens": list(out.outputs[0].token_ids),
                                      "prompt_logprobs": prompt_logprobs}))
    """
)


@pytest.mark.slow
def test_export_loads_in_vllm_and_generates(killed_run, tmp_path):
    """vLLM serves the folder as it is, and scores the prompt as transformers does."""
    from transformers import AutoModelForCausalLM

    model_dir = stage_dir(killed_run[0]) / "model"
    tokenizer = tokenizer_of(str(model_dir))
    data = build_sft_set(tokenizer, TEMPLATES["paper"], pa.Table.from_pylist(trace_rows(1)), 4096)
    ids = data.ids(0).tolist()
    script = tmp_path / "vllm_generate.py"
    script.write_text(VLLM_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(model_dir), json.dumps(ids)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert len(result["tokens"]) > 0
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]
    np.testing.assert_allclose(result["prompt_logprobs"][1:], expected, atol=0.15)


def test_a_rerun_resumes_from_the_last_checkpoint(killed_run, tiny_student):
    """As after a killed driver: the same config finds its Ray Train run and its checkpoint, has
    no step left to train, and exports the same weights again."""
    run_dir, record, _ = killed_run
    stage = stage_dir(run_dir)
    weights = sha256(stage / "model" / "model.safetensors")
    logged = metrics(run_dir)
    (stage / "_DONE.json").unlink()
    shutil.rmtree(stage / "model")
    again = train(config(run_dir, tiny_student, **KILLED))
    assert metrics(run_dir) == logged  # no step trained again
    assert again["steps"] == STEPS and again["final_loss"] == record["final_loss"]
    assert sha256(stage / "model" / "model.safetensors") == weights


@pytest.mark.slow
def test_a_killed_driver_resumes_from_a_middle_checkpoint(ray_session, tiny_student, tmp_path):
    """SIGKILL of the `w2sr train` driver (and the Ray session it started) past a middle
    checkpoint, with steps left to train: a rerun of the config resumes at that checkpoint and
    trains the rest with the losses of a run that was never interrupted."""
    steps = 12
    trained = {**KILLED, "max_steps": steps}
    reference = config(tmp_path / "uninterrupted", tiny_student, **trained)
    write_sft_set(reference, trace_rows())
    train(reference)
    expected = last_per_step(metrics(tmp_path / "uninterrupted"))

    run_dir = tmp_path / "killed"
    cfg = config(run_dir, tiny_student, **trained)
    write_sft_set(cfg, trace_rows())
    stage = run_dir / Lineage(cfg).student("all").folder
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "w2sr.cli", "train", str(path)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline, past = time.time() + 600, None
        while not past and time.time() < deadline:
            assert proc.poll() is None, "training ended before its driver could be killed"
            time.sleep(0.05)
            past = _past_a_checkpoint(stage, steps)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert past, "no checkpoint was registered in time"
    registered, _ = past
    assert not (stage / "_DONE.json").exists()

    record = train(cfg)
    resumed = [r for r in metrics(run_dir) if r["resumed_from"]]
    start = resumed[0]["resumed_from"]
    assert start % KILLED["checkpoint_every"] == 0 and registered <= start < steps
    assert [r["step"] for r in resumed] == list(range(start + 1, steps + 1))
    for again in resumed:
        before = expected[again["step"]]
        assert again["samples_seen"] == before["samples_seen"]
        assert again["lr"] == pytest.approx(before["lr"], rel=1e-9)
        assert again["loss"] == pytest.approx(before["loss"], rel=1e-5), again["step"]
        assert again["grad_norm"] == pytest.approx(before["grad_norm"], rel=1e-4), again["step"]
    assert record["final_loss"] == pytest.approx(expected[steps]["loss"], rel=1e-5)


def test_a_build_lock_left_by_a_killed_process_does_not_hang_training():
    """torch's extension lock outlives a process killed while it builds DeepSpeed's CPU ops; a
    later training must go past it instead of waiting for ever."""
    code = """
import os, sys
from pathlib import Path
from torch.utils.cpp_extension import _get_build_directory
from deepspeed.accelerator import get_accelerator
from w2sr.learner.engine import load_cpu_ops
builder = get_accelerator().create_op_builder("CPUAdamBuilder")
lock = Path(_get_build_directory(builder.name, verbose=False)) / "lock"
lock.parent.mkdir(parents=True, exist_ok=True)
lock.touch()  # as a process killed mid-build leaves it
load_cpu_ops(offload_optimizer=True)
print("loaded", lock.exists())
"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("loaded False")


def test_a_changed_config_trains_a_second_student_and_leaves_the_first_as_it_was(
    padded_run, tiny_student, tmp_path
):
    """Both configs run for real: the second (fewer steps) writes a folder of its own beside the
    finished student, whose files and done record stay byte for byte, and each config finds its
    own student."""
    from w2sr.registry import model_table

    run_dir = tmp_path / "run"
    shutil.copytree(padded_run[0], run_dir)
    padded = {"packing": False, "gradient_checkpointing": True, "offload_optimizer": True}
    padded |= {"profile_step": 3, "mlflow_tracking_uri": f"file://{padded_run[0]}-mlruns"}
    first = config(run_dir, tiny_student, zero_stage=2, **padded)
    second = config(run_dir, tiny_student, zero_stage=2, **{**padded, "max_steps": 2})
    (old,) = (run_dir / "students" / "all").iterdir()
    assert old.name == Path(Lineage(first).student("all").folder).name  # the fixture's student
    before = {p.relative_to(old): sha256(p) for p in old.rglob("*") if p.is_file()}

    record = train(second)

    assert record["steps"] == 2
    new = run_dir / Lineage(second).student("all").folder
    assert new != old and (new / layout.MODEL / "config.json").exists()
    assert {p.relative_to(old): sha256(p) for p in old.rglob("*") if p.is_file()} == before
    for cfg, folder in ((first, old), (second, new)):
        models, _ = model_table(cfg)
        assert models["w2sr"].spec == str(folder / layout.MODEL)
