"""Stage `select`: the three training sets of the paper from one set of graded traces.

`all` trains W2SR, `correct` W2SR-P, `incorrect` W2SR-N (`w2sr.layout.VARIANTS`). The summary says
what each set holds, so a surprising student can be traced back to its data (few correct traces,
many truncated ones). With `select.match` the sets are subsampled to one size (`match_sizes`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.lineage import Lineage
from w2sr.rundir import RunDir

log = logging.getLogger(__name__)


def select_variant(traces: pa.Table, variant: layout.Variant) -> pa.Table:
    if variant.correct is None:
        return traces
    return traces.filter(pc.equal(traces.column("correct"), variant.correct))


def match_sizes(sets: dict[str, pa.Table], by: str, seed: int) -> dict[str, pa.Table]:
    """Every non-empty set cut to a seeded random subset the size of the smallest one, counted in
    traces or in completion tokens (the tokens SFT learns from; the smallest set stays whole,
    the others stop at the last trace that fits). An empty set stays empty: matching to it would
    leave every student nothing to learn from."""
    if by == "traces":
        sizes = {name: t.num_rows for name, t in sets.items() if t.num_rows}
    else:
        sizes = {name: _tokens(t) for name, t in sets.items() if t.num_rows}
    if not sizes:
        return sets
    target = min(sizes.values())
    out = {}
    for index, (name, table) in enumerate(sets.items()):
        # One stream per set, so a set's subset does not depend on the others'.
        order = np.random.default_rng([seed, index]).permutation(table.num_rows)
        if by == "traces":
            keep = order[:target]
        else:
            tokens = table.column("completion_tokens").to_numpy()[order]
            keep = order[np.cumsum(tokens) <= target]
        out[name] = table.take(np.sort(keep))
    return out


def _tokens(table: pa.Table) -> int:
    return pc.sum(table.column("completion_tokens")).as_py() or 0


def summarize(traces: pa.Table) -> dict[str, Any]:
    """Counts, teacher accuracy and trace lengths of one set."""
    n = traces.num_rows
    lengths = traces.column("completion_tokens").to_numpy() if n else []
    truncated = pc.sum(pc.equal(traces.column("finish_reason"), "length")).as_py() if n else 0
    correct = pc.sum(traces.column("correct").cast(pa.int64())).as_py() if n else 0
    summary: dict[str, Any] = {
        "traces": n,
        "prompts": len(set(traces.column("prompt_id").to_pylist())),
        "correct": correct or 0,
        "accuracy": (correct or 0) / n if n else None,
        "no_answer": traces.column("extracted_answer").null_count,
        "truncated": truncated or 0,
        "tokens": _tokens(traces) if n else 0,
    }
    if n:
        summary["completion_tokens"] = {
            "mean": round(float(np.mean(lengths)), 2),
            **{f"p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90)},
            "max": int(np.max(lengths)),
        }
    return summary


def select(cfg: ExperimentConfig) -> dict[str, Any]:
    run = RunDir(cfg.run_dir)
    traces = Lineage(cfg).traces
    if not run.done(traces.folder, traces.fingerprint):
        raise RuntimeError(
            f"no complete traces for this config in {cfg.run_dir}; run `w2sr generate` first"
        )
    with run.stage(Lineage(cfg).sft) as claim:
        if claim.record:
            return run.read_json(claim.folder, layout.SFT_SUMMARY)
        summary = _write_sets(cfg, run, claim.folder, layout.read_traces(run, traces.folder))
        claim.facts = {"traces": traces.folder}
    log.info(
        "training sets: all %d, correct %d, incorrect %d (teacher accuracy %s)",
        summary["all"]["traces"],
        summary["correct"]["traces"],
        summary["incorrect"]["traces"],
        summary["all"]["accuracy"],
    )
    return summary


def _write_sets(cfg: ExperimentConfig, run: RunDir, folder: str, table: pa.Table) -> dict[str, Any]:
    """Write the training sets and their summary into `folder`; returns the summary."""
    sets = {variant.name: select_variant(table, variant) for variant in layout.VARIANTS}
    match = cfg.select.match
    matched = match_sizes(sets, match, cfg.seed) if match != "none" else sets
    summary: dict[str, Any] = {}
    for name, subset in matched.items():
        run.write_parquet(subset, folder, layout.sft_set(name))
        summary[name] = summarize(subset)
        if match != "none":
            summary[name]["matched"] = {"by": match, "traces_before": sets[name].num_rows,
                                        "tokens_before": _tokens(sets[name])}  # fmt: skip
    run.write_json(summary, folder, layout.SFT_SUMMARY)
    return summary
