"""`w2sr gc RUN_DIR`: what no config refers to, listed, and removed only when asked.

Stages never delete finished work: a changed config writes new folders beside the old ones
(`w2sr.lineage`). This is where the old ones go. The configs kept are the run dir's
`config.yaml` (the latest command's) and any given with `--keep`; everything else under the
stage roots, every evaluation result those configs do not ask for (and the samples a killed
evaluation left for one), and temporary files left by killed writes are listed with their state
and size. A folder whose lease is live (a stage at work) is never touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from w2sr import layout, lineage
from w2sr.config import ExperimentConfig
from w2sr.evaluation.results import plan_tasks
from w2sr.rundir import DONE, LEASE, RunDir, lapsed

log = logging.getLogger(__name__)

TMP_GRACE_S = 3600.0  # a temporary file younger than this may belong to a write under way


@dataclass(frozen=True)
class Garbage:
    path: str  # relative to the run dir
    state: str  # "complete", "unfinished", "result" or "temporary"
    size: int  # bytes


def find_garbage(run: RunDir, configs: list[ExperimentConfig]) -> list[Garbage]:
    """Every stage folder, result file and stale temporary file that none of `configs` uses."""
    kept = {artifact.folder for cfg in configs for artifact in lineage.artifacts(cfg)}
    results = set()
    for cfg in configs:
        tasks, _ = plan_tasks(cfg)
        results |= {"/".join(task.parts) for task in tasks}
    out = []
    for folder in _stage_folders(run):
        if folder in kept:
            continue
        if run.exists(folder, LEASE) and not lapsed(run.read_json(folder, LEASE)):
            log.info("%s is being worked on; left alone", folder)
            continue
        state = "complete" if run.exists(folder, DONE) else "unfinished"
        out.append(Garbage(folder, state, run.size(folder)))
    summary = layout.EVAL_SUMMARY[-1]
    for label in [name for name in run.list(layout.EVAL) if name != summary]:
        for name in run.list(layout.EVAL, label, suffix=".parquet"):
            path = f"{layout.EVAL}/{label}/{name}"
            if path not in results:
                out.append(Garbage(path, "result", run.size(path)))
        for name in run.list(layout.EVAL, label, layout.PARTS):  # a killed evaluation's samples
            path = f"{layout.EVAL}/{label}/{layout.PARTS}/{name}"
            if f"{layout.EVAL}/{label}/{name}.parquet" not in results:
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


def _temporary_files(run: RunDir) -> list[tuple[str, int, float]]:
    selector = pafs.FileSelector(run.path(), recursive=True)
    prefix = run.path().rstrip("/") + "/"
    found = []
    for info in run.fs.get_file_info(selector):
        if ".tmp-" in info.base_name:
            path = info.path[len(prefix) :]
            found.append((path, run.size(path), info.mtime.timestamp() if info.mtime else 0.0))
    return found
