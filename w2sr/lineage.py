"""Which artifacts a config makes and reads: every stage's fingerprint and folder, from the config
alone, before anything runs.

A stage's folder is named by its fingerprint (`w2sr.layout`), so a changed config writes new
artifacts beside the old ones instead of over them, a later stage finds the artifact of the
current config without asking the stage that made it, and `w2sr gc` can tell what no config
refers to. Each fingerprint holds the stage's own config fields and the fingerprints of what it
reads, so a change anywhere upstream reaches every stage below it.
"""

from __future__ import annotations

from dataclasses import dataclass

from w2sr import grading, layout
from w2sr.config import ExperimentConfig
from w2sr.identity import model_identity, source_identity


@dataclass(frozen=True)
class Artifact:
    folder: str  # the stage folder in the run dir, `<stage>/<fingerprint>`
    fingerprint: str


def problems(cfg: ExperimentConfig) -> Artifact:
    """The validated problem set: the prompts section and the source's content."""
    source = getattr(cfg.prompts.source, "path", None)
    fp = layout.fingerprint(cfg.fields("prompts"), *([source_identity(source)] if source else []))
    return Artifact(layout.problems(fp), fp)


def _rendering(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The config fields that decide how prompts are rendered; `thinking` only when set, so the
    fingerprints of configs without it are those they had before it existed."""
    return ("template", *(["thinking"] if cfg.thinking is not None else []))


def prompts(cfg: ExperimentConfig) -> Artifact:
    """The problems rendered for the teacher: its tokenizer (the folder's content) and template."""
    fields = cfg.fields("teacher", *_rendering(cfg))
    fields["max_model_len"] = cfg.generation.engine.max_model_len
    fields["prompts_per_shard"] = cfg.generation.prompts_per_shard
    fp = layout.fingerprint(fields, problems(cfg).fingerprint, model_identity(cfg.teacher))
    return Artifact(layout.prompts(fp), fp)


def traces(cfg: ExperimentConfig) -> Artifact:
    fields = cfg.fields("generation", "grader", "grading_policy", "seed")
    fields["grader_version"] = grading.VERSION
    fp = layout.fingerprint(fields, prompts(cfg).fingerprint)
    return Artifact(layout.traces(fp), fp)


def sft(cfg: ExperimentConfig) -> Artifact:
    fp = layout.fingerprint(cfg.fields("select", "seed"), traces(cfg).fingerprint)
    return Artifact(layout.sft(fp), fp)


def student(cfg: ExperimentConfig, variant: str) -> Artifact:
    """The student fine-tuned on one training set (`cfg.student` must be set)."""
    train = cfg.train.model_copy(update={"variant": variant})
    fields = cfg.model_copy(update={"train": train}).fields(
        "train", "student", "seed", *_rendering(cfg)
    )
    fp = layout.fingerprint(fields, sft(cfg).fingerprint, model_identity(cfg.student))
    return Artifact(layout.student(variant, fp), fp)


def rl(cfg: ExperimentConfig) -> Artifact:
    """The GRPO student (`cfg.student` and `cfg.grpo` must be set). It reads the problems, not the
    teacher's prompts: the RL baseline is the same whichever teacher a run has."""
    fields = cfg.fields("grpo", "student", "grader", "grading_policy", "seed", *_rendering(cfg))
    fields["grader_version"] = grading.VERSION
    fp = layout.fingerprint(fields, problems(cfg).fingerprint, model_identity(cfg.student))
    return Artifact(layout.rl(fp), fp)


def trained(cfg: ExperimentConfig) -> dict[str, Artifact]:
    """The trained models the config asks for, by label."""
    if cfg.student is None:
        return {}
    out = {v.label: student(cfg, v.name) for v in layout.VARIANTS}
    if cfg.grpo is not None:
        out["rl"] = rl(cfg)
    return out


def builtins(cfg: ExperimentConfig) -> list[Artifact]:
    """The built-in models the config names, as a run dir in object storage publishes them for
    every node (`registry.published`), named by their content."""
    specs = [cfg.teacher, cfg.student, cfg.rl, *cfg.eval.models.values()]
    out = []
    for spec in dict.fromkeys(s for s in specs if s and s.startswith("builtin:")):
        digest = model_identity(spec)
        out.append(Artifact(layout.builtin(spec.removeprefix("builtin:"), digest), digest))
    return out


def artifacts(cfg: ExperimentConfig) -> list[Artifact]:
    """Every folder the config refers to: its stages' and its published built-ins."""
    stages = [problems(cfg), prompts(cfg), traces(cfg), sft(cfg), *trained(cfg).values()]
    return stages + builtins(cfg)
