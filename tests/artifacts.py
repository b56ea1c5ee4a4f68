"""Stage outputs written by hand, at the folders a config's lineage names, for the tests of the
stages that read them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.lineage import Lineage
from w2sr.rundir import RunDir


def trained_student(cfg: ExperimentConfig, variant: str, **facts) -> str:
    """A finished SFT stage with an (empty) exported model; returns its folder."""
    run, artifact = RunDir(cfg.run_dir), Lineage(cfg).student(variant)
    run.write_text("{}", artifact.folder, layout.MODEL, "config.json")
    run.mark_done(artifact.folder, artifact.fingerprint, **facts)
    return artifact.folder


def prepared_problems(cfg: ExperimentConfig, problems: list[str]) -> None:
    run, artifact = RunDir(cfg.run_dir), Lineage(cfg).problems
    rows = [{"prompt_id": str(i), "problem": p, "answer": "0"} for i, p in enumerate(problems)]
    run.write_parquet(pa.Table.from_pylist(rows), artifact.folder, layout.PROBLEM_SET)
    run.mark_done(artifact.folder, artifact.fingerprint)


def sum_problems(tmp: Path, count: int = 6) -> Path:
    """A prompts file of `count` sums with their answers, as a `file` source reads it."""
    problems = tmp / "prompts.jsonl"
    problems.write_text(
        "".join(
            json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
            for i in range(count)
        )  # fmt: skip
    )
    return problems
