"""Grading checks per second, on real traces and on hostile responses, for both policies.

Real traces are what a generate stage wrote (every `traces/*/shard-*.parquet` under `--run-dir`,
each graded against its gold answer); hostile responses are the cases the grader is built to
survive (huge numbers, deep nesting, megabyte strings, control characters, LaTeX that expands
without end). Protocol: the same in-process timer for every set, one discarded warm-up pass,
then `--repeats` passes in alternating policy order; the median rate with its min and max, and
the slowest single check seen.

    python benchmarks/bench_grading.py --run-dir runs/demo-sweep [--repeats 5]
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time

import pyarrow.parquet as pq

from w2sr.grading import POLICIES, is_correct


def real_traces(run_dir: str, limit: int) -> list[tuple[str, str]]:
    pairs = []
    for path in sorted(glob.glob(f"{run_dir}/traces/*/shard-*.parquet")):
        table = pq.read_table(path, columns=["trace", "answer"])
        pairs += list(zip(table["trace"].to_pylist(), table["answer"].to_pylist(), strict=True))
    return pairs[:limit]


def hostile() -> list[tuple[str, str]]:
    cases = [
        "#### " + "1" * 5000,
        "\\boxed{" + "9" * 10_000 + "}",
        "\\boxed{" + "{" * 100_000,
        "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_001,
        "<answer>" * 200_000,
        "so " * 500_000 + "\\boxed{5}",
        "\\boxed{10^{10^{10^{10^{10}}}}}",
        "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
        "\\boxed{\x00\x07\ud800\udfff}",
        "$" * 100_000 + "\\(" * 50_000 + "answer is " * 10_000,
    ]
    return [(response, gold) for response in cases for gold in ("5", "1/2", "x^2")]


def one_pass(pairs: list[tuple[str, str]], policy: str) -> tuple[float, float]:
    """(checks per second, the slowest check in seconds)."""
    slowest, started = 0.0, time.perf_counter()
    for response, gold in pairs:
        begin = time.perf_counter()
        is_correct(response, gold, policy)
        slowest = max(slowest, time.perf_counter() - begin)
    return len(pairs) / (time.perf_counter() - started), slowest


def measure(name: str, pairs: list[tuple[str, str]], repeats: int) -> None:
    for policy in POLICIES:  # warm-up, discarded: the math-verify worker starts here
        one_pass(pairs, policy)
    rates: dict[str, list[float]] = {p: [] for p in POLICIES}
    slowest: dict[str, float] = dict.fromkeys(POLICIES, 0.0)
    for repeat in range(repeats):
        order = POLICIES if repeat % 2 == 0 else tuple(reversed(POLICIES))
        for policy in order:
            rate, worst = one_pass(pairs, policy)
            rates[policy].append(rate)
            slowest[policy] = max(slowest[policy], worst)
    for policy in POLICIES:
        r = rates[policy]
        print(
            f"{name:8} {policy:8} {len(pairs):6d} checks: {statistics.median(r):10,.0f}/s "
            f"(min {min(r):,.0f}, max {max(r):,.0f}; {repeats} repeats), "
            f"slowest check {slowest[policy] * 1000:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo-sweep")
    parser.add_argument("--limit", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        "protocol: one in-process timer for every set; a discarded warm-up pass; "
        f"{args.repeats} passes in alternating policy order; median (min, max)"
    )
    traces = real_traces(args.run_dir, args.limit)
    if traces:
        measure("traces", traces, args.repeats)
    else:
        print(f"no traces under {args.run_dir}/traces: run `w2sr generate` (or a sweep) first")
    measure("hostile", hostile(), args.repeats)


if __name__ == "__main__":
    main()
