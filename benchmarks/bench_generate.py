"""Output tokens per second of `w2sr generate` against the two things a user would run instead.

In one run, on one machine, with one model and the same prompts and sampling:
  (a) vLLM's offline `LLM.generate` on one engine: the ceiling for a single replica;
  (b) a plain transformers `generate` loop in batches: what a user writes by hand.

Steady state is what scales to a long job, so start-up (Ray, engine load) is reported apart.
`w2sr generate` runs as a user runs it, a whole command: it runs twice, on half the prompts and on
all of them, and the steady rate is the difference in tokens over the difference in time, which
cancels the start-up both runs pay.

    python benchmarks/bench_generate.py [--prompts 256] [--samples 2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
        tokenizer.apply_chat_template(
            template.messages(r["problem"]), tokenize=False, add_generation_prompt=True
        )
        for r in rows
    ]


def run_w2sr(model: str, data: Path, args, prompts: int) -> tuple[int, float]:
    """The real stage through its CLI, in its own process: (completion tokens, seconds)."""
    from w2sr import lineage
    from w2sr.config import validate
    from w2sr.layout import read_traces
    from w2sr.rundir import RunDir

    run_dir = data / f"run-{prompts}"
    config = {
        "run_dir": str(run_dir),
        "teacher": model,
        "prompts": {
            "source": {"type": "file", "path": str(data / "prompts.jsonl")},
            "limit": prompts,
        },
        "generation": {
            "samples_per_prompt": args.samples,
            "prompts_per_shard": max(1, args.prompts // 8),
            "sampling": {"temperature": 1.0, "max_tokens": args.max_tokens},
            "engine": {"batch_size": args.batch_size, "max_model_len": 1024},
        },
    }
    path = data / f"w2sr-{prompts}.json"
    path.write_text(json.dumps(config))
    start = time.time()
    cmd = [sys.executable, "-m", "w2sr.cli", "generate", str(path)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.time() - start
    traces = read_traces(RunDir(str(run_dir)), lineage.traces(validate(config)).folder)
    tokens = int(traces["completion_tokens"].to_numpy().sum())
    return tokens, seconds


def bench_w2sr(model: str, data: Path, args) -> dict:
    half_tokens, half_seconds = run_w2sr(model, data, args, args.prompts // 2)
    tokens, seconds = run_w2sr(model, data, args, args.prompts)
    steady = (tokens - half_tokens) / (seconds - half_seconds)
    startup = seconds - tokens / steady
    return {"tokens": tokens, "seconds": seconds, "steady_tok_s": steady, "startup_s": startup}


def bench_vllm(model: str, prompts: list[str], args) -> dict:
    from vllm import LLM, SamplingParams

    start = time.time()
    llm = LLM(
        model=model,
        dtype="bfloat16",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=1024,
        enable_chunked_prefill=False,
    )
    startup = time.time() - start
    requests = [p for p in prompts for _ in range(args.samples)]
    params = [
        SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=i)
        for i in range(len(requests))
    ]
    start = time.time()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.time() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "steady_tok_s": tokens / seconds,
        "startup_s": startup,
    }


def bench_transformers(model: str, prompts: list[str], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    startup = time.time() - start
    # The same number of requests would take hours by hand-written loop: time a slice of them.
    requests = [p for p in prompts for _ in range(args.samples)][: args.hf_requests]
    tokens = 0
    start = time.time()
    with torch.inference_mode():
        for i in range(0, len(requests), args.hf_batch):
            batch = tokenizer(requests[i : i + args.hf_batch], return_tensors="pt", padding=True)
            out = lm.generate(
                **batch, do_sample=True, temperature=1.0, max_new_tokens=args.max_tokens
            )
            new = out[:, batch["input_ids"].shape[1] :]
            tokens += int((new != tokenizer.pad_token_id).sum())
    seconds = time.time() - start
    return {
        "tokens": tokens,
        "seconds": seconds,
        "steady_tok_s": tokens / seconds,
        "startup_s": startup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--hf-requests", type=int, default=64)
    args = parser.parse_args()

    from w2sr.models import resolve_model

    model = resolve_model(args.model)
    rows = problems(args.prompts)
    prompts = rendered_prompts(model, rows)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = {
            "w2sr generate": bench_w2sr(model, data, args),
            "vLLM LLM.generate": bench_vllm(model, prompts, args),
            "transformers generate": bench_transformers(model, prompts, args),
        }
    print(
        f"\nmodel {args.model}; {args.prompts} prompts x {args.samples} samples, "
        f"max_tokens {args.max_tokens}; {os.cpu_count()} CPUs"
    )
    print(f"{'system':24} {'tokens':>8} {'steady tok/s':>13} {'start-up s':>11}")
    for name, r in results.items():
        print(f"{name:24} {r['tokens']:8d} {r['steady_tok_s']:13.1f} {r['startup_s']:11.1f}")
    ours = results["w2sr generate"]["steady_tok_s"]
    print(f"\nw2sr / vLLM offline:    {ours / results['vLLM LLM.generate']['steady_tok_s']:.2f}x")
    print(f"w2sr / transformers:    {ours / results['transformers generate']['steady_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
