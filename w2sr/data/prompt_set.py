"""The run's problem set and prompt set, made once and then read from the run dir.

The problems (validated source rows) are what GRPO trains on and what evaluation is
decontaminated against; the prompts are those problems rendered for the teacher, in shards, and
what generation reads. Each artifact is written whole, then marked done: a preparation that fails
leaves nothing the next run trusts.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from w2sr import layout, lineage
from w2sr.config import ConfigError, ExperimentConfig
from w2sr.data.prompts import load_tokenizer, render_prompts
from w2sr.data.sources import load_prompts
from w2sr.data.templates import TEMPLATES
from w2sr.models import resolve_model
from w2sr.rundir import RunDir
from w2sr.schemas import PROBLEM_SCHEMA, PROMPT_SCHEMA, REJECTED_SCHEMA

log = logging.getLogger(__name__)


def prepare_problems(cfg: ExperimentConfig, run: RunDir) -> pa.Table:
    """The validated problems; loaded and written unless the run dir has them."""
    artifact = lineage.problems(cfg)
    if run.done(artifact.folder, artifact.fingerprint):
        return run.read_parquet(artifact.folder, layout.PROBLEM_SET)
    rows, rejected = load_prompts(cfg.prompts)
    _set_aside(run, artifact.folder, rejected, "source rows")
    if not rows:
        raise ConfigError(
            f"prompts: none of {len(rejected)} rows is usable; the reasons are in "
            f"{run.path(artifact.folder, layout.REJECTED)}"
        )
    table = pa.Table.from_pylist(rows, schema=PROBLEM_SCHEMA)
    run.write_parquet(table, artifact.folder, layout.PROBLEM_SET)
    run.mark_done(artifact.folder, artifact.fingerprint, problems=len(rows), rejected=len(rejected))
    return table


def prepare_prompts(cfg: ExperimentConfig, run: RunDir) -> str:
    """The folder of the prompt set; rendered and written unless the run dir has it. Generation
    reads the prompts from there in its workers."""
    artifact = lineage.prompts(cfg)
    if run.done(artifact.folder, artifact.fingerprint):
        return artifact.folder
    rows = prepare_problems(cfg, run).to_pylist()
    tokenizer = load_tokenizer(resolve_model(cfg.teacher), cfg.trust_remote_code)
    max_len = cfg.generation.engine.max_model_len
    rows, too_long = render_prompts(tokenizer, TEMPLATES[cfg.template], rows, max_len)
    _set_aside(run, artifact.folder, too_long, "problems")
    if not rows:
        raise ConfigError(
            f"generation.engine.max_model_len: no prompt leaves room to answer in {max_len} "
            f"tokens; the reasons are in {run.path(artifact.folder, layout.REJECTED)}"
        )
    per_shard = cfg.generation.prompts_per_shard
    for position, row in enumerate(rows):
        row["shard"] = position // per_shard
    table = pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)
    run.write_parquet(table, artifact.folder, layout.PROMPT_SET)
    run.mark_done(artifact.folder, artifact.fingerprint, prompts=len(rows), rejected=len(too_long))
    return artifact.folder


def _set_aside(run: RunDir, folder: str, rejected: list[dict], what: str) -> None:
    run.write_parquet(
        pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA), folder, layout.REJECTED
    )
    if rejected:
        log.warning(
            "%d %s set aside; see %s", len(rejected), what, run.path(folder, layout.REJECTED)
        )
