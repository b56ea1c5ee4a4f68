"""`w2sr gc RUN_DIR`: what nothing the run dir records refers to, listed, and removed only when
asked.

Stages never delete finished work: a changed config writes new folders beside the old ones
(`w2sr.lineage`). This is where the old ones go. What stays is decided by the lineage records:
every command that writes the run dir's `config.yaml` first writes `lineage.json`, the folders
and results its config refers to, and `w2sr sweep` writes `sweep/lineage.json` for all its cells.
Their identities were computed where the work ran: a hub id's revision as that machine's hub
cache resolved it, a built-in's digest as that machine built it. Recomputed elsewhere (a laptop,
a cleared cache) they could name folders that do not exist and leave real work unprotected, so
only configs given with `--keep` are computed here, and one that resolves to nothing here is
refused. A run dir written before these records falls back to its `config.yaml`, with a warning.

Everything else under the stage roots and `builtins/`, every evaluation result not kept (and the
samples or replies a killed evaluation left for one), and temporary files left by killed writes
are listed with their state and size. A folder whose lease is live (a stage or an evaluation at
work) is never touched.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig
from w2sr.evaluation.results import plan_tasks
from w2sr.lineage import Lineage
from w2sr.rundir import DONE, RunDir

log = logging.getLogger(__name__)

TMP_GRACE_S = 3600.0  # a temporary file younger than this may belong to a write under way


@dataclass(frozen=True)
class Record:
    """What configs refer to in a run dir, by path, as computed when they were recorded."""

    folders: frozenset[str] = frozenset()  # stage folders and published built-ins
    results: frozenset[str] = frozenset()  # evaluation result files
    # (label, folder) of trained models not finished when recorded: their results are named by
    # their done record, so they are known by the model their footer names (`write_result`).
    untrained: frozenset[tuple[str, str]] = frozenset()

    def __or__(self, other: Record) -> Record:
        return Record(
            self.folders | other.folders,
            self.results | other.results,
            self.untrained | other.untrained,
        )

    def to_json(self) -> dict:
        return {
            "folders": sorted(self.folders),
            "results": sorted(self.results),
            "untrained": sorted(list(pair) for pair in self.untrained),
        }

    @classmethod
    def from_json(cls, data: dict) -> Record:
        untrained = frozenset((label, folder) for label, folder in data["untrained"])
        return cls(frozenset(data["folders"]), frozenset(data["results"]), untrained)


def record(cfg: ExperimentConfig) -> Record:
    """What the config refers to, computed now, on this machine."""
    tasks, _ = plan_tasks(cfg)
    evaluated = {task.model.label for task in tasks}
    trained = Lineage(cfg).trained.items()
    return Record(
        frozenset(artifact.folder for artifact in Lineage(cfg).artifacts),
        frozenset("/".join(task.file) for task in tasks),
        frozenset((label, a.folder) for label, a in trained if label not in evaluated),
    )


def recorded(run: RunDir) -> Record | None:
    """The union of the run dir's lineage records (the latest command's and the sweep's); None
    when it has neither."""
    kept = None
    for parts in ((layout.LINEAGE,), layout.SWEEP_LINEAGE):
        if run.exists(*parts):
            found = Record.from_json(run.read_json(*parts))
            kept = found if kept is None else kept | found
    return kept


def computed(run: RunDir, cfg: ExperimentConfig, name: str) -> Record:
    """What a config given now refers to, computed on this machine; refused when none of its
    models' folders or results exists here (the problem set alone names no model)."""
    kept = record(cfg)
    problems = f"{layout.PROBLEMS}/"
    paths = [f for f in kept.folders if not f.startswith(problems)] + sorted(kept.results)
    if not any(run.exists(path) for path in paths):
        raise ConfigError(
            f"{name}: its models' folders and results resolve to nothing in {run.uri} (computed "
            "on this machine: does its hub or model cache differ from where it ran?)"
        )
    return kept


@dataclass(frozen=True)
class Garbage:
    path: str  # relative to the run dir
    state: str  # "complete", "unfinished", "result" or "temporary"
    size: int  # bytes


def find_garbage(run: RunDir, kept: Record) -> list[Garbage]:
    """Every stage folder, built-in, result file and stale temporary file that `kept` does not
    name."""
    out = []
    for folder in _stage_folders(run) + _builtin_folders(run):
        if folder in kept.folders:
            continue
        if _at_work(run, folder):
            continue
        state = "complete" if run.exists(folder, DONE) else "unfinished"
        out.append(Garbage(folder, state, run.size(folder)))
    summary = layout.EVAL_SUMMARY[-1]
    untrained: dict[str, list[str]] = {}
    for label, folder in kept.untrained:
        untrained.setdefault(label, []).append(f"/{folder}/{layout.MODEL}")
    labels = [name for name in run.list(layout.EVAL) if name != summary]
    for label in [label for label in labels if not _at_work(run, layout.eval_folder(label))]:
        waiting = tuple(untrained.get(label, ()))
        for name in run.list(layout.EVAL, label, suffix=".parquet"):
            path = f"{layout.EVAL}/{label}/{name}"
            if path not in kept.results and not (
                waiting and _model_of(run, path).endswith(waiting)
            ):
                out.append(Garbage(path, "result", run.size(path)))
        # What a killed evaluation left: its samples (offline) or replies (endpoint). Which model
        # they belong to is not written with them, so a label with a model not trained when
        # recorded keeps its own.
        left = [
            (f"{layout.PARTS}/{name}", name) for name in run.list(layout.EVAL, label, layout.PARTS)
        ]
        left += [
            (name, name.removesuffix(layout.EVAL_PARTIAL))
            for name in run.list(layout.EVAL, label, suffix=layout.EVAL_PARTIAL)
        ]
        for name, result in left:
            if f"{layout.EVAL}/{label}/{result}.parquet" not in kept.results and not waiting:
                path = f"{layout.EVAL}/{label}/{name}"
                out.append(Garbage(path, "unfinished", run.size(path)))
    gone = tuple(f"{g.path}/" for g in out)
    for path, size, mtime in _temporary_files(run):
        if not path.startswith(gone) and time.time() - mtime > TMP_GRACE_S:
            out.append(Garbage(path, "temporary", size))
    return out


def collect(run: RunDir, garbage: list[Garbage]) -> None:
    for item in garbage:
        run.delete(item.path)
        log.info("removed %s (%s, %d bytes)", item.path, item.state, item.size)


def _at_work(run: RunDir, folder: str) -> bool:
    """Whether a stage, or a model's evaluation, holds a live lease on the folder."""
    if run.lease(folder) is not None:
        log.info("%s is being worked on; left alone", folder)
        return True
    return False


def _model_of(run: RunDir, path: str) -> str:
    """The model a result file says it was made from (its Parquet footer)."""
    meta = pq.read_schema(run.path(path), filesystem=run.fs).metadata or {}
    return json.loads(meta.get(b"w2sr", b"{}")).get("spec", "")


def _stage_folders(run: RunDir) -> list[str]:
    """`<root>/<fingerprint>` for every stage root, `students/<variant>/<fingerprint>` for the
    students."""
    folders = []
    for root in layout.STAGE_ROOTS:
        for name in run.list(root):
            if root == layout.STUDENTS:
                folders += [f"{root}/{name}/{fp}" for fp in run.list(root, name)]
            else:
                folders.append(f"{root}/{name}")
    return folders


def _builtin_folders(run: RunDir) -> list[str]:
    names = run.list(layout.BUILTINS)
    return [
        layout.builtin(name, digest) for name in names for digest in run.list(layout.BUILTINS, name)
    ]


def _temporary_files(run: RunDir) -> list[tuple[str, int, float]]:
    selector = pafs.FileSelector(run.path(), recursive=True)
    prefix = run.path().rstrip("/") + "/"
    found = []
    for info in run.fs.get_file_info(selector):
        if ".tmp-" in info.base_name:
            path = info.path[len(prefix) :]
            found.append((path, run.size(path), info.mtime.timestamp() if info.mtime else 0.0))
    return found
