"""A sweep as a graph of stages, each run once however many cells need it.

Cells share a run dir and every stage's folder is named by its fingerprint (`w2sr.lineage`), so
two cells need the same stage exactly when their configs give it the same folder: each
(teacher, prompt set) generates its traces once, each (student, seed) trains one GRPO baseline,
each model is evaluated once per benchmark. Nothing here starts Ray.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from w2sr import layout, recipe
from w2sr.config import ConfigError, ExperimentConfig, apply_override, validate
from w2sr.evaluation.results import plan_tasks
from w2sr.lineage import Artifact, Lineage
from w2sr.recipe import RECIPE, STAGES
from w2sr.registry import Model, model_table
from w2sr.rundir import RunDir
from w2sr.sweep.config import StudentAxis, SweepConfig, TeacherAxis


@dataclass(frozen=True)
class Cell:
    """One (teacher, student, variant, seed, match): an SFT and the evaluation that scores it."""

    teacher: TeacherAxis
    student: StudentAxis
    variant: str
    seed: int
    match: str  # `select.match`: `none`, or the sets cut to one size in traces or tokens
    config: ExperimentConfig

    @property
    def name(self) -> str:
        teacher, student = self.teacher.label, self.student.label
        return cell_name(teacher, student, self.variant, self.seed, self.match)

    @property
    def student_label(self) -> str:
        """The label of the student its training set makes."""
        return next(v.label for v in layout.VARIANTS if v.name == self.variant)

    @property
    def labels(self) -> tuple[str, ...]:
        """The models its report row compares: teacher, base, its student, RL when asked for."""
        rl = ("rl",) if self.config.grpo is not None or self.config.rl is not None else ()
        return ("teacher", "base", self.student_label, *rl)


@dataclass
class Node:
    """One command of the sweep: a stage that makes `key` (its folder), or the evaluation of one
    model (`key` names the model and its results: `eval_key`)."""

    key: str
    command: str  # generate, select, train, grpo or eval
    config: ExperimentConfig
    needs: tuple[str, ...] = ()
    label: str | None = None  # eval: the model's label in `config`
    cells: list[str] = field(default_factory=list)


def matched_suffix(match: str) -> str:
    """What a matched-size control adds to a cell's or a group's name."""
    return "" if match == "none" else f".{match}-matched"


def cell_name(teacher: str, student: str, variant: str, seed: int, match: str) -> str:
    return f"{teacher}.{student}.{variant}{matched_suffix(match)}.s{seed}"


def cells(sweep: SweepConfig) -> list[Cell]:
    """Every cell's experiment config, validated; an error names the cell and the key."""
    out = []
    base_match = (sweep.base.get("select") or {}).get("match", "none")
    axes = itertools.product(
        sweep.teachers, sweep.students, sweep.seeds, sweep.match or [base_match], sweep.variants
    )
    for teacher, student, seed, match, variant in axes:
        data = copy.deepcopy(sweep.base)
        for key, value in {**teacher.overrides, **student.overrides}.items():
            apply_override(data, key.split("."), copy.deepcopy(value))
        data |= {"run_dir": sweep.run_dir, "teacher": teacher.model, "student": student.model}
        if student.rl is not None:  # an outside RL reference replaces the GRPO run
            data |= {"rl": student.rl, "grpo": None}
        data["select"] = {**(data.get("select") or {}), "match": match}
        data["train"] = {**(data.get("train") or {}), "variant": variant, "seed": seed}
        if data.get("grpo") is not None:
            data["grpo"] = {**data["grpo"], "seed": seed}
        name = cell_name(teacher.label, student.label, variant, seed, match)
        try:
            config = validate(data)
        except ConfigError as error:
            raise ConfigError(f"cell {name}: {error}") from None
        out.append(Cell(teacher, student, variant, seed, match, config))
    return out


def plan(sweep: SweepConfig) -> tuple[list[Cell], dict[str, Node]]:
    """The cells and their stage graph (`graph`)."""
    all_cells = cells(sweep)
    return all_cells, graph(all_cells)


def graph(all_cells: list[Cell]) -> dict[str, Node]:
    """The stage graph, nodes in an order that respects `needs`: each cell walks the recipe
    (`w2sr.recipe`), its training stage for its own training set, and evaluates each model its
    report row compares once the stage that makes it is done."""
    nodes: dict[str, Node] = {}

    def add(node: Node, cell: Cell) -> str:
        node = nodes.setdefault(node.key, node)
        node.cells.append(cell.name)
        return node.key

    for cell in all_cells:
        cfg = cell.config
        made: dict[str, str] = {}  # stage name -> the key of this cell's node for it
        for stage in RECIPE:
            if stage.makes is None or not stage.asked(cfg):
                continue
            needs = tuple(made[name] for name in stage.needs if name in made)
            made[stage.name] = add(Node(stage.artifact(cfg).folder, stage.name, cfg, needs), cell)
        trained = {cell.student_label: made["train"]} if "train" in made else {}
        if "grpo" in made:
            trained["rl"] = made["grpo"]
        configured = ["teacher", "base"] if cfg.student is not None else ["teacher"]
        if cfg.rl is not None:  # an outside checkpoint, evaluated like the base it came from
            configured.append("rl")
        for label in [*configured, *trained]:
            folder = trained.get(label)
            needs = (folder,) if folder else ()
            add(Node(eval_key(cfg, label, folder), "eval", cfg, needs, label), cell)
    return nodes


def eval_key(cfg: ExperimentConfig, label: str, trained: str | None) -> str:
    """An evaluation node's key: the model's label and a hash of its results' fingerprints, so
    that cells evaluating one model under different settings (a student's overrides of `eval`)
    get a node each, and cells that share every result share the node. A trained model's
    results are named by its done record, which does not exist yet: its folder stands in."""
    if trained is None:
        tasks, _ = plan_tasks(cfg, labels=(label,))
        fingerprints = [task.fingerprint for task in tasks]
    else:
        model = Model(label, trained, trained)
        lineage = Lineage(cfg)
        fingerprints = [lineage.result(b, label, model.identity) for b in cfg.eval.benchmarks]
    return f"{layout.EVAL}/{label}/{layout.fingerprint({}, *sorted(fingerprints))}"


def is_complete(node: Node, run: RunDir) -> bool:
    """A stage whose done record matches, or a model with every benchmark result present."""
    cfg = node.config
    if node.command != "eval":
        artifact = _artifact(node)
        return run.done(artifact.folder, artifact.fingerprint) is not None
    models, _ = model_table(cfg)
    if node.label not in models:
        return False
    tasks, _ = plan_tasks(cfg, labels=(node.label,))
    return all(run.exists(*task.file) for task in tasks)


def skip_reason(node: Node, run: RunDir) -> str | None:
    """Why a node whose needs are done has nothing to do (`recipe.skip_reason`)."""
    return recipe.skip_reason(STAGES[node.command], node.config, run)


def _artifact(node: Node) -> Artifact:
    return STAGES[node.command].artifact(node.config)


def readiness(nodes: dict[str, Node], run: RunDir) -> dict[str, tuple[str, str | None]]:
    """Each node's state before anything runs, decided once for `--plan` and the runner:
    complete, skipped (with the reason) or to run. A node is complete only when every node it
    needs is complete too, so a stage redone upstream redoes what reads it."""
    out: dict[str, tuple[str, str | None]] = {}
    for key, node in nodes.items():  # needs come first
        needs = [out[n][0] for n in node.needs]
        if recipe.SKIPPED in needs:
            out[key] = (recipe.SKIPPED, "what it needs was skipped")
        elif all(state == recipe.COMPLETE for state in needs) and is_complete(node, run):
            out[key] = (recipe.COMPLETE, None)
        elif all(state == recipe.COMPLETE for state in needs) and (
            reason := skip_reason(node, run)
        ):
            out[key] = (recipe.SKIPPED, reason)
        else:
            out[key] = (recipe.TO_RUN, None)
    return out
