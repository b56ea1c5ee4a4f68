"""Planning a study of about a thousand stages: the time to plan it, the order its stages would
start in, and the planning process's memory.

The study is `jobs/paper-sweep.yaml` (its eight teachers, three variants and three seeds, the
paper's benchmarks as configured) with its student repeated under `--students` labels, so the
stage count grows as a larger study's would. Planning reads no data, loads no model and needs no
network (as `w2sr sweep --plan` does); each round plans from scratch in this process. There is
no peer to compare with: the figures are medians with their ranges over `--repeats` rounds after
a discarded warm-up.

    python benchmarks/bench_sweep_plan.py [--students 7] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from protocol import Spread  # noqa: E402

ROOT = Path(__file__).parents[1]


def study(students: int, run_dir: Path):
    from w2sr.sweep.config import SweepConfig

    jobs = ROOT / "jobs"
    data = yaml.safe_load((jobs / "paper-sweep.yaml").read_text())
    data["base"] = yaml.safe_load((jobs / data["base"]).read_text())
    data["run_dir"] = str(run_dir)
    (student,) = data["students"]
    data["students"] = [
        {**student, "label": f"{student['label']}-{i}", "model": f"{student['model']}-{i}"}
        for i in range(students)
    ]
    return SweepConfig.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    with tempfile.TemporaryDirectory(prefix="bench-sweep-plan-") as tmp:
        os.environ["W2SR_CACHE"] = str(Path(tmp) / "cache")
        from w2sr.sweep.plan import plan
        from w2sr.sweep.runner import start_order

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        planned, ordered = [], []
        for round_ in range(1 + args.repeats):
            began = time.perf_counter()
            cells, nodes = plan(study(args.students, Path(tmp) / "runs" / "study"))
            middle = time.perf_counter()
            order = start_order(nodes)
            ended = time.perf_counter()
            if round_:  # the first round is the warm-up (imports, caches)
                planned.append(middle - began)
                ordered.append(ended - middle)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert not (Path(tmp) / "runs").exists() and not (Path(tmp) / "cache").exists()
    commands = Counter(nodes[key].command for key in order)
    print(
        f"jobs/paper-sweep.yaml with {args.students} students: {len(cells)} cells, "
        f"{len(nodes)} stages ({', '.join(f'{n} {c}' for c, n in commands.items())}), "
        f"{os.cpu_count()} cores"
    )
    print(f"1 warm-up round discarded, then {args.repeats}; median (min-max)")
    print(f"plan (validate every cell, build the graph): {Spread.of(planned):.3f} s")
    print(f"start order (longest remaining chain first): {Spread.of(ordered):.4f} s")
    print(f"process peak RSS: {peak:.0f} MiB ({before:.0f} MiB before planning, imports included)")
    print("the order stages would start in, by command, in tenths of the order:")
    tenth = max(1, len(order) // 10)
    for start in range(0, len(order), tenth):
        part = order[start : start + tenth]
        counts = Counter(nodes[key].command for key in part)
        listed = ", ".join(f"{command} {n}" for command, n in counts.items())
        print(f"  {start:5d}-{start + len(part) - 1:5d}: {listed}")


if __name__ == "__main__":
    main()
