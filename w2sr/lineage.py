"""Which artifacts a config makes and reads: every stage's fingerprint and folder, from the config
alone, before anything runs.

A stage's folder is named by its fingerprint (`w2sr.layout`), so a changed config writes new
artifacts beside the old ones instead of over them, a later stage finds the artifact of the
current config without asking the stage that made it, and `w2sr gc` can tell what no config
refers to. Each fingerprint holds the stage's own config fields and the fingerprints of what it
reads, so a change anywhere upstream reaches every stage below it.

`Lineage(cfg)` is pure: it reads no run dir, builds no model and fetches nothing, and computes
each fingerprint once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from w2sr import grading, layout
from w2sr.config import ExperimentConfig
from w2sr.identity import model_identity, source_identity


@dataclass(frozen=True)
class Artifact:
    folder: str  # the stage folder in the run dir, `<stage>/<fingerprint>`
    fingerprint: str


class Lineage:
    """Every fingerprint and stage folder of one config."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    @functools.cached_property
    def problems(self) -> Artifact:
        """The validated problem set: the prompts section and the source's content."""
        cfg = self.cfg
        source = getattr(cfg.prompts.source, "path", None)
        fp = layout.fingerprint(
            cfg.fields("prompts"), *([source_identity(source)] if source else [])
        )
        return Artifact(layout.problems(fp), fp)

    def _rendering(self) -> tuple[str, ...]:
        """The config fields that decide how prompts are rendered; `thinking` only when set, so
        the fingerprints of configs without it are those they had before it existed."""
        return ("template", *(["thinking"] if self.cfg.thinking is not None else []))

    @functools.cached_property
    def prompts(self) -> Artifact:
        """The problems rendered for the teacher: its tokenizer (the folder's content) and
        template."""
        cfg = self.cfg
        fields = cfg.fields("teacher", *self._rendering())
        fields["max_model_len"] = cfg.generation.engine.max_model_len
        fields["prompts_per_shard"] = cfg.generation.prompts_per_shard
        fp = layout.fingerprint(fields, self.problems.fingerprint, model_identity(cfg.teacher))
        return Artifact(layout.prompts(fp), fp)

    @functools.cached_property
    def traces(self) -> Artifact:
        fields = self.cfg.fields("generation", "grader", "grading_policy", "seed")
        fields["grader_version"] = grading.VERSION
        fp = layout.fingerprint(fields, self.prompts.fingerprint)
        return Artifact(layout.traces(fp), fp)

    @functools.cached_property
    def sft(self) -> Artifact:
        fp = layout.fingerprint(self.cfg.fields("select", "seed"), self.traces.fingerprint)
        return Artifact(layout.sft(fp), fp)

    @functools.cache  # noqa: B019 (a Lineage lives as long as its config's command)
    def student(self, variant: str) -> Artifact:
        """The student fine-tuned on one training set (`cfg.student` must be set)."""
        cfg = self.cfg
        if cfg.student is None:
            raise ValueError("a config without `student` trains no student")
        train = cfg.train.model_copy(update={"variant": variant})
        fields = cfg.model_copy(update={"train": train}).fields(
            "train", "student", "seed", *self._rendering()
        )
        fp = layout.fingerprint(fields, self.sft.fingerprint, model_identity(cfg.student))
        return Artifact(layout.student(variant, fp), fp)

    @functools.cached_property
    def rl(self) -> Artifact:
        """The GRPO student (`cfg.student` and `cfg.grpo` must be set). It reads the problems, not
        the teacher's prompts: the RL baseline is the same whichever teacher a run has."""
        cfg = self.cfg
        if cfg.student is None:
            raise ValueError("a config without `student` trains no RL baseline")
        fields = cfg.fields(
            "grpo", "student", "grader", "grading_policy", "seed", *self._rendering()
        )
        fields["grader_version"] = grading.VERSION
        fp = layout.fingerprint(fields, self.problems.fingerprint, model_identity(cfg.student))
        return Artifact(layout.rl(fp), fp)

    @functools.cached_property
    def trained(self) -> dict[str, Artifact]:
        """The trained models the config asks for, by label."""
        if self.cfg.student is None:
            return {}
        out = {v.label: self.student(v.name) for v in layout.VARIANTS}
        if self.cfg.grpo is not None:
            out["rl"] = self.rl
        return out

    @functools.cached_property
    def builtins(self) -> list[Artifact]:
        """The built-in models the config names, as a run dir in object storage publishes them
        for every node (`registry.published`)."""
        cfg = self.cfg
        specs = [cfg.teacher, cfg.student, cfg.rl, *cfg.eval.models.values()]
        out = []
        for spec in dict.fromkeys(s for s in specs if s and s.startswith("builtin:")):
            digest = model_identity(spec)
            out.append(Artifact(layout.builtin(spec.removeprefix("builtin:"), digest), digest))
        return out

    @functools.cached_property
    def artifacts(self) -> list[Artifact]:
        """Every folder the config refers to: its stages' and its published built-ins."""
        stages = [self.problems, self.prompts, self.traces, self.sft, *self.trained.values()]
        return stages + self.builtins
