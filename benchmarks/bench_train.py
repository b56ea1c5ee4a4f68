"""Training tokens per second of `w2sr train` against TRL's `SFTTrainer`, in one run.

Same machine, same random model (Qwen2 shapes with SmolLM2's 49K-token vocabulary, `--vocab`),
same traces, same cutoff, same global batch (samples per optimizer step), same precision
(`--precision`, fp32 by default: bf16 autocast is slower on CPU), one thread per worker, loss on
the completion only, each trainer in its own process:
  - w2sr: Ray Train + DeepSpeed ZeRO-2, `--workers` workers, padded then packed;
  - TRL: DDP under torchrun with as many processes as w2sr has workers, padded with
    `group_by_length` (as w2sr's padded micro-batches are sorted by length) then packed (BFD
    packing, padding-free rows);
  - bare: w2sr's packed micro-batches, attention and chunked loss in a plain PyTorch loop (DDP
    under torchrun, torch's AdamW): what w2sr's Ray Train and DeepSpeed cost over the limit.

Tokens are real (non-padding) tokens. A run's rate is the median over its steps after
`--warmup` of the step's tokens over its wall-clock, the same per-step clock on both sides, so
start-up (Ray, DeepSpeed, dataset preparation) is left out and reported apart as wall-clock.
The rounds follow benchmarks/protocol.py. The comparison of record is best against best: in each
round, the faster of each side's two configurations.

    python benchmarks/bench_train.py [--samples 512] [--steps 10] [--cutoff 1024] [--repeats 3]
    python benchmarks/bench_train.py --runs "w2sr packed,bare packed"   # a subset of the runs
    python benchmarks/bench_train.py --profile-step 5   # a step of w2sr packed and of bare packed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from protocol import Spread, bench_model, describe, measure, ratio  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def traces(n: int, seed: int = 0) -> list[dict]:
    """Arithmetic traces of long-tailed length (a few dozen to several hundred tokens)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        steps = min(60, int(rng.expovariate(1 / 12)) + 1)
        body = " ".join(
            f"First, compute {a} + {b} = {a + b}. Then, we check {j}." for j in range(steps)
        )
        rows.append(
            {
                "prompt_id": f"p{i}",
                "problem": f"What is {a} + {b}?",
                "answer": str(a + b),
                "teacher": "bench",
                "sample_index": 0,
                "seed": i,
                "prompt": "",
                "trace": f"{body} Therefore the result is \\boxed{{{a + b}}}.",
                "extracted_answer": str(a + b),
                "correct": True,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "finish_reason": "stop",
            }
        )
    return rows


def steady_rate(times: list[float], tokens: list[int], warmup: int) -> float:
    """The median over the steps after `warmup` of each step's tokens over its wall-clock (from
    the end of the step before): robust to a burst of load from other processes."""
    rates = [tokens[i] / (times[i] - times[i - 1]) for i in range(max(1, warmup), len(times))]
    return statistics.median(rates)


# --- the two trainers, each run in a child process ------------------------------------------


def run_w2sr(work: Path, model: str, args, packing: bool, bf16: bool) -> dict:
    import pyarrow as pa

    from w2sr import layout
    from w2sr.config import validate
    from w2sr.lineage import Lineage
    from w2sr.rundir import RunDir
    from w2sr.schemas import TRACE_SCHEMA
    from w2sr.stages.train import train

    run_dir = work / f"w2sr-{'packed' if packing else 'padded'}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished stage would be skipped
    cfg = validate(
        {
            "run_dir": str(run_dir),
            "teacher": model,
            "student": model,
            "train": {
                "num_workers": args.workers,
                "zero_stage": 2,
                "global_batch_size": args.global_batch,
                "micro_batch_size": args.micro_batch,
                "cutoff_len": args.cutoff,
                "max_steps": args.steps,
                "checkpoint_every": args.steps,
                "packing": packing,
                "bf16": bf16,
                "profile_step": args.profile_step,
            },
        }
    )
    run, sets = RunDir(str(run_dir)), Lineage(cfg).sft
    table = pa.Table.from_pylist(traces(args.samples), schema=TRACE_SCHEMA)
    run.write_parquet(table, sets.folder, "all.parquet")
    run.mark_done(sets.folder, sets.fingerprint)
    start = time.time()
    train(cfg)
    wall = time.time() - start
    stage = run_dir / Lineage(cfg).student("all").folder
    steps = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    times, tokens = [r["time"] for r in steps], [r["tokens"] for r in steps]
    result = {
        "tokens_per_second": steady_rate(times, tokens, args.warmup),
        "wall_seconds": wall,
        "mean_loss": statistics.mean(r["loss"] for r in steps),
    }
    if args.profile_step:
        result["profile"] = (stage / layout.step_profile(args.profile_step)).read_text()
    return result


def run_trl(work: Path, model: str, args, packing: bool, bf16: bool) -> dict:
    import pyarrow as pa
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from w2sr.data.templates import TEMPLATES
    from w2sr.learner.batches import build_sft_set

    template = TEMPLATES["paper"]
    rows = [
        {
            "prompt": template.messages(r["problem"]),
            "completion": [{"role": "assistant", "content": r["trace"]}],
        }
        for r in traces(args.samples)
    ]
    tokenizer = AutoTokenizer.from_pretrained(model)
    if packing:
        # One row of `cutoff` tokens per micro-step, as many steps as hold the global batch's
        # tokens (TRL's batch counts packed rows, not samples).
        table = pa.Table.from_pylist(traces(args.samples))
        mean = build_sft_set(tokenizer, template, table, args.cutoff).lengths.mean()
        per_device = 1
        accumulation = max(1, round(args.global_batch * mean / (args.cutoff * args.workers)))
    else:  # as w2sr: micro-batches of samples, accumulated to the global batch
        per_device = args.micro_batch
        accumulation = args.global_batch // (args.micro_batch * args.workers)
    config = SFTConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=args.steps,
        max_length=args.cutoff,
        packing=packing,
        train_sampling_strategy="random" if packing else "group_by_length",
        learning_rate=2e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        bf16=bf16,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        seed=0,
    )
    seen: list[int] = []
    ends: list[tuple[float, int]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append((time.time(), len(seen)))

    start = time.time()
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        seen.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    result = trainer.train()
    wall = time.time() - start
    tokens, last = [], 0
    for _, count in ends:
        tokens.append(sum(seen[last:count]))
        last = count
    if torch.distributed.is_initialized():  # every rank's tokens; rank 0's clock
        total = torch.tensor(tokens, dtype=torch.float64)
        torch.distributed.all_reduce(total)
        tokens = total.tolist()
    return {
        "tokens_per_second": steady_rate([t for t, _ in ends], tokens, args.warmup),
        "wall_seconds": wall,
        "mean_loss": result.training_loss,  # TRL's: the mean over its steps (rank 0's)
    }


def run_bare(work: Path, model: str, args, packing: bool, bf16: bool) -> dict:
    """The limit a framework approaches: w2sr's own samples, micro-batches, attention and loss in
    a plain PyTorch loop (DDP over gloo under torchrun, torch's AdamW and w2sr's learning-rate
    schedule, no Ray, no DeepSpeed)."""
    import pyarrow as pa
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from w2sr.config import validate
    from w2sr.data.templates import TEMPLATES
    from w2sr.learner.attention import attention
    from w2sr.learner.batches import build_sft_set, micro_batch_plan, sft_rows, step_samples
    from w2sr.learner.engine import data_parallel_scale, lr_schedule, param_groups, token_loss
    from w2sr.learner.loop import profile_report

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    experiment = validate({"run_dir": str(work / "bare"), "teacher": model, "student": model})
    cfg, seed = experiment.train, experiment.seed + experiment.train.seed  # as w2sr's workers
    tokenizer = AutoTokenizer.from_pretrained(model)
    table = pa.Table.from_pylist(traces(args.samples))
    data = build_sft_set(tokenizer, TEMPLATES["paper"], table, args.cutoff)
    dtype = torch.bfloat16 if bf16 else torch.float32
    impl = attention("sdpa", AutoConfig.from_pretrained(model))
    module = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=impl)
    ddp = torch.nn.parallel.DistributedDataParallel(module)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.lr)
    schedule = lr_schedule(cfg, optimizer, args.steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def step(index: int) -> tuple[torch.Tensor, int]:
        """One optimizer step: this rank's micro-batches, gradients reduced once, at the last;
        the step's summed loss and tokens over all ranks, and its loss targets."""
        indices = step_samples(len(data), args.global_batch, seed, index * args.global_batch)
        targets = int(data.target_counts[indices].sum())
        scale = data_parallel_scale(targets, world)
        plan = micro_batch_plan(indices, data.lengths, world, args.micro_batch)[rank]
        total = torch.zeros(2, dtype=torch.float64)
        for m, micro in enumerate(plan):
            with contextlib.nullcontext() if m == len(plan) - 1 else ddp.no_sync():
                loss, _ = token_loss(ddp, sft_rows(data, micro, packing, pad_id))
                (loss * scale).backward()
            total += torch.tensor([float(loss), int(data.lengths[micro].sum())])
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        return total, targets

    ends, tokens, losses, result = [time.time()], [], [], {}
    start = time.time()
    for index in range(args.steps):
        if index + 1 == args.profile_step:
            clock = time.perf_counter()
            with torch.profiler.profile() as profiler:
                total, targets = step(index)
            if rank == 0:
                wall = time.perf_counter() - clock
                result["profile"] = profile_report(profiler, wall, f"step {index + 1}, rank 0")
        else:
            total, targets = step(index)
        ends.append(time.time())
        tokens.append(int(total[1]))
        losses.append(float(total[0]) / targets)
    return {
        "tokens_per_second": steady_rate(ends[1:], tokens, args.warmup),
        "wall_seconds": time.time() - start,
        "mean_loss": statistics.mean(losses),
        **result,
    }


# --- the parent: runs each trainer in its own process and compares --------------------------


def operator_seconds(report: str) -> dict[str, float]:
    """Each operator's own CPU seconds from a profile report's table (torch's text format)."""
    units = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
    seconds = {}
    for line in report.splitlines():
        cells = line.split()  # name, self %, self, total %, total, average, calls
        if len(cells) > 6 and cells[-6].endswith("%") and cells[-1].isdigit():
            value = cells[-5]
            number = value.rstrip("mus")
            seconds[" ".join(cells[:-6])] = float(number) * units[value[len(number) :]]
    return seconds


def compare_profiles(ours: str, bare: str, rows: int = 12) -> str:
    """The operators whose own time differs most between the two profiled steps."""
    a, b = operator_seconds(ours), operator_seconds(bare)
    names = sorted(a.keys() | b.keys(), key=lambda n: -abs(a.get(n, 0.0) - b.get(n, 0.0)))
    lines = [f"{'operator':56s} {'w2sr s':>8s} {'bare s':>8s} {'w2sr - bare':>12s}"]
    for name in names[:rows]:
        x, y = a.get(name, 0.0), b.get(name, 0.0)
        lines.append(f"{name[:56]:56s} {x:8.3f} {y:8.3f} {x - y:+12.3f}")
    lines.append("(an operator below a table's 30 rows counts as 0 there)")
    return "\n".join(lines)


def child(args) -> None:
    work, model = Path(args.work), args.model
    run = {"w2sr": run_w2sr, "trl": run_trl, "bare": run_bare}[args.child]
    result = run(work, model, args, packing=args.packing, bf16=args.bf16)
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)


def launch(args, *extra: str) -> dict:
    """w2sr in one process (it starts its own workers); TRL under torchrun, one process per
    worker. Both with one thread per worker, as Ray gives each w2sr worker one CPU."""
    cmd = [sys.executable, __file__, "--model", args.model, "--work", args.work]
    if "trl" in extra or "bare" in extra:
        launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={args.workers}"]
        cmd = [sys.executable, *launcher, __file__, *cmd[2:]]
    keys = ("samples", "steps", "warmup", "cutoff", "workers", "global_batch", "micro_batch")
    for key in (*keys, "profile_step") if args.profile_step else keys:
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{' '.join(extra)} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rate")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after a warm-up")
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both")
    parser.add_argument(
        "--profile-step",
        type=int,
        help="instead of the rounds, one w2sr packed and one bare packed run, each with this "
        "step under torch's profiler, and the operators whose time differs most",
    )
    parser.add_argument("--model", help="(internal) the model folder")
    parser.add_argument("--work", help="(internal) the scratch folder")
    parser.add_argument(
        "--runs",
        help="a comma-separated subset of the runs (default: all; 'w2sr best' and "
        "'TRL best' need both of their side's)",
    )
    parser.add_argument("--child", choices=["w2sr", "trl", "bare"], help="(internal)")
    parser.add_argument("--packing", action="store_true", help="(internal)")
    parser.add_argument("--bf16", action="store_true", help="(internal)")
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="w2sr-bench-train-") as work:
        args.work = work
        args.model = bench_model(Path(work) / "model", args.hidden, args.layers, args.vocab)
        print(
            f"random Qwen2 {args.hidden}x{args.layers}, {args.vocab} vocabulary, "
            f"{args.samples} traces, cutoff {args.cutoff}, "
            f"global batch {args.global_batch}, {args.steps} steps ({args.warmup} warm-up), "
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        precision = ["--bf16"] if args.precision == "bf16" else []
        if args.profile_step:
            ours = launch(args, "--child", "w2sr", "--packing", *precision)["profile"]
            bare = launch(args, "--child", "bare", "--packing", *precision)["profile"]
            print(f"w2sr packed\n{ours}\nbare packed\n{bare}\n{compare_profiles(ours, bare)}")
            return
        runs = {
            "w2sr padded": ("--child", "w2sr", *precision),
            "TRL padded": ("--child", "trl", *precision),
            "w2sr packed": ("--child", "w2sr", "--packing", *precision),
            "TRL packed": ("--child", "trl", "--packing", *precision),
            "bare packed": ("--child", "bare", "--packing", *precision),
        }
        if args.runs:
            runs = {name: runs[name] for name in args.runs.split(",")}

        def side(name: str):
            def run() -> float:
                r = launch(args, *runs[name])
                print(
                    f"{name:12s} {r['tokens_per_second']:7,.0f} tokens/s   "
                    f"wall {r['wall_seconds']:5.0f} s   mean loss {r['mean_loss']:.3f}   "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                return r["tokens_per_second"]

            return run

        rates = measure({name: side(name) for name in runs}, repeats=args.repeats)
    print(f"\n{describe(args.repeats, 1)}; {args.precision} on both sides")
    for trainer in ("w2sr", "TRL"):  # each round's faster configuration
        if f"{trainer} padded" in rates and f"{trainer} packed" in rates:
            pairs = zip(rates[f"{trainer} padded"], rates[f"{trainer} packed"], strict=True)
            rates[f"{trainer} best"] = [max(pair) for pair in pairs]
    for name, values in rates.items():
        print(f"{name:12s} {Spread.of(values):,.0f} tokens/s")
    comparisons = [
        ("w2sr best", "TRL best", " (goal >= 1.3x)"),
        ("w2sr padded", "TRL padded", ""),
        ("w2sr packed", "TRL packed", ""),
        ("w2sr packed", "bare packed", " (goal >= 0.9x)"),
    ]
    for ours, theirs, goal in comparisons:
        if ours in rates and theirs in rates:
            print(f"{ours} / {theirs}: {ratio(rates[ours], rates[theirs]):.2f}x{goal}")


if __name__ == "__main__":
    main()
