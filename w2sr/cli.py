"""The `w2sr` command: one subcommand per stage, each taking a config file and dotted overrides.

    w2sr generate jobs/tiny.yaml generation.samples_per_prompt=8

The config is validated before anything starts, so a bad key costs a second, not a cluster.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import operator
import os
import sys
from typing import Any

import yaml

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig, load_config, validate
from w2sr.console import Console, StageFailed
from w2sr.layout import VARIANT_NAMES
from w2sr.models import ModelSpec
from w2sr.recipe import (
    EXIT_FAILED,
    EXIT_LEASE_HELD,
    EXIT_OK,
    EXIT_USAGE,
    RECIPE,
    RUN,
    STAGES,
    models,
    sections,
    skip_reason,
)
from w2sr.rundir import LeaseHeld, LeaseLost, RunDir, first_writes
from w2sr.session import check_local_resources
from w2sr.strict import first_line


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """What a stage's driver takes from its command's flags."""
    if args.command == "eval":
        labels = tuple(args.models.split(",")) if args.models else None
        return {"endpoint": args.endpoint, "labels": labels}
    if args.command == "serve":
        return {"blocking": not args.detach}
    return {}


def _log_name(name: str, cfg: ExperimentConfig, labels: tuple[str, ...] | None = None) -> str:
    """A stage's log file name: its folder's (the stage, its fingerprint) when it makes one, so
    that the stages a sweep runs at once write apart; an evaluation's, the models it
    evaluates."""
    stage = STAGES[name]
    if stage.makes is not None:
        return stage.artifact(cfg).folder  # `layout.stage_log` makes it a file name
    return "-".join([name, *(labels or ())])


def _run(cfg: ExperimentConfig, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """The recipe end to end (`recipe.RUN`): traces, the three training sets, a student on each
    non-empty set, the GRPO baseline when the config has a `grpo` section (at scale it costs far
    more than the rest together, so it is asked for, not implied), then every model on the
    benchmarks and the report. `--from STAGE` starts the recipe there, `--only STAGE` runs that
    stage alone (what it reads must be complete)."""
    first = RUN.index(args.only or args.start or RUN[0])
    wanted = [args.only] if args.only else list(RUN[first:])
    run = RunDir(cfg.run_dir)
    done: dict[str, Any] = {}
    for name in wanted:
        stage = STAGES[name]
        if not stage.asked(cfg):
            continue
        if not stage.per_variant:
            with console.stage(run, name, _log_name(name, cfg)):
                done[name] = stage.run(cfg)
            continue
        for variant in VARIANT_NAMES:
            train = cfg.train.model_copy(update={"variant": variant})
            one = cfg.model_copy(update={"train": train})
            reason = skip_reason(stage, one, run)
            if reason:
                logging.info("%s %s skipped: %s", name, variant, reason)
                console.say(f"{name} {variant}: skipped: {reason}")
                continue
            with console.stage(run, f"{name} {variant}", _log_name(name, one)):
                done[f"{name} {variant}"] = stage.run(one)
    return done


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2sr",
        description="Weak-to-Strong Reasoning on Ray: weak-teacher traces train a strong student.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="everything on the console: debug logging, the engines', workers' and libraries' "
        "output (by default in each stage's log file, logs/<stage>.log in the run dir)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the command's record as JSON when it ends"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_help = f"{', '.join(RUN)}, skipping complete stages and what the config does not ask for"
    for name, summary in [*((s.name, s.help) for s in RECIPE if s.command), ("run", run_help)]:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("config", help="experiment YAML (see jobs/)")
        sub.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. seed=1"
        )
        if name == "eval":
            sub.add_argument(
                "--endpoint", metavar="URL", help="an OpenAI-compatible server hosting the models"
            )
            sub.add_argument(
                "--models",
                metavar="LABEL,...",
                help="evaluate only these models (the summary is printed, not written)",
            )
        if name == "run":
            where = sub.add_mutually_exclusive_group()
            where.add_argument("--from", dest="start", choices=RUN, help="start the recipe here")
            where.add_argument("--only", choices=RUN, help="run this stage alone")
        if name == "serve":
            sub.add_argument(
                "--detach", action="store_true", help="leave the app running and return"
            )
    report = commands.add_parser(
        "report",
        help="write report.md and figures (RGR table) for a run, or a sweep of runs",
        description="write report.md and figures (RGR table) for a run, or a sweep of runs",
    )
    report.add_argument("run_dir", help="a run directory, or a folder of runs (one per teacher)")
    gc = commands.add_parser(
        "gc",
        help="list (and with --delete remove) what nothing the run dir records refers to",
        description="List the stage folders, published built-ins, evaluation results (and what "
        "killed evaluations left) and stale temporary files that nothing the run dir records "
        "refers to, nor a --keep config; remove them with --delete. The records are the latest "
        "command's lineage.json and a sweep's sweep/lineage.json, written with the identities "
        "(hub revisions, content digests) of the machine the work ran on, so gc gives the same "
        "answer from any machine. Nothing at work (a live lease) is listed.",
    )
    gc.add_argument("run_dir", help="a run directory")
    gc.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="CONFIG",
        help="an experiment config whose artifacts stay too, computed on this machine; refused "
        "when it resolves to nothing in the run dir (repeatable)",
    )
    gc.add_argument("--delete", action="store_true", help="remove what is listed")
    status = commands.add_parser(
        "status",
        help="every stage of a run or a sweep: done, running, failed or waiting",
        description="Every stage of the run dir's run (as `w2sr run` would run its config) or "
        "sweep, in the order a sweep starts them: done (its time and cost), running (its "
        "progress, since when and its owner), failed (the last line of its log), ready or "
        "waiting (on what), skipped (why); then the study's progress. Read from the run dir "
        "alone, while the work goes on or after it ended; starts nothing.",
    )
    status.add_argument("run_dir", help="a run directory, or a sweep's")
    status.add_argument("--json", action="store_true", help="the stages as JSON")
    stop = commands.add_parser(
        "stop",
        help="stop a running stage; a rerun resumes it",
        description="Stop the process that holds a stage's lease (as `w2sr status` names it), "
        "when it runs on this machine: SIGTERM, so that it ends its Ray workers. What it wrote "
        "stays, and the next run of its config resumes it.",
    )
    stop.add_argument("run_dir", help="a run directory, or a sweep's")
    stop.add_argument("stage", help="the stage's folder or evaluation, as `w2sr status` lists it")
    sweep = commands.add_parser(
        "sweep",
        help="run a study: teachers x students x training sets x seeds, each stage once",
        description="Plan a sweep as a graph of stages shared by its cells and run what is "
        "missing on one Ray cluster, then write the sweep report.",
    )
    sweep.add_argument("config", help="sweep YAML (see jobs/demo-sweep.yaml)")
    sweep.add_argument(
        "--plan", action="store_true", help="print the stage graph and what is complete; no Ray"
    )
    sweep.add_argument("--json", action="store_true", help="with --plan: the graph as JSON")
    return parser


def _sweep(args: argparse.Namespace) -> int:
    from w2sr.status import live
    from w2sr.sweep.config import load_sweep
    from w2sr.sweep.job import describe_plan, plan_table, sweep

    cfg = load_sweep(args.config)
    if args.plan:
        described = describe_plan(cfg)
        print(json.dumps(described, indent=2) if args.json else plan_table(described))
        return EXIT_OK
    with live(cfg.run_dir):  # on a terminal, the status table while it runs
        result = sweep(cfg)
    print(json.dumps(result, indent=2, default=str))
    return EXIT_FAILED if result["failed"] or result["blocked"] else EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from w2sr import status

    try:
        if args.command == "stop":
            print(status.stop(args.run_dir, args.stage))
            return EXIT_OK
        study = status.status(args.run_dir)
    except ConfigError as error:
        print(f"w2sr: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # it only reads the run dir
        print(f"w2sr: {args.run_dir} cannot be read: {first_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    print(status.as_json(study) if args.json else status.table(study))
    return EXIT_OK


def _gc(args: argparse.Namespace) -> int:
    from w2sr.gc import collect, computed, find_garbage, recorded

    run = RunDir(args.run_dir)
    kept = [found] if (found := recorded(run)) is not None else []
    if not kept and run.exists(layout.CONFIG):  # written before commands recorded lineage
        logging.warning(
            "%s has no %s: keeping what its %s refers to as computed on this machine",
            args.run_dir,
            layout.LINEAGE,
            layout.CONFIG,
        )
        own = validate(yaml.safe_load(run.read_text(layout.CONFIG)))
        kept.append(computed(run, own.model_copy(update={"run_dir": args.run_dir}), layout.CONFIG))
    for path in args.keep:
        cfg = load_config(path).model_copy(update={"run_dir": args.run_dir})
        kept.append(computed(run, cfg, f"--keep {path}"))
    if not kept:
        raise ConfigError(
            f"{args.run_dir} has no {layout.CONFIG}; name the configs to keep with --keep"
        )
    garbage = find_garbage(run, functools.reduce(operator.or_, kept))
    for item in garbage:
        print(f"{item.state:10} {item.size:>14,d}  {item.path}")
    total = sum(item.size for item in garbage)
    verb = "removed" if args.delete else "would be removed (pass --delete)"
    print(f"{len(garbage)} items, {total:,d} bytes {verb}")
    if args.delete:
        collect(run, garbage)
    return 0


def _record(cfg: ExperimentConfig) -> None:
    """The command's config, and first what it refers to, with identities as this machine
    resolves them now: `w2sr gc` keeps by this record and never recomputes it."""
    from w2sr.gc import record

    run = RunDir(cfg.run_dir)
    run.write_json(record(cfg).to_json(), layout.LINEAGE)
    run.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), layout.CONFIG)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command in ("status", "stop"):
        return _status(args)
    if args.command == "report":
        from w2sr.stages.report import report

        print(json.dumps(report(args.run_dir), indent=2, default=str))
        return EXIT_OK
    # A sweep's stages are commands of their own, each with its logs; a server logs as it serves.
    console = Console(args.verbose or args.command in ("gc", "sweep", "serve"))
    console.open()
    try:
        if args.command == "gc":
            return _gc(args)
        if args.command == "sweep":
            return _sweep(args)
        cfg = load_config(args.config, args.overrides)
        local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        if args.command == "serve" and args.detach and local:
            raise ConfigError(
                "ray.address: not set; --detach leaves the app in a running cluster, but a local "
                "session ends with this command (start one with `ray start --head`, or leave out "
                "--detach)"
            )
        if not (args.command == "eval" and args.endpoint):
            check_local_resources(cfg, sections(args.command))
            for key in models(args.command):
                if spec := getattr(cfg, key):
                    ModelSpec.parse(spec).check(key)
        with first_writes(cfg.run_dir):
            _record(cfg)
        if args.command == "run":
            result = _run(cfg, args, console)
        else:
            options = _options(args)
            name = args.command + (f" {cfg.train.variant}" if args.command == "train" else "")
            log_name = _log_name(args.command, cfg, options.get("labels"))
            with console.stage(RunDir(cfg.run_dir), name, log_name):
                result = STAGES[args.command].run(cfg, **options)
    except ConfigError as error:  # raised before any work that could be lost
        print(f"w2sr: {error}", file=console.err)
        return EXIT_USAGE
    except (LeaseHeld, LeaseLost) as error:  # another submission works (or took over) there
        print(f"w2sr: {error}", file=console.err)
        return EXIT_LEASE_HELD
    except StageFailed:  # the console has its error and the end of its log
        return EXIT_FAILED
    finally:
        console.close()
    if args.json or args.verbose:
        print(json.dumps(result, indent=2, default=str), file=console.out)
    elif args.command == "run" and "report" in result:
        print(_results_table(RunDir(cfg.run_dir)), file=console.out)
    return EXIT_OK


def _results_table(run: RunDir) -> str:
    """The report's first table (pass@1 and RGR per model) and where the report is: what a run
    comes to, on the console."""
    text = run.read_text(*layout.REPORT_FILE).split("## Results", 1)[-1]
    table = []
    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join([*table, "", f"report: {run.path(*layout.REPORT_FILE)}"])


if __name__ == "__main__":
    sys.exit(main())
