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
from w2sr.config import ConfigError, ExperimentConfig
from w2sr.lineage import Lineage
from w2sr.rundir import RunDir
from w2sr.schemas import TRACE_SCHEMA

log = logging.getLogger(__name__)

# What decides which traces a training set keeps (`select_variant`, `match_sizes`).
KEY_COLUMNS = ("correct", "completion_tokens")


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


class Summary:
    """Counts, teacher accuracy and trace lengths of one set, added up shard by shard (a prompt's
    traces are all in one shard, so its prompts are counted shard by shard too)."""

    def __init__(self) -> None:
        self.traces = self.prompts = self.correct = self.no_answer = 0
        self.truncated = self.tokens = 0
        self.lengths: list[np.ndarray] = []

    def add(self, traces: pa.Table) -> None:
        if not traces.num_rows:
            return
        self.traces += traces.num_rows
        self.prompts += len(pc.unique(traces.column("prompt_id")))
        self.correct += pc.sum(traces.column("correct").cast(pa.int64())).as_py() or 0
        self.no_answer += traces.column("extracted_answer").null_count
        self.truncated += pc.sum(pc.equal(traces.column("finish_reason"), "length")).as_py() or 0
        self.tokens += _tokens(traces)
        self.lengths.append(traces.column("completion_tokens").to_numpy())

    def result(self) -> dict[str, Any]:
        n = self.traces
        summary: dict[str, Any] = {
            "traces": n,
            "prompts": self.prompts,
            "correct": self.correct,
            "accuracy": self.correct / n if n else None,
            "no_answer": self.no_answer,
            "truncated": self.truncated,
            "tokens": self.tokens,
        }
        if n:
            lengths = np.concatenate(self.lengths)
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
        raise ConfigError(
            f"no complete traces for this config in {cfg.run_dir}; run `w2sr generate` first"
        )
    with run.stage(Lineage(cfg).sft) as claim:
        if claim.record:
            return run.read_json(claim.folder, layout.SFT_SUMMARY)
        summary = _write_sets(cfg, run, claim.folder, traces.folder)
        claim.facts = {"traces": traces.folder}
    log.info(
        "training sets: all %d, correct %d, incorrect %d (teacher accuracy %s)",
        summary["all"]["traces"],
        summary["correct"]["traces"],
        summary["incorrect"]["traces"],
        summary["all"]["accuracy"],
    )
    return summary


def _write_sets(cfg: ExperimentConfig, run: RunDir, folder: str, traces: str) -> dict[str, Any]:
    """Write the training sets and their summary into `folder`; returns the summary.

    No whole table is held: the columns that decide which traces each set keeps are read first
    (a few bytes per trace), then each set is written shard by shard of the traces."""
    shards = run.list(traces, suffix=".parquet")
    keys = [run.read_parquet(traces, name, columns=list(KEY_COLUMNS)) for name in shards]
    offsets = np.cumsum([0] + [t.num_rows for t in keys])
    table = pa.concat_tables(keys) if keys else pa.table({c: [] for c in KEY_COLUMNS})
    table = table.append_column("row", pa.array(np.arange(table.num_rows), pa.int64()))
    sets = {variant.name: select_variant(table, variant) for variant in layout.VARIANTS}
    match = cfg.select.match
    matched = match_sizes(sets, match, cfg.seed) if match != "none" else sets
    summary: dict[str, Any] = {}
    for name, subset in matched.items():
        rows = subset.column("row").to_numpy()
        accumulated = Summary()

        def chunks(rows: np.ndarray = rows, accumulated: Summary = accumulated):
            for index, shard in enumerate(shards):
                start, end = offsets[index], offsets[index + 1]
                kept = rows[(rows >= start) & (rows < end)] - start
                if len(kept):
                    chunk = run.read_parquet(traces, shard).take(pa.array(kept))
                    accumulated.add(chunk)
                    yield chunk

        run.write_parquet_stream(chunks(), TRACE_SCHEMA, folder, layout.sft_set(name))
        summary[name] = accumulated.result()
        if match != "none":
            summary[name]["matched"] = {"by": match, "traces_before": sets[name].num_rows,
                                        "tokens_before": _tokens(sets[name])}  # fmt: skip
    run.write_json(summary, folder, layout.SFT_SUMMARY)
    return summary
