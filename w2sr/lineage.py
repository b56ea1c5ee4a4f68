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
import operator
from dataclasses import dataclass
from typing import Any

from w2sr import grading, layout
from w2sr.config import EvalBenchmark, ExperimentConfig, Strict
from w2sr.identity import model_identity, source_identity
from w2sr.models import ModelSpec

# What decides each artifact, declared once: the config keys its fingerprint holds, besides the
# fingerprints of what it reads. A section counts whole, less the fields its class marks
# OPERATIONAL (and SILENT_AT_DEFAULT while at their default); `thinking` counts only when set;
# `grader_version` is the grading code's (`grading.VERSION`), not a config key. Every config
# field is here or in OPERATIONAL below (tests/test_recipe.py lists each field's role).
DECIDES: dict[str, tuple[str, ...]] = {
    "problems": ("prompts",),
    "prompts": (
        "teacher",
        "template",
        "thinking",
        "generation.engine.max_model_len",
        "generation.prompts_per_shard",
    ),
    "traces": ("generation", "grader", "grading_policy", "seed", "grader_version"),
    "sft": ("select", "seed"),
    "student": ("train", "student", "seed", "template", "thinking"),
    "rl": (
        "grpo",
        "student",
        "grader",
        "grading_policy",
        "seed",
        "template",
        "thinking",
        "grader_version",
    ),
    # one model's result on one benchmark (`Lineage.result_fields`); the model by its identity
    "result": (
        "eval.benchmarks",
        "eval.protocol",
        "eval.samples",
        "eval.sampling",
        "eval.greedy",
        "eval.grading_policy",
        "eval.decontaminate",
        "eval.engine.max_model_len",
        "eval.engine.dtype",
        "eval.models",
        "teacher",
        "student",
        "rl",
        "seed",
        "template",
        "thinking",
        "grader",
        "grading_policy",
        "grader_version",
    ),
}
# Keys that decide no artifact: where and how commands run, and what is computed from results.
OPERATIONAL = (
    "run_dir",
    "use_gpu",
    "trust_remote_code",
    "ray",
    "eval.benchmarks.pass_k",
    "eval.pass_k",
    "eval.engine",
    "eval.concurrent_models",
    "eval.bootstrap_resamples",
    "eval.confidence",
    "eval.endpoint",
    "serve",
    "report",
)


@dataclass(frozen=True)
class Artifact:
    folder: str  # the stage folder in the run dir, `<stage>/<fingerprint>`
    fingerprint: str


class Lineage:
    """Every fingerprint and stage folder of one config."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    def fields(self, artifact: str) -> dict[str, Any]:
        """The config fields that decide a stage's artifact (`DECIDES`), as its fingerprint
        holds them: a dotted key by its last part."""
        out: dict[str, Any] = {}
        for key in DECIDES[artifact]:
            if key == "grader_version":
                out[key] = grading.VERSION
                continue
            value = operator.attrgetter(key)(self.cfg)
            if key == "thinking" and value is None:
                continue
            out[key.rsplit(".", 1)[-1]] = value.outcome() if isinstance(value, Strict) else value
        return out

    @functools.cached_property
    def problems(self) -> Artifact:
        """The validated problem set: the prompts section and the source's content."""
        source = getattr(self.cfg.prompts.source, "path", None)
        inputs = [source_identity(source)] if source else []
        fp = layout.fingerprint(self.fields("problems"), *inputs)
        return Artifact(layout.problems(fp), fp)

    @functools.cached_property
    def prompts(self) -> Artifact:
        """The problems rendered for the teacher: its tokenizer (the folder's content) and
        template."""
        teacher = model_identity(self.cfg.teacher)
        fp = layout.fingerprint(self.fields("prompts"), self.problems.fingerprint, teacher)
        return Artifact(layout.prompts(fp), fp)

    @functools.cached_property
    def traces(self) -> Artifact:
        fp = layout.fingerprint(self.fields("traces"), self.prompts.fingerprint)
        return Artifact(layout.traces(fp), fp)

    @functools.cached_property
    def sft(self) -> Artifact:
        fp = layout.fingerprint(self.fields("sft"), self.traces.fingerprint)
        return Artifact(layout.sft(fp), fp)

    @functools.cache  # noqa: B019 (a Lineage lives as long as its config's command)
    def student(self, variant: str) -> Artifact:
        """The student fine-tuned on one training set (`cfg.student` must be set)."""
        cfg = self.cfg
        if cfg.student is None:
            raise ValueError("a config without `student` trains no student")
        train = cfg.train.model_copy(update={"variant": variant})
        fields = Lineage(cfg.model_copy(update={"train": train})).fields("student")
        fp = layout.fingerprint(fields, self.sft.fingerprint, model_identity(cfg.student))
        return Artifact(layout.student(variant, fp), fp)

    @functools.cached_property
    def rl(self) -> Artifact:
        """The GRPO student (`cfg.student` and `cfg.grpo` must be set). It reads the problems, not
        the teacher's prompts: the RL baseline is the same whichever teacher a run has."""
        cfg = self.cfg
        if cfg.student is None:
            raise ValueError("a config without `student` trains no RL baseline")
        student = model_identity(cfg.student)
        fp = layout.fingerprint(self.fields("rl"), self.problems.fingerprint, student)
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
        for every node (`ModelSpec.for_cluster`)."""
        cfg = self.cfg
        specs = [cfg.teacher, cfg.student, cfg.rl, *cfg.eval.models.values()]
        out = []
        for model in map(ModelSpec.parse, dict.fromkeys(s for s in specs if s)):
            if model.kind == "builtin":
                digest = model_identity(model.text)
                out.append(Artifact(layout.builtin(model.name, digest), digest))
        return out

    @functools.cached_property
    def artifacts(self) -> list[Artifact]:
        """Every folder the config refers to: its stages' and its published built-ins."""
        stages = [self.problems, self.prompts, self.traces, self.sft, *self.trained.values()]
        return stages + self.builtins

    def result_fields(self, bench: EvalBenchmark, label: str) -> dict[str, Any]:
        """What decides one model's result on one benchmark, from the config alone: the
        benchmark's source (a local copy by its content), the training prompts it is
        decontaminated against, the setting the model is decoded with and how responses are
        rendered and graded. A protocol's name is not in it, only the values it sets."""
        cfg = self.cfg
        setting = cfg.eval.setting(bench, label)
        fields = {
            "benchmark": {
                "name": bench.name,
                "source": source_identity(bench.path) if bench.path else None,
                "split": bench.split,
                "fields": bench.fields_given(),
                "limit": bench.limit,
            },
            "decontaminated_against": (
                self.problems.fingerprint if cfg.eval.decontaminate else None
            ),
            "samples": setting.samples,
            "sampling": setting.sampling.model_dump(mode="json"),
            "greedy": setting.greedy,
            "seed": cfg.seed,
            "template": cfg.template,
            "grader": cfg.grader,
            "grading_policy": cfg.eval_grading_policy,
            "grader_version": grading.VERSION,
            "max_model_len": cfg.eval.engine.max_model_len,
            "dtype": cfg.eval.engine.dtype,
        }
        if cfg.thinking is not None:
            fields["thinking"] = cfg.thinking
        return fields

    def result(self, bench: EvalBenchmark, label: str, identity: str) -> str:
        """The fingerprint of a result: its fields and the model's identity (`Model.identity`)."""
        return layout.fingerprint(self.result_fields(bench, label), identity)
