"""Output tokens per second of `w2sr generate` against the two things a user would run instead.

In one run, on one machine, with one model, the same prompts, sampling and precision:
  (a) vLLM's offline `LLM.generate` on one engine: the ceiling for a single replica;
  (b) a plain transformers `generate` loop in fixed batches: what a user writes by hand.

Every side is measured the same way: as a whole command in a process of its own, on half of its
requests and on all of them. The steady rate is the difference in completion tokens over the
difference in wall time, which cancels on every side alike what each command pays once (Python,
Ray, loading the model) and what each batch pays at its ramp-up and tail; the start-up is what a
full command took beyond its tokens at the steady rate. Rounds follow benchmarks/protocol.py.
The transformers loop would take hours on the full request set, so it runs a slice of it
(`--hf-requests`, in batches of `--hf-batch`), differenced the same way.

    python benchmarks/bench_generate.py [--prompts 128] [--samples 2] [--max-tokens 128]
                                        [--repeats 3] [--gpu]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from protocol import Spread, describe, measure, ratio  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def problems(n: int) -> list[dict]:
    return [
        {"id": f"q{i}", "problem": f"What is {i % 97} + {(7 * i) % 89}?", "answer": str(i)}
        for i in range(n)
    ]


def rendered_prompts(model: str, rows: list[dict]) -> list[str]:
    from transformers import AutoTokenizer

    from w2sr.data.templates import TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(model)
    template = TEMPLATES["paper"]
    return [
        str(
            tokenizer.apply_chat_template(
                template.messages(r["problem"]), tokenize=False, add_generation_prompt=True
            )
        )
        for r in rows
    ]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def w2sr_command(model: str, data: Path, args, prompts: int, round_: int) -> tuple[int, float]:
    """`w2sr generate` on the first `prompts` prompts, in a run dir of its own: (tokens, s)."""
    from w2sr.config import validate
    from w2sr.layout import read_traces
    from w2sr.lineage import Lineage
    from w2sr.rundir import RunDir

    run_dir = data / f"run-{round_}-{prompts}"
    config = {
        "run_dir": str(run_dir),
        "teacher": model,
        "use_gpu": args.gpu,
        "prompts": {
            "source": {"type": "file", "path": str(data / "prompts.jsonl")},
            "limit": prompts,
        },
        "generation": {
            "samples_per_prompt": args.samples,
            "prompts_per_shard": max(1, args.prompts // 8),
            "sampling": {"temperature": 1.0, "max_tokens": args.max_tokens},
            "engine": {
                "batch_size": args.batch_size,
                "max_model_len": 1024,
                "dtype": args.dtype,
            },
        },
    }
    path = data / f"w2sr-{round_}-{prompts}.json"
    path.write_text(json.dumps(config))
    seconds = timed([sys.executable, "-m", "w2sr.cli", "generate", str(path)])
    traces = read_traces(RunDir(str(run_dir)), Lineage(validate(config)).traces.folder)
    return int(traces["completion_tokens"].to_numpy().sum()), seconds


def peer_command(side: str, model: str, data: Path, args, requests: int) -> tuple[int, float]:
    """This script as a command of its own running one peer on `requests` requests."""
    out = data / f"{side}-{requests}.json"
    cmd = [sys.executable, __file__, "--run-peer", side, "--model", model, "--data", str(data)]
    cmd += ["--requests", str(requests), "--out", str(out), *args.peer_flags]
    seconds = timed(cmd)
    return json.loads(out.read_text())["tokens"], seconds


def run_peer(args) -> None:
    """The body of a peer's command: generate, then write the completion tokens."""
    prompts = json.loads(Path(args.data, "prompts.json").read_text())
    requests = [p for p in prompts for _ in range(args.samples)][: args.requests]
    tokens = (vllm_tokens if args.run_peer == "vllm" else transformers_tokens)(args, requests)
    Path(args.out).write_text(json.dumps({"tokens": tokens}))


def vllm_tokens(args, requests: list[str]) -> int:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=1024,
        enable_chunked_prefill=args.gpu,
    )
    params = [
        SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=i)
        for i in range(len(requests))
    ]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def transformers_tokens(args, requests: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if args.gpu else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    lm: Any = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    lm = lm.to(device).eval()
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(requests), args.hf_batch):
            batch = tokenizer(requests[i : i + args.hf_batch], return_tensors="pt", padding=True)
            out = lm.generate(
                **batch.to(device), do_sample=True, temperature=1.0, max_new_tokens=args.max_tokens
            )
            new = out[:, batch["input_ids"].shape[1] :]
            tokens += int((new != tokenizer.pad_token_id).sum())
    return tokens


def steady(half: tuple[int, float], full: tuple[int, float]) -> tuple[float, float]:
    """(steady tokens/s, start-up s) from a command on half the requests and one on all."""
    rate = (full[0] - half[0]) / (full[1] - half[1])
    return rate, full[1] - full[0] / rate


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=32)
    parser.add_argument("--hf-requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="all sides on the GPU, in bfloat16")
    parser.add_argument(
        "--no-transformers", action="store_true", help="against vLLM only (a shorter run)"
    )
    parser.add_argument(
        "--dtype", help="every side's precision (default: float32 on CPU, bfloat16 on GPU)"
    )
    parser.add_argument("--run-peer", choices=["vllm", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # One precision for every side; on CPU float32, the precision jobs/tiny.yaml generates in.
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    args.peer_flags = [
        *("--samples", str(args.samples), "--max-tokens", str(args.max_tokens)),
        *("--hf-batch", str(args.hf_batch), "--dtype", args.dtype),
        *(["--gpu"] if args.gpu else []),
    ]
    return args


def main() -> None:
    args = parse()
    if args.run_peer:
        return run_peer(args)
    from w2sr.models import ModelSpec

    model = ModelSpec.parse(args.model).local()
    rows = problems(args.prompts)
    total, half_prompts = args.prompts * args.samples, args.prompts // 2
    startup: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (data / "prompts.json").write_text(json.dumps(rendered_prompts(model, rows)))
        rounds = itertools.count()

        def w2sr() -> float:
            i = next(rounds)
            rate, start = steady(
                w2sr_command(model, data, args, half_prompts, i),
                w2sr_command(model, data, args, args.prompts, i),
            )
            startup["w2sr generate"].append(start)
            return rate

        def peer(side: str, name: str, requests: int):
            def run() -> float:
                rate, start = steady(
                    peer_command(side, model, data, args, requests // 2),
                    peer_command(side, model, data, args, requests),
                )
                startup[name].append(start)
                return rate

            return run

        sides = {
            "w2sr generate": w2sr,
            "vLLM LLM.generate": peer("vllm", "vLLM LLM.generate", total),
            "transformers loop": peer("transformers", "transformers loop", args.hf_requests),
        }
        if args.no_transformers:
            del sides["transformers loop"]
        rates = measure(sides, repeats=args.repeats)
    print(
        f"\nmodel {args.model}; {args.prompts} prompts x {args.samples} samples (transformers: "
        f"{args.hf_requests} in batches of {args.hf_batch}), max_tokens {args.max_tokens}, "
        f"{args.dtype}, {'GPU' if args.gpu else f'{os.cpu_count()} CPUs'}"
    )
    print(describe(args.repeats, 1) + "; every side a whole command at two sizes, differenced")
    print(f"{'system':20} {'steady tokens/s':>26} {'start-up s':>22}")
    for name, values in rates.items():
        rate, start = format(Spread.of(values)), format(Spread.of(startup[name][-args.repeats :]))
        print(f"{name:20} {rate:>26} {start:>22}")
    ours = rates["w2sr generate"]
    for peer_name, goal in (("vLLM LLM.generate", ">= 0.95x"), ("transformers loop", ">= 10x")):
        if peer_name in rates:
            print(f"w2sr / {peer_name}: {ratio(ours, rates[peer_name]):.2f}x  (goal {goal})")


if __name__ == "__main__":
    main()
