"""The recipe and the lineage as declarations: what each config field decides, and the stage
table that the command line, `w2sr run` and the sweep walk."""

from __future__ import annotations

import copy
import typing

import pytest
from pydantic import BaseModel, ValidationError

from w2sr import config as config_module
from w2sr.config import ExperimentConfig, Strict, validate
from w2sr.lineage import DECIDES, OPERATIONAL, Lineage
from w2sr.recipe import RECIPE, RUN, STAGES, sections

ARTIFACTS = tuple(DECIDES)


def _models(annotation) -> list[type[BaseModel]]:
    """The config classes an annotation holds (through Optional, unions, lists and dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _leaves(model: type[BaseModel], prefix: str = "") -> dict[str, list[type[BaseModel]]]:
    """Every field path of a config class, with the classes that own each step of it."""
    out: dict[str, list[type[BaseModel]]] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner = _models(field.annotation)
        if not inner:
            out[path] = [model]
        for sub in inner:
            for leaf, owners in _leaves(sub, f"{path}.").items():
                out[leaf] = [model, *owners]
    return out


def _covers(key: str, path: str) -> bool:
    return path == key or path.startswith(f"{key}.")


def declared_roles() -> dict[str, str]:
    """Each field's role as `lineage.DECIDES`, `lineage.OPERATIONAL` and the config classes'
    OPERATIONAL sets declare it: the artifacts it decides, or `operational`; `undeclared` when
    nothing says."""
    roles = {}
    for path, owners in _leaves(ExperimentConfig).items():
        parts = path.split(".")
        # a field its class marks OPERATIONAL, at any depth, decides nothing
        marked = any(
            issubclass(owner, Strict) and part in owner.OPERATIONAL
            for owner, part in zip(owners, parts, strict=False)
        )
        keys = [k for keys in DECIDES.values() for k in keys] + list(OPERATIONAL)
        best = max((k for k in keys if _covers(k, path)), key=len, default=None)
        if marked or best in OPERATIONAL:
            roles[path] = "operational"
        elif best is None:
            roles[path] = "undeclared"
        else:
            deciding = [a for a in ARTIFACTS if any(_covers(k, path) for k in DECIDES[a])]
            roles[path] = ",".join(deciding)
    return roles


# A config with every section present, so that each field can be changed and watched.
FULL = {
    "run_dir": "runs/roles",
    "teacher": "org/teacher",
    "student": "org/student",
    "grpo": {"steps": 2},
    "thinking": True,
    "prompts": {"source": {"type": "reasoning_gym", "task": "basic_arithmetic", "size": 16}},
    "eval": {
        "benchmarks": [
            {"name": "math500", "limit": 8, "sampling": {"temperature": 0.6}},
            {"name": "offline"},
        ],
        "models": {"extra": "org/extra"},
        "greedy": ["base"],
    },
    "report": {"behaviors": "judge", "judge": {"endpoint": "http://127.0.0.1:1", "model": "j"}},
}


def _signature(cfg: ExperimentConfig) -> dict[str, object]:
    """What each artifact's fingerprint holds besides the artifacts it reads."""
    lin = Lineage(cfg)
    out: dict[str, object] = {name: lin.fields(name) for name in ARTIFACTS if name != "result"}
    specs = {"teacher": cfg.teacher, "base": cfg.student, "rl": cfg.rl, **cfg.eval.models}
    # the problems a benchmark is decontaminated against are an input, like a stage's inputs
    out["result"] = {
        (label, bench.name): (
            spec,
            {
                **(f := lin.result_fields(bench, label)),
                "decontaminated_against": bool(f["decontaminated_against"]),
            },
        )
        for label, spec in {**specs, "w2sr": None}.items()
        for bench in cfg.eval.benchmarks
    }
    return out


def _get(data, parts):
    for part in parts:
        data = data[0] if isinstance(data, list) else data
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _set(data, parts, value):
    """Set a field in a config as written, adding the sections on its way (keys left out
    keep their defaults, which a protocol may set)."""
    for part in parts[:-1]:
        data = data[0] if isinstance(data, list) else data
        data = data.setdefault(part, {})
    (data[0] if isinstance(data, list) else data)[parts[-1]] = value


# Values to try where the type alone does not say which are valid.
ALTERNATIVES = {
    "template": ["plain"],
    "grader": ["exact"],
    "eval.benchmarks.name": ["gsm8k"],
    "eval.benchmarks.pass_k": [[1, 2]],
    "eval.pass_k": [[1, 2]],
    "eval.greedy": [["base", "teacher"]],
    "eval.models": [{"extra": "org/other"}],
    "serve.models": [["w2sr"]],
}


def _other_values(value, annotation) -> list:
    """Values to try in place of `value` for a field of this annotation."""
    literals = [a for a in typing.get_args(annotation) if isinstance(a, str)]
    for arg in typing.get_args(annotation):
        literals += [a for a in typing.get_args(arg) if isinstance(a, str)]
    if literals:
        return [choice for choice in literals if choice != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, value - 1]
    if isinstance(value, float):
        return [value + 0.01, value * 0.5]
    if isinstance(value, str):
        return [f"{value}x", "org/other"]
    if value is None:
        return [True, 1, 0.5, "org/other", "x"]
    return []


def changed_roles() -> tuple[dict[str, str], list[str]]:
    """Each field of FULL changed in turn: the artifacts whose fields changed. Also the fields
    that could not be changed here (lists, maps, fields of a source type not in use)."""
    base_cfg = validate(copy.deepcopy(FULL))
    base_data = base_cfg.model_dump(mode="json")
    before = _signature(base_cfg)
    roles, untried = {}, []
    for path, owners in _leaves(ExperimentConfig).items():
        parts = path.split(".")
        field = owners[-1].model_fields[parts[-1]]
        value = _get(base_data, parts)
        absent = value is None and _get(base_data, parts[:-1]) is None
        if path not in ALTERNATIVES and (absent or isinstance(value, list | dict)):
            untried.append(path)
            continue
        others = ALTERNATIVES.get(path) or _other_values(value, field.annotation)
        for (
            other
        ) in others:  # the first value that changes anything  # the first value that changes any
            data = copy.deepcopy(FULL)
            _set(data, parts, other)
            try:
                cfg = validate(data)
            except (config_module.ConfigError, ValidationError):
                continue
            after = _signature(cfg)
            roles[path] = ",".join(a for a in ARTIFACTS if after[a] != before[a]) or "operational"
            if roles[path] != "operational":
                break
        if path not in roles:
            untried.append(path)
    return roles, untried


def test_every_config_field_has_a_declared_role():
    """A field that decides an artifact without being declared would let a changed config
    reuse stale work; one declared but not read would redo work for nothing."""
    roles = declared_roles()
    assert [path for path, role in roles.items() if role == "undeclared"] == []


def test_what_each_field_changes_is_what_is_declared():
    declared = declared_roles()
    observed, untried = changed_roles()
    wrong = {p: (declared[p], seen) for p, seen in observed.items() if declared[p] != seen}
    assert wrong == {}, "\n".join(f"{p}: declared {d}, changes {s}" for p, (d, s) in wrong.items())
    assert len(observed) > 150, untried  # the check reaches nearly every field


def test_the_recipe_runs_each_stage_after_what_it_reads_and_every_driver_exists():
    import importlib

    order = [stage.name for stage in RECIPE]
    for stage in RECIPE:
        assert all(order.index(need) < order.index(stage.name) for need in stage.needs)
        module, function = stage.driver.split(":")
        assert callable(getattr(importlib.import_module(module), function)), stage.driver
    assert RUN == ("generate", "select", "train", "grpo", "eval", "report")


def test_the_command_line_has_a_command_per_stage(capsys):
    from w2sr.cli import build_parser

    parser = build_parser()
    for stage in RECIPE:
        with pytest.raises(SystemExit):
            parser.parse_args([stage.name, "--help"])
        assert stage.help in capsys.readouterr().out
    args = parser.parse_args(["run", "job.yaml", "--from", "train"])
    assert args.start == "train"
    assert sections("run") == ("generation", "train", "grpo", "eval")


def test_a_training_stage_with_an_empty_set_is_skipped_by_the_recipe(tmp_path):
    from w2sr import layout
    from w2sr.recipe import skip_reason
    from w2sr.rundir import RunDir

    cfg = validate({**copy.deepcopy(FULL), "run_dir": str(tmp_path)})
    run, sets = RunDir(cfg.run_dir), Lineage(cfg).sft
    train = STAGES["train"]
    assert skip_reason(train, cfg, run) is None  # nothing selected yet: the driver says so
    counts = {"all": {"traces": 3}, "correct": {"traces": 0}, "incorrect": {"traces": 3}}
    run.write_json(counts, sets.folder, layout.SFT_SUMMARY)
    run.mark_done(sets.folder, sets.fingerprint)
    assert skip_reason(train, cfg, run) is None
    correct = cfg.model_copy(update={"train": cfg.train.model_copy(update={"variant": "correct"})})
    assert skip_reason(train, correct, run) == "the correct training set is empty"
    assert all(skip_reason(STAGES[n], correct, run) is None for n in STAGES if n != "train")
    # what each stage makes is the lineage's folder for the config
    assert train.artifact(correct) == Lineage(correct).student("correct")
    assert STAGES["generate"].artifact(cfg) == Lineage(cfg).traces


def test_the_demo_sweeps_plan_builds_no_model_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """`--plan` with no model built yet: the built-ins are known by their builders' source, so
    nothing is built, fetched or written; a table for people, JSON with --json."""
    import json
    from pathlib import Path

    import yaml

    from w2sr.cli import main

    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jobs = Path(__file__).parents[1] / "jobs"
    sweep = yaml.safe_load((jobs / "demo-sweep.yaml").read_text())
    sweep |= {"base": str(jobs / sweep["base"]), "run_dir": str(tmp_path / "runs" / "sweep")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(path), "--plan"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["STAGE", "COMMAND", "STATE", "CELLS"]
    assert table[-1] == "39 stages for 12 cells: 0 complete, 0 skipped, 39 to run"
    assert main(["sweep", str(path), "--plan", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed["stages"]) == listed["to_run"] == 39 and len(listed["cells"]) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # no cache, no run dir
