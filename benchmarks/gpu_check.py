"""Every GPU path of w2sr, on one GPU, in a few minutes, with small models of real architectures.

    benchmarks/gpu_check.sh [--work DIR] [--cpu] [--skip-throughput]

Each path runs as a whole `w2sr` command on one config, as a user runs it, and prints PASS or
FAIL with its time and what was checked:
  generate  vLLM on Ray Data, bfloat16 on the GPU; every (prompt, sample) traced once
  train     SFT of the student on the W2SR set, DeepSpeed ZeRO-3 in bfloat16; a student saved
  grpo      GRPO with its engine colocated on the learner's GPU (asleep while the learner
            updates), weights synced through Ray's object store; a policy saved
  eval      offline evaluation of every model of the run; a result per model
  serve     Ray Serve LLM on 127.0.0.1; one chat completion from the trained student
Then generation throughput of `w2sr generate` against vLLM's `LLM.generate` on the same GPU
(benchmarks/bench_generate.py --gpu --no-transformers: a warm-up round, then 3 measured
rounds).

The models are SmolLM2-135M-Instruct (Llama architecture) as both teacher and student: the check
is of the paths, not of weak-to-strong. `--cpu` runs the same paths on this machine's CPU with a
tiny random Qwen2 model, which is how the check itself is tried where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from w2sr import layout
from w2sr.config import validate
from w2sr.lineage import Lineage
from w2sr.rundir import RunDir

PATHS = ("generate", "train", "grpo", "eval", "serve")
PROMPTS, SAMPLES, EVAL_PROBLEMS = 32, 4, 16


def config(work: Path, cpu: bool) -> dict:
    """The one config every path runs on: small enough for minutes, every GPU feature on."""
    model = "builtin:tiny-random" if cpu else "builtin:smollm2-135m-instruct"
    engine = {
        "batch_size": 32,
        "max_model_len": 1024,
        "dtype": "float32" if cpu else "bfloat16",
        "gpu_memory_utilization": 0.25,
    }
    learner = {"num_workers": 1, "zero_stage": 3, "bf16": not cpu, "checkpoint_every": 2}
    return {
        "run_dir": str(work / "run"),
        "teacher": model,
        "student": model,
        "use_gpu": not cpu,
        "prompts": {"source": {"type": "reasoning_gym", "size": PROMPTS}},
        "generation": {
            "samples_per_prompt": SAMPLES,
            "prompts_per_shard": 8,
            "sampling": {"temperature": 1.0, "max_tokens": 64},
            "engine": engine,
        },
        "train": {
            **learner,
            "global_batch_size": 8,
            "micro_batch_size": 4,
            "max_steps": 4,
            "cutoff_len": 1024,
        },
        "grpo": {
            **learner,
            "steps": 2,
            "prompts_per_step": 4,
            "group_size": 4,
            "micro_batch_size": 4,
            "placement": "colocated",
            "weight_sync": "object_store",
            "sampling": {"temperature": 1.0, "max_tokens": 64},
            "engine": engine,
        },
        "eval": {
            "benchmarks": [{"name": "offline", "limit": EVAL_PROBLEMS}],
            "samples": 1,
            "sampling": {"temperature": 0.0, "max_tokens": 64},
            "engine": engine,
        },
        "serve": {"models": ["w2sr"], "engine": engine, "port": 8765},
    }


@dataclass
class Outcome:
    path: str
    passed: bool
    seconds: float
    detail: str


def w2sr(args: list[str], log: Path, timeout: float) -> None:
    with log.open("a") as out:
        subprocess.run(
            [sys.executable, "-m", "w2sr.cli", *args],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )


def check_generate(cfg_path: Path, cfg, log: Path) -> str:
    w2sr(["generate", str(cfg_path)], log, 600)
    traces = layout.read_traces(RunDir(cfg.run_dir), Lineage(cfg).traces.folder)
    ids, samples = traces["prompt_id"].to_pylist(), traces["sample_index"].to_pylist()
    keys = set(zip(ids, samples, strict=True))
    if len(keys) != traces.num_rows or traces.num_rows != PROMPTS * SAMPLES:
        raise AssertionError(f"{traces.num_rows} traces, {len(keys)} distinct keys")
    return f"{traces.num_rows} traces, each (prompt, sample) once"


def check_train(cfg_path: Path, cfg, log: Path) -> str:
    w2sr(["select", str(cfg_path)], log, 300)
    w2sr(["train", str(cfg_path)], log, 600)
    done = finished(cfg, Lineage(cfg).student("all"))
    return f"W2SR student after {done['steps']} steps, loss {done['final_loss']:.3f}"


def check_grpo(cfg_path: Path, cfg, log: Path) -> str:
    w2sr(["grpo", str(cfg_path)], log, 600)
    done = finished(cfg, Lineage(cfg).rl)
    return f"policy after {done['steps']} steps, reward {done['final_reward_mean']:.3f}"


def finished(cfg, artifact) -> dict:
    done = RunDir(cfg.run_dir).done(artifact.folder, artifact.fingerprint)
    if done is None:
        raise AssertionError(f"{artifact.folder} has no completion record")
    return done


def check_eval(cfg_path: Path, cfg, log: Path) -> str:
    w2sr(["eval", str(cfg_path)], log, 600)
    summary = json.loads(Path(cfg.run_dir, "eval", "summary.json").read_text())
    models = sorted(summary["models"])
    return f"{len(models)} models evaluated: {', '.join(models)}"


def check_serve(cfg_path: Path, cfg, log: Path) -> str:
    url = f"http://127.0.0.1:{cfg.serve.port}/v1"
    with log.open("a") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "w2sr.cli", "serve", str(cfg_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                raise AssertionError(f"w2sr serve exited with {server.returncode}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as reply:
                    if any(m["id"] == "w2sr" for m in json.loads(reply.read())["data"]):
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError("the server did not answer within 600 s")
            time.sleep(2)
        body = {"model": "w2sr", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
        request = urllib.request.Request(
            f"{url}/chat/completions",
            data=json.dumps({**body, "max_tokens": 16}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())["choices"][0]["message"]["content"]
        return f"answered {answer[:40]!r}"
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


CHECKS = {
    "generate": check_generate,
    "train": check_train,
    "grpo": check_grpo,
    "eval": check_eval,
    "serve": check_serve,
}


def prepare(work: Path, cpu: bool):
    """The config, written where the commands read it, and validated as they will validate it."""
    work.mkdir(parents=True, exist_ok=True)
    raw = config(work, cpu)
    path = work / "gpu_check.json"
    path.write_text(json.dumps(raw, indent=2))
    return path, validate(raw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="a folder for the run and the logs (default: a new one)")
    parser.add_argument("--cpu", action="store_true", help="the same paths on the CPU")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="w2sr-gpu-check-"))
    cfg_path, cfg = prepare(work, args.cpu)
    log = work / "gpu_check.log"
    print(f"gpu_check: config {cfg_path}, command output in {log}", flush=True)
    outcomes = []
    for name in PATHS:
        start = time.time()
        try:
            detail, passed = CHECKS[name](cfg_path, cfg, log), True
        except Exception as error:  # a failed path is reported, and the next one still runs
            detail, passed = f"{type(error).__name__}: {error}", False
        outcomes.append(Outcome(name, passed, time.time() - start, detail))
        o = outcomes[-1]
        print(f"{'PASS' if passed else 'FAIL'} {name:9} {o.seconds:6.0f} s  {detail}", flush=True)
    if not args.skip_throughput:
        bench = [sys.executable, str(Path(__file__).with_name("bench_generate.py"))]
        # against vLLM only: 8 commands of each side (warm-up and 3 rounds, two sizes each)
        bench += ["--prompts", "128", "--samples", "4", "--max-tokens", "256", "--repeats", "3"]
        bench.append("--no-transformers")
        if not args.cpu:
            bench.append("--gpu")
        print("throughput:", " ".join(bench[1:]), flush=True)
        subprocess.run(bench, check=False)
    failed = [o.path for o in outcomes if not o.passed]
    print(f"gpu_check: {len(outcomes) - len(failed)} of {len(outcomes)} paths passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
