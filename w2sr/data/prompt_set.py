"""The run's prompt set: loaded, validated and rendered for the teacher once, then read from the
run dir by generation (its shards) and GRPO (its problems)."""

from __future__ import annotations

import logging

import pyarrow as pa

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig
from w2sr.data.prompts import load_tokenizer, render_prompts
from w2sr.data.sources import load_prompts
from w2sr.data.templates import TEMPLATES
from w2sr.identity import model_identity, source_identity
from w2sr.models import resolve_model
from w2sr.rundir import RunDir
from w2sr.schemas import PROMPT_SCHEMA, REJECTED_SCHEMA

log = logging.getLogger(__name__)


def prompts_fingerprint(cfg: ExperimentConfig) -> str:
    """The prompt set's config, the teacher's tokenizer (its folder's content) and the source's
    content, where it is a local file or folder."""
    fields = cfg.fields("prompts", "template", "teacher")
    fields["max_model_len"] = cfg.generation.engine.max_model_len
    fields["prompts_per_shard"] = cfg.generation.prompts_per_shard
    source = getattr(cfg.prompts.source, "path", None)
    inputs = [model_identity(cfg.teacher)] + ([source_identity(source)] if source else [])
    return layout.fingerprint(fields, *inputs)


def prepare_prompts(cfg: ExperimentConfig, run: RunDir) -> tuple[pa.Table, str]:
    """The prompt set and its fingerprint; made and written unless the run dir has it."""
    fingerprint = prompts_fingerprint(cfg)
    if run.done(layout.PROMPTS, fingerprint):
        return run.read_parquet(*layout.PROMPT_SET), fingerprint
    rows, rejected = load_prompts(cfg.prompts)
    tokenizer = load_tokenizer(resolve_model(cfg.teacher), cfg.trust_remote_code)
    max_len = cfg.generation.engine.max_model_len
    rows, too_long = render_prompts(tokenizer, TEMPLATES[cfg.template], rows, max_len)
    rejected += too_long
    per_shard = cfg.generation.prompts_per_shard
    for position, row in enumerate(rows):
        row["shard"] = position // per_shard
    run.write_parquet(pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA), *layout.REJECTED)
    if rejected:
        log.warning("%d prompt rows set aside; see %s", len(rejected), run.path(*layout.REJECTED))
    if not rows:
        raise ConfigError(
            f"prompts: none of {len(rejected)} rows is usable; the reasons are in "
            f"{run.path(*layout.REJECTED)}"
        )
    table = pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)
    run.write_parquet(table, *layout.PROMPT_SET)
    run.mark_done(layout.PROMPTS, fingerprint, prompts=len(rows), rejected=len(rejected))
    return table, fingerprint
