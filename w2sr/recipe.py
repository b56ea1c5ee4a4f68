"""The recipe: every stage of w2sr, written once.

A record says what `w2sr STAGE CONFIG` runs (its driver, imported when it runs), which config
sections' resources it asks Ray for, the artifact it makes (`w2sr.lineage`), which stages' artifacts
it reads, and when a config asks for it at all. `w2sr run` walks the records for one config and
`w2sr sweep` over many; the command line, `--plan`, `w2sr gc` and the local resource check read
them. Adding a stage is one record here and one driver module in `w2sr.stages`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.lineage import Artifact, Lineage
from w2sr.rundir import RunDir

# What became of a stage in a command or a sweep.
COMPLETE = "complete"  # finished before, with this fingerprint: nothing to do
DONE = "done"  # run now, and finished
FAILED = "failed"
BLOCKED = "blocked"  # what it needs failed, or another submission holds it
SKIPPED = "skipped"  # nothing to do: what it would learn from is empty
TO_RUN = "to run"

# Exit statuses of `w2sr`.
EXIT_OK = 0
EXIT_FAILED = 1  # a sweep with a failed or blocked stage
EXIT_USAGE = 2  # a config error or a known failure, found before any work that could be lost
EXIT_LEASE_HELD = 3  # another submission works on the stage (or took it over)


@dataclass(frozen=True)
class Stage:
    name: str  # the command: `w2sr NAME CONFIG`
    help: str
    driver: str  # "module:function", called as `function(cfg, **options)`, returning a record
    sections: tuple[str, ...] = ()  # the config sections whose resources it asks Ray for
    models: tuple[str, ...] = ()  # the config keys of the models it loads
    needs: tuple[str, ...] = ()  # the stages whose artifacts it reads
    makes: Callable[[Lineage], Artifact] | None = None  # its artifact (a stage folder)
    asked: Callable[[ExperimentConfig], bool] = lambda cfg: True  # does the config want it
    in_run: bool = True  # a step of `w2sr run`
    per_variant: bool = False  # one artifact per training set: `w2sr run` makes each
    command: bool = True  # `w2sr NAME CONFIG` runs it alone (`w2sr report` takes a run dir)

    def run(self, cfg: ExperimentConfig, **options: Any) -> dict[str, Any]:
        module, function = self.driver.split(":")
        return getattr(importlib.import_module(module), function)(cfg, **options)

    def artifact(self, cfg: ExperimentConfig) -> Artifact:
        if self.makes is None:
            raise ValueError(f"stage {self.name} makes no stage folder")
        return self.makes(Lineage(cfg))


def _student(cfg: ExperimentConfig) -> bool:
    return cfg.student is not None


RECIPE = (
    Stage(
        "generate",
        "sample graded teacher traces with vLLM on Ray Data",
        "w2sr.stages.generate:generate",
        sections=("generation",),
        models=("teacher",),
        makes=lambda lin: lin.traces,
    ),
    Stage(
        "select",
        "split traces into the W2SR (all), W2SR-P (correct) and W2SR-N (incorrect) sets",
        "w2sr.stages.select:select",
        needs=("generate",),
        makes=lambda lin: lin.sft,
    ),
    Stage(
        "train",
        "fine-tune the student on one training set (Ray Train + DeepSpeed)",
        "w2sr.stages.train:train",
        sections=("train",),
        models=("student",),
        needs=("select",),
        makes=lambda lin: lin.student(lin.cfg.train.variant),
        asked=_student,
        per_variant=True,
    ),
    Stage(
        "grpo",
        "train the RL baseline: GRPO on the student with the grader as reward",
        "w2sr.stages.grpo:grpo",
        sections=("grpo",),
        models=("student",),
        makes=lambda lin: lin.rl,
        asked=lambda cfg: cfg.student is not None and cfg.grpo is not None,
    ),
    Stage(
        "eval",
        "evaluate the run's models on benchmarks (offline, or through --endpoint)",
        "w2sr.stages.evaluate:evaluate",
        sections=("eval",),
        models=("teacher", "student", "rl"),
        needs=("train", "grpo"),
    ),
    Stage(
        "report",
        "write report.md and figures (RGR table) for a run",
        "w2sr.stages.report:report_run",
        needs=("eval",),
        command=False,
    ),
    Stage(
        "serve",
        "host the run's students behind an OpenAI-compatible API (Ray Serve)",
        "w2sr.stages.serve:serve",
        sections=("serve",),
        models=("student",),
        needs=("train", "grpo"),
        in_run=False,
    ),
)
STAGES = {stage.name: stage for stage in RECIPE}
RUN = tuple(stage.name for stage in RECIPE if stage.in_run)


def sections(command: str) -> tuple[str, ...]:
    """The config sections whose resources a command asks Ray for: `run` asks for its stages'
    one after another."""
    if command == "run":
        return tuple(section for name in RUN for section in STAGES[name].sections)
    return STAGES[command].sections


def models(command: str) -> tuple[str, ...]:
    """The config keys of the models a command loads (`run`: its stages')."""
    names = RUN if command == "run" else (command,)
    return tuple(dict.fromkeys(key for name in names for key in STAGES[name].models))


def skip_reason(stage: Stage, cfg: ExperimentConfig, run: RunDir) -> str | None:
    """Why a stage whose needs are done has nothing to do: a training set without a trace (a
    teacher that never answers right leaves W2SR-P nothing to learn from)."""
    if stage.name != "train":
        return None
    variant = cfg.train.variant
    sets = Lineage(cfg).sft
    if not run.done(sets.folder, sets.fingerprint):
        return None  # not selected yet: the driver says what to run first
    if run.read_json(sets.folder, layout.SFT_SUMMARY)[variant]["traces"]:
        return None
    return f"the {variant} training set is empty"
