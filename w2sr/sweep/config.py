"""The sweep config: a base experiment and the axes of the study.

    base: demo.yaml              # an experiment config (relative to this file) or a mapping
    run_dir: runs/demo-sweep     # every cell's artifacts, shared where cells share a stage
    teachers:
      - {label: small, model: builtin:demo-teacher, kind: reasoner, scale: 0.4}
    students:
      - {label: student, model: builtin:demo-student}
      # or with a published RL checkpoint as its RL reference instead of a GRPO run:
      # - {label: math-7b, model: Qwen/Qwen2.5-Math-7B, rl: hkust-nlp/Qwen-2.5-Math-7B-SimpleRL-Zoo}
    variants: [all, correct, incorrect]
    seeds: [0]                   # SFT (and GRPO) seeds; the traces are shared across them
    match: [none, traces]        # training sets as selected, and cut to one size (select.match)
    stage_timeout_s: 86400       # a stage still running after a day is stopped and counted failed

A teacher or student entry may carry `overrides` (dotted keys, as on the command line) for its
cells: a 32B teacher's engine spans two GPUs, a 14B student trains on more workers.

`stage_timeout_s` bounds each stage the sweep runs (absent or null: no bound but the job's own
deadline): one that runs longer is stopped with every process it started, and reported failed
naming the bound. What it wrote so far stays, and the sweep's next run resumes it.

A cell is one (teacher, student, variant, seed, match): one SFT and its evaluation. Every cell's
experiment config is built and validated when the sweep is loaded, so a bad key fails before Ray
starts and names the cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator

from w2sr.config import ConfigError, Match, PositiveInt, Strict, VariantName, format_errors

Label = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=48)]


class TeacherAxis(Strict):
    label: Label
    model: str
    kind: Literal["reasoner", "non_reasoner"] = "reasoner"
    # Parameters in billions, for the scale figures; counted from the weights when absent.
    scale: Annotated[float, Field(gt=0)] | None = None
    # Dotted keys set in this teacher's cells, e.g. a larger model's engine layout:
    # {generation.engine.tensor_parallel_size: 2}.
    overrides: dict[str, Any] = {}


class StudentAxis(Strict):
    label: Label
    model: str
    # A published RL checkpoint of this student as its cells' RL reference, in place of the
    # base config's GRPO run (the top-level `rl` of an experiment config).
    rl: str | None = None
    overrides: dict[str, Any] = {}  # dotted keys set in this student's cells


class SweepConfig(Strict):
    base: dict[str, Any]
    run_dir: str
    teachers: Annotated[list[TeacherAxis], Field(min_length=1)]
    students: Annotated[list[StudentAxis], Field(min_length=1)]
    variants: Annotated[list[VariantName], Field(min_length=1)] = list(get_args(VariantName))
    seeds: Annotated[list[int], Field(min_length=1)] = [0]
    # Matched-size controls (`select.match`): W2SR, W2SR-P and W2SR-N as selected (`none`) and/or
    # subsampled to one size in traces or tokens. Absent: the base config's `select.match`.
    match: Annotated[list[Match], Field(min_length=1)] | None = None
    # Stages that run at once; on a local session also bounded by its CPUs.
    max_concurrent_stages: PositiveInt = 4
    # Seconds a stage may run before it is stopped and counted failed; null: no bound.
    stage_timeout_s: Annotated[float, Field(gt=0)] | None = None

    @field_validator("teachers", "students")
    @classmethod
    def _unique_labels(cls, axis: list) -> list:
        labels = [entry.label for entry in axis]
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be unique, got {labels}")
        return axis

    @field_validator("variants", "seeds", "match")
    @classmethod
    def _unique(cls, values: list | None) -> list | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError(f"values must be unique, got {values}")
        return values


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read sweep config {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep config {path} must be a mapping at the top level")
    if isinstance(data.get("base"), str):
        base = path.parent / data["base"]
        try:
            data["base"] = yaml.safe_load(base.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"base: cannot read {base}: {error}") from None
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_errors(error).replace("invalid config", "invalid sweep")) from None
