"""GRPO step time of `w2sr grpo` against TRL's `GRPOTrainer`, in one run.

Same machine, same random model (Qwen2 shapes with SmolLM2's 49K-token vocabulary, `--vocab`),
same prompts, group size, completion length, KL coefficient
and token-level loss (TRL's `dapo` loss type), each trainer in its own process:
  - w2sr: a vLLM rollout engine (a Ray actor) + a Ray Train / DeepSpeed ZeRO-`--zero` learner of
    `--workers` workers sharing the cores (the colocated engine uses its worker's cores), weights
    synced to the engine after every step, once through each transport (`grpo.weight_sync`: the
    Ray object store, then a gloo process-group broadcast);
  - TRL: one process using every core, generating with transformers (its default; its vLLM modes
    need a GPU).
Both at one precision (`--precision`, bf16 by default) and without gradient checkpointing (TRL's
`GRPOConfig` turns it on unless told; w2sr's GRPO leaves it off by default).

A step is rollout + update (+ weight sync for w2sr). Both sides are timed the same way: the wall
clock between the ends of the steps after `--warmup`, divided by their number, so start-up (Ray,
vLLM, DeepSpeed, model loading) is left out and reported apart as wall-clock. w2sr's phase timers
(rollout, learner, sync) say where its step goes. A random model seldom emits its end token, so
both sides generate about `--max-tokens` tokens per sample; the mean completion lengths are
printed to show it. The rounds follow benchmarks/protocol.py.

    python benchmarks/bench_grpo.py [--prompts 8] [--group 8] [--max-tokens 128] [--steps 6]
        [--repeats 3]
    python benchmarks/bench_grpo.py --profile-step 4   # where a w2sr step's time goes

The ratio is taken against w2sr's CPU default transport (object store).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from protocol import Spread, bench_model, describe, measure, ratio  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def problems(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"problem": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


# --- the trainers, each run in a child process ----------------------------------------------


def between(ends: list[float]) -> float:
    """The mean wall-clock per step from a list of step end times (the first one opens)."""
    return (ends[-1] - ends[0]) / (len(ends) - 1)


W2SR = ("w2sr-object_store", "w2sr-collective")


def run_w2sr(work: Path, model: str, args, weight_sync: str) -> dict:
    from w2sr import layout
    from w2sr.config import validate
    from w2sr.lineage import Lineage
    from w2sr.stages.grpo import grpo

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in problems(args.prompts * 4)))
    g = {
        "steps": args.warmup + args.steps,
        "prompts_per_step": args.prompts,
        "group_size": args.group,
        "micro_batch_size": args.prompts * args.group // args.workers,
        "num_workers": args.workers,
        "cpus_per_worker": max(1, (os.cpu_count() or 1) // args.workers),
        "zero_stage": args.zero,
        "lr": 1e-6,
        "kl_coef": args.kl,
        "entropy_coef": 0.0,
        "sampling": {"max_tokens": args.max_tokens, "temperature": 1.0},
        "engine": {"max_model_len": 1024},
        "checkpoint_every": 10_000,
        "weight_sync": weight_sync,
        "bf16": args.precision == "bf16",
        "profile_step": args.profile_step,
    }
    cfg = validate(
        {
            "run_dir": str(work / "w2sr"),
            "teacher": model,
            "student": model,
            "prompts": {"source": {"type": "file", "path": str(data)}},
            "grpo": g,
        }
    )
    started = time.time()
    grpo(cfg)
    wall = time.time() - started
    lines = (work / "w2sr" / Lineage(cfg).rl.folder / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines][args.warmup :]

    def mean(key: str) -> float:
        return sum(r[key] for r in records) / len(records)

    ends = [r["time"] for r in records]
    result: dict[str, Any] = {
        "step_seconds": between(ends),
        "rollout_seconds": mean("rollout_seconds"),
        "learner_seconds": mean("learner_seconds"),
        "sync_seconds": mean("sync_seconds"),
        "completion_tokens": mean("response_length"),
        "wall_seconds": wall,
    }
    if args.profile_step:
        stage = work / "w2sr" / Lineage(cfg).rl.folder
        result["profile"] = (stage / layout.step_profile(args.profile_step)).read_text()
        step = json.loads(lines[args.profile_step - 1])
        result["phases"] = {k: step[f"{k}_seconds"] for k in ("rollout", "learner", "sync")}
    return result


def run_trl(work: Path, model: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from w2sr.data.templates import TEMPLATES
    from w2sr.grading import is_correct

    torch.set_num_threads(os.cpu_count() or 1)
    rows = problems(args.prompts * 4)
    dataset = Dataset.from_list(
        [{"prompt": TEMPLATES["paper"].messages(r["problem"]), "answer": r["answer"]} for r in rows]
    )
    lengths: list[float] = []

    def reward(prompts, completions, answer, completion_ids=None, **_):
        if completion_ids is not None:
            lengths.append(sum(len(c) for c in completion_ids) / len(completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(is_correct(t, a)) for t, a in zip(texts, answer, strict=True)]

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.time())

    config = GRPOConfig(
        output_dir=str(work / "trl"),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        beta=args.kl,
        loss_type="dapo",
        learning_rate=1e-6,
        bf16=args.precision == "bf16",
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
    )
    started = time.time()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(
            model, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32
        ),
        processing_class=AutoTokenizer.from_pretrained(model, padding_side="left"),
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        callbacks=[Clock()],
    )
    trainer.train()
    wall = time.time() - started
    return {
        "step_seconds": between(ends[args.warmup - 1 :]),
        "completion_tokens": sum(lengths[args.warmup :]) / max(1, len(lengths[args.warmup :])),
        "wall_seconds": wall,
    }


# --- the driver ------------------------------------------------------------------------------


def child(role: str, work: Path, model: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--role", role, "--work", str(work), "--model", model],
        capture_output=True,
        text=True,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    sys.stderr.write(out.stderr[-4000:])
    raise RuntimeError(f"{role} run failed (exit {out.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="w2sr learner workers")
    parser.add_argument("--zero", type=int, default=2, choices=[2, 3])
    parser.add_argument("--kl", type=float, default=1e-4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="both")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after a warm-up")
    parser.add_argument(
        "--profile-step",
        type=int,
        help="instead of the rounds, one w2sr run with this step under torch's profiler",
    )
    parser.add_argument("--role", choices=[*W2SR, "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role:
        if args.role == "trl":
            result = run_trl(Path(args.work), args.model, args)
        else:
            result = run_w2sr(Path(args.work), args.model, args, args.role.removeprefix("w2sr-"))
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        work = Path(tmp)
        model = bench_model(work / "model", args.hidden, args.layers, args.vocab)
        argv = sys.argv[1:]
        if args.profile_step:
            result = child(W2SR[0], work, model, argv)
            by_phase = ", ".join(f"{k} {v:.2f} s" for k, v in result["phases"].items())
            print(f"step {args.profile_step} by phase: {by_phase}\n{result['profile']}")
            return
        rounds: dict[str, list[dict]] = {role: [] for role in (*W2SR, "trl")}

        def side(role: str):
            def run() -> float:
                scratch = work / f"{role}-{len(rounds[role])}"
                scratch.mkdir()
                result = child(role, scratch, model, argv)
                rounds[role].append(result)
                print(role, json.dumps({k: round(v, 3) for k, v in result.items()}), flush=True)
                return result["step_seconds"]

            return run

        steps = measure({role: side(role) for role in rounds}, repeats=args.repeats)
    measured = {role: results[1:] for role, results in rounds.items()}  # past the warm-up

    def spread(role: str, key: str) -> Spread:
        return Spread.of([r[key] for r in measured[role]])

    print(
        f"\n{args.prompts} prompts x {args.group} samples, up to {args.max_tokens} tokens, "
        f"model {args.layers}x{args.hidden}, {args.vocab} vocabulary, {args.precision}, "
        f"{os.cpu_count()} cores"
    )
    print(describe(args.repeats, 1) + "; each side a whole command, the same step clock")
    for role in rounds:
        print(
            f"{role:18s} step {spread(role, 'step_seconds'):.2f} s   completion tokens "
            f"{spread(role, 'completion_tokens'):.0f}   start-up and all steps "
            f"{spread(role, 'wall_seconds'):.0f} s"
        )
    phases = {
        k: spread("w2sr-object_store", f"{k}_seconds") for k in ("rollout", "learner", "sync")
    }
    print("w2sr step, by phase: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
    print(
        f"w2sr / TRL step time: {ratio(steps['w2sr-object_store'], steps['trl']):.2f}x "
        "(goal <= 0.7x)"
    )
    sync = ratio(
        [r["sync_seconds"] for r in measured["w2sr-collective"]],
        [r["sync_seconds"] for r in measured["w2sr-object_store"]],
    )
    print(
        f"weight sync per step: object store {spread('w2sr-object_store', 'sync_seconds'):.3f} s, "
        f"collective (gloo) {spread('w2sr-collective', 'sync_seconds'):.3f} s, "
        f"collective / object store {sync:.2f}x"
    )


if __name__ == "__main__":
    main()
