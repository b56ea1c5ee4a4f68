"""Peak memory of w2sr's drivers, and requests per second of `w2sr generate`, as a run grows.

A tiny random model writes one-token completions, so that what grows with the request count is
the data path, at the default shard size (256 prompts: shards and part files grow in number
with the run, as in a real one): preparing the prompt set (in the driver), reading it and
expanding the requests (in the workers), writing the parts and sealing the shards; then
`w2sr select` splitting the traces into the training sets, and `w2sr train` (one step)
tokenizing a set (in a Ray task). Each size runs the three as whole commands in its own run dir;
each command's resident memory (its own process, not Ray's workers) is sampled every 0.1 s.
Sizes take turns as benchmarks/protocol.py prescribes; the warm-up is one run of the smallest
size.

Goal: each command's peak memory at the largest size at most 1.2x that at the smallest, and
requests per second flat across sizes.

    python benchmarks/bench_scale.py [--sizes 10000,100000,1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from protocol import Spread, describe, measure  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SAMPLES = 10  # completions per prompt: requests = prompts x SAMPLES


def write_prompts(path: Path, prompts: int) -> None:
    with path.open("w") as out:
        for i in range(prompts):
            row = {"id": f"q{i}", "problem": f"What is {i} + {i % 13}?", "answer": str(i + i % 13)}
            out.write(json.dumps(row) + "\n")


COMMANDS = ("generate", "select", "train")


def run_size(data: Path, requests: int, round_: int) -> dict[str, tuple[float, float]]:
    """(seconds, peak RSS in MiB) of each command of one run on `requests` requests."""
    prompts = requests // SAMPLES
    config = {
        "run_dir": str(data / f"run-{requests}-{round_}"),
        "teacher": "builtin:tiny-random",
        "student": "builtin:tiny-random",
        "template": "plain",
        "prompts": {
            "source": {"type": "file", "path": str(data / "prompts.jsonl")},
            "limit": prompts,
        },
        "generation": {
            "samples_per_prompt": SAMPLES,
            "sampling": {"temperature": 1.0, "max_tokens": 1},
            "engine": {"batch_size": 256, "max_model_len": 128, "dtype": "float32"},
        },
        "train": {
            "max_steps": 1,
            "num_workers": 1,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "cutoff_len": 64,
            "bf16": False,
        },
    }
    path = data / f"config-{requests}-{round_}.json"
    path.write_text(json.dumps(config))
    return {command: peak_of(command, path) for command in COMMANDS}


def peak_of(command: str, config: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `w2sr COMMAND CONFIG`."""
    import psutil

    start = time.perf_counter()
    log = config.with_name(f"{config.stem}-{command}.log")
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "w2sr.cli", command, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    driver, peak = psutil.Process(process.pid), [0]

    def sample() -> None:
        while process.poll() is None:
            try:
                peak[0] = max(peak[0], driver.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if process.wait() != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"w2sr {command} {config} exited with {process.returncode}:\n{tail}")
    seconds = time.perf_counter() - start
    sampler.join()
    return seconds, peak[0] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    memory: dict[str, dict[int, list[float]]] = {c: {n: [] for n in sizes} for c in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_prompts(data / "prompts.jsonl", max(sizes) // SAMPLES)
        rounds = {n: 0 for n in sizes}

        def side(requests: int):
            def run() -> float:
                rounds[requests] += 1
                measured = run_size(data, requests, rounds[requests])
                for command, (_, peak) in measured.items():
                    memory[command][requests].append(peak)
                return measured["generate"][0]

            return run

        run_size(data, sizes[0], 0)  # the warm-up: the smallest size once, discarded
        seconds = measure({n: side(n) for n in sizes}, repeats=args.repeats, warmup=0)
    cpus = os.cpu_count()
    print(f"\ntiny random model, one-token completions, {SAMPLES} per prompt, {cpus} CPUs")
    print(describe(args.repeats, 1).replace("round", "run of the smallest size", 1))
    print("each size a whole `w2sr generate` command, start-up included; the added rate is the")
    print("requests added over the seconds added from the size before, within one round")
    print(f"{'requests':>10} {'requests/s':>22} {'added requests/s':>22}")
    for i, n in enumerate(sizes):
        rate = format(Spread.of([n / t for t in seconds[n]]))
        added = "-"
        if i:
            before = sizes[i - 1]
            pairs = zip(seconds[n], seconds[before], strict=True)
            added = format(Spread.of([(n - before) / (t - t0) for t, t0 in pairs]))
        print(f"{n:>10} {rate:>22} {added:>22}")
    print("\npeak resident memory of each command's own process, MiB")
    print(f"{'requests':>10} " + " ".join(f"{c:>22}" for c in COMMANDS))
    for n in sizes:
        peaks = " ".join(f"{format(Spread.of(memory[c][n])):>22}" for c in COMMANDS)
        print(f"{n:>10} {peaks}")
    for command in COMMANDS:
        low, high = (Spread.of(memory[command][n]).median for n in (sizes[0], sizes[-1]))
        print(f"{command}: largest over smallest size {high / low:.2f}x  (goal <= 1.2x)")


if __name__ == "__main__":
    main()
