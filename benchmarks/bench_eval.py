"""Evaluating several models of one architecture: `w2sr eval` against Ray Data LLM, one
processor per model.

A study's evaluation is mostly models of one architecture: the base student, its fine-tunes and
the RL student. w2sr evaluates them through one pipeline whose engines load each model in place;
the tool a user would pick instead, Ray Data LLM (`ray.data.llm.build_processor` over vLLM),
builds one processor per model, and each starts its engine. The peer is measured at both of its
configurations (models one after another; two processors side by side, their start-ups
overlapping) with the engine arguments and environment w2sr gives its own engines, and compared
at its best.

Both sides are whole commands in processes of their own (Python, Ray and vLLM start-ups
included), on the same random models (SmolLM2's vocabulary, weights from different seeds), the
same rendered prompts, greedy decoding, one sample per problem, the same precision and length.
w2sr's command also grades and writes its results; the peer's only generates. The peer's
completions are checked against w2sr's (greedy: the same tokens). Rounds follow
benchmarks/protocol.py.

    python benchmarks/bench_eval.py [--models 5] [--problems 64] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from protocol import Spread, bench_model, describe, measure, ratio  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PEERS = {"ray-data-llm, one at a time": 1, "ray-data-llm, two side by side": 2}


def config(args, data: Path, models: list[str], run_dir: Path) -> dict:
    """The w2sr config: the first model the teacher, the second the student, the rest extras."""
    return {
        "run_dir": str(run_dir),
        "teacher": models[0],
        "student": models[1],
        "eval": {
            "benchmarks": [{"name": "amc23", "path": str(data / "bench.jsonl")}],
            "samples": 1,
            "sampling": {"temperature": 0.0, "max_tokens": args.max_tokens},
            "engine": {"batch_size": args.batch_size, "max_model_len": 1024, "dtype": "float32"},
            "models": {f"m{i}": model for i, model in enumerate(models[2:], start=2)},
            "decontaminate": False,
        },
    }


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def w2sr_command(args, data: Path, models: list[str], round_: int) -> float:
    """`w2sr eval` of every model in a run dir of its own; its wall time."""
    path = data / f"w2sr-{round_}.json"
    path.write_text(json.dumps(config(args, data, models, data / f"run-{round_}")))
    return timed([sys.executable, "-m", "w2sr.cli", "eval", str(path)])


def peer_command(args, data: Path, side: str, round_: int) -> float:
    """This script as a command of its own, running the peer at `side`'s concurrency."""
    out = data / f"peer-{PEERS[side]}-{round_}.json"
    cmd = [sys.executable, __file__, "--run-peer", str(PEERS[side]), "--data", str(data)]
    cmd += ["--out", str(out), "--max-tokens", str(args.max_tokens)]
    cmd += ["--batch-size", str(args.batch_size)]
    return timed(cmd)


def run_peer(args) -> None:
    """The body of the peer's command: one Ray Data LLM processor per model, `--run-peer` of
    them at a time; each model's completions written by label."""
    import ray

    from w2sr.config import validate
    from w2sr.data.prompts import load_tokenizer
    from w2sr.data.templates import TEMPLATES
    from w2sr.engines.generator import build_generator
    from w2sr.session import init_ray

    data = Path(args.data)
    models = json.loads((data / "models.json").read_text())
    cfg = validate(config(args, data, models, data / "unused"))
    problems = [json.loads(line) for line in (data / "bench.jsonl").read_text().splitlines()]
    side_by_side = args.run_peer > 1
    init_ray(cfg)  # the session w2sr's commands start: the same logical CPUs for both sides

    def requests(model: str) -> list[dict]:
        tokenizer = load_tokenizer(model, False)
        template = TEMPLATES[cfg.template]
        rows = []
        for i, problem in enumerate(problems):
            text = tokenizer.apply_chat_template(
                template.messages(problem["question"]), tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            params = {"temperature": 0.0, "max_tokens": args.max_tokens}
            rows.append({"index": i, "tokenized_prompt": ids, "sampling_params": params})
        return rows

    def completions(model: str, rows: list[dict]) -> list[str]:
        processor = build_generator(
            model,
            cfg.eval.engine,
            use_gpu=False,
            trust_remote_code=False,
            postprocess=lambda row: {"index": row["index"], "text": row["generated_text"]},
            side_by_side=side_by_side,
        )
        out = processor(ray.data.from_items(rows)).take_all()
        return [row["text"] for row in sorted(out, key=lambda row: row["index"])]

    # Tokenizers are loaded here, one after another: transformers' lazy imports are not
    # thread-safe. The processors run side by side.
    prepared = [requests(model) for model in models]
    with ThreadPoolExecutor(args.run_peer) as pool:
        texts = dict(zip(models, pool.map(completions, models, prepared), strict=True))
    Path(args.out).write_text(json.dumps(texts))


def agreement(data: Path, models: list[str], run: int, peer_runs: list[int]) -> str:
    """How many of the peers' completions (in `peer_runs`) equal w2sr's (in `run`), over every
    model and problem."""
    import pyarrow.parquet as pq

    summary = json.loads((data / f"run-{run}" / "eval" / "summary.json").read_text())
    labels = {summary["models"][label]["spec"]: label for label in summary["models"]}
    problems = [json.loads(line) for line in (data / "bench.jsonl").read_text().splitlines()]
    same = total = 0
    for peer_run in peer_runs:
        theirs = json.loads(next(data.glob(f"peer-*-{peer_run}.json")).read_text())
        for model in models:
            entry = summary["models"][labels[model]]["results"]["amc23"]
            table = pq.read_table(data / f"run-{run}" / entry["file"]).to_pylist()
            ours = {row["problem"]: row["response"] for row in table}
            answers = [ours[problem["question"]] for problem in problems]
            same += sum(a == b for a, b in zip(answers, theirs[model], strict=True))
            total += len(answers)
    return f"{same} of {total}"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-peer", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.run_peer:
        run_peer(args)
        return
    data = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    models = [
        bench_model(data / f"model-{i}", args.hidden, args.layers, seed=i)
        for i in range(args.models)
    ]
    (data / "models.json").write_text(json.dumps(models))
    rows = [
        {"question": f"What is {i % 97} + {(7 * i) % 89}?", "answer": str(i)}
        for i in range(args.problems)
    ]
    (data / "bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    calls = iter(range(10_000))  # each command's files are named by its call
    last: dict[str, int] = {}

    def side(name: str):
        def run() -> float:
            last[name] = call = next(calls)
            if name == "w2sr":
                return w2sr_command(args, data, models, call)
            return peer_command(args, data, name, call)

        return run

    sides = {name: side(name) for name in ["w2sr", *PEERS]}
    values = measure(sides, repeats=args.repeats)
    print(describe(args.repeats, 1))
    print(
        f"{args.models} models of one architecture (random Qwen2 {args.hidden}x{args.layers}, "
        f"SmolLM2's vocabulary), {args.problems} problems, greedy, up to {args.max_tokens} "
        f"tokens, float32, {os.cpu_count()} CPUs"
    )
    for name, seconds in values.items():
        print(f"  {name}: {Spread.of(seconds)} s per command")
    best = min(PEERS, key=lambda name: Spread.of(values[name]).median)
    print(f"w2sr / peer at its best ({best}): {ratio(values['w2sr'], values[best]):.2f}x the time")
    same = agreement(data, models, last["w2sr"], [last[name] for name in PEERS])
    print(f"the peers' completions equal to w2sr's (last round): {same}")


if __name__ == "__main__":
    main()
