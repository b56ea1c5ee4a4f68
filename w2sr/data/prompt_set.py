"""The run's problem set and prompt set, made once and then read from the run dir.

The problems (validated source rows) are what GRPO trains on and what evaluation is
decontaminated against; the prompts are those problems rendered for the teacher (with `thinking`
where its chat template has the switch), in shards, and what generation reads. Each artifact is
written whole, then marked done: a preparation that fails leaves nothing the next run trusts.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from w2sr import layout, lineage
from w2sr.config import ConfigError, ExperimentConfig
from w2sr.data.prompts import load_tokenizer, render_prompts
from w2sr.data.sources import load_training_problems
from w2sr.data.templates import TEMPLATES
from w2sr.lineage import Lineage
from w2sr.models import ModelSpec
from w2sr.rundir import RunDir
from w2sr.schemas import PROBLEM_SCHEMA, PROMPT_SCHEMA, REJECTED_SCHEMA
from w2sr.session import init_ray

log = logging.getLogger(__name__)
RENDER_ROWS = 4096  # problems rendered at a time: the most prompts a preparation holds


def prepare_problems(cfg: ExperimentConfig, run: RunDir) -> pa.Table:
    """The validated problems; loaded and written unless the run dir has them."""
    return _problem_set(cfg, run, Lineage(cfg).problems)


def _problem_set(cfg: ExperimentConfig, run: RunDir, artifact: lineage.Artifact) -> pa.Table:
    """`prepare_problems` for the problem set the caller fingerprinted."""
    # Every stage reads the problems: one that finds another preparing them waits for them.
    with run.stage(artifact, wait=True) as claim:
        if claim.record:
            return run.read_parquet(artifact.folder, layout.PROBLEM_SET)
        rows, rejected = load_training_problems(cfg.prompts)
        _set_aside(run, artifact.folder, rejected, "source rows")
        if not rows:
            raise ConfigError(
                f"prompts: none of {len(rejected)} rows is usable; the reasons are in "
                f"{run.path(artifact.folder, layout.REJECTED)}"
            )
        table = pa.Table.from_pylist(rows, schema=PROBLEM_SCHEMA)
        run.write_parquet(table, artifact.folder, layout.PROBLEM_SET)
        claim.facts = {"problems": len(rows), "rejected": len(rejected)}
    return table


def prepare_prompts(cfg: ExperimentConfig, run: RunDir) -> str:
    """The folder of the prompt set; made unless the run dir has it.

    The problems are loaded and rendered in a Ray task, so that the driver never holds the prompt
    set (nor a tokenizer): at millions of prompts it is the largest thing a command would keep.
    Generation reads the prompts from the folder in its workers. The fingerprints are this
    process's: a task's node may resolve the teacher or the source differently (another hub
    cache), and would write the prompts where no stage looks.
    """
    artifact = Lineage(cfg).prompts
    if run.done(artifact.folder, artifact.fingerprint):
        return artifact.folder
    import ray

    init_ray(cfg)
    # max_calls=1: the worker exits after the task, returning its memory before engines start
    task = ray.remote(num_cpus=1, max_calls=1)(write_prompt_set)
    try:
        ray.get(task.remote(cfg, run, artifact, Lineage(cfg).problems))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ConfigError):  # the user's to fix: said as plainly as here
            raise error.cause from None
        raise
    return artifact.folder


def write_prompt_set(
    cfg: ExperimentConfig,
    run: RunDir,
    artifact: lineage.Artifact,
    problem_set: lineage.Artifact,
    batch_rows: int = RENDER_ROWS,
) -> None:
    """Render the problems `batch_rows` at a time into one file, shard numbers in order of the
    problem set, and mark `artifact` done; the problems (`problem_set`) are prepared first unless
    the run dir has them. Both artifacts are the caller's, computed where the stage plans."""
    # Generation of every config with this teacher reads them: wait for another preparing them.
    with run.stage(artifact, wait=True) as claim:
        if not claim.record:
            claim.facts = _render(
                cfg, run, artifact.folder, _problem_set(cfg, run, problem_set), batch_rows
            )


def _render(
    cfg: ExperimentConfig, run: RunDir, folder: str, problems: pa.Table, batch_rows: int
) -> dict[str, int]:
    """Write the prompt set into `folder`; returns the done record's facts."""
    tokenizer = load_tokenizer(ModelSpec.parse(cfg.teacher).local(), cfg.trust_remote_code)
    template = TEMPLATES[cfg.template]
    max_len = cfg.generation.engine.max_model_len
    per_shard = cfg.generation.prompts_per_shard
    too_long: list[dict] = []
    kept = 0

    def rendered():
        nonlocal kept
        for start in range(0, problems.num_rows, batch_rows):
            rows = problems.slice(start, batch_rows).to_pylist()
            rows, rejected = render_prompts(
                tokenizer, template, rows, max_len, start, thinking=cfg.thinking
            )
            too_long.extend(rejected)
            for row in rows:
                row["shard"] = kept // per_shard
                kept += 1
            yield pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)
        # Before the file is published: a set with no prompt is never written.
        _set_aside(run, folder, too_long, "problems")
        if not kept:
            raise ConfigError(
                f"generation.engine.max_model_len: no prompt leaves room to answer in {max_len} "
                f"tokens; the reasons are in {run.path(folder, layout.REJECTED)}"
            )

    run.write_parquet_stream(rendered(), PROMPT_SCHEMA, folder, layout.PROMPT_SET)
    return {"prompts": kept, "rejected": len(too_long)}


def _set_aside(run: RunDir, folder: str, rejected: list[dict], what: str) -> None:
    run.write_parquet(
        pa.Table.from_pylist(rejected, schema=REJECTED_SCHEMA), folder, layout.REJECTED
    )
    if rejected:
        log.warning(
            "%d %s set aside; see %s", len(rejected), what, run.path(folder, layout.REJECTED)
        )
