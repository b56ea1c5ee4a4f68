"""The models of a run by label: what evaluation, serving and reports find in a run directory.

The teacher and the base student come from the config, the W2SR, W2SR-P, W2SR-N and RL students
from the run dir once their stage has finished (the RL reference from the config instead when
`rl` names a published checkpoint), and `eval.models` adds extras.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.identity import model_identity
from w2sr.lineage import Lineage
from w2sr.models import download, resolve_model
from w2sr.rundir import DONE, RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    label: str
    spec: str  # a model spec (see models.resolve_model) or the run-dir folder of a trained model
    identity: str  # what the result cache knows the weights by
    done: dict | None = None  # the producing stage's completion record (its costs), if any


def model_table(cfg: ExperimentConfig) -> tuple[dict[str, Model], dict[str, str]]:
    """The run's models by label, and the labels left out with the reason (present-only)."""
    run = RunDir(cfg.run_dir, create=False)
    models: dict[str, Model] = {"teacher": _configured("teacher", cfg.teacher)}
    skipped: dict[str, str] = {}
    if cfg.student:
        models["base"] = _configured("base", cfg.student)
    else:
        for label in ["base", *layout.STUDENT_LABELS, "rl"]:
            skipped[label] = "no `student` in the config"
    trained = Lineage(cfg).trained
    if cfg.student and cfg.rl is not None:
        models["rl"] = _configured("rl", cfg.rl)
    elif cfg.student and "rl" not in trained:
        skipped["rl"] = "no `grpo` section or `rl` reference in the config"
    for label, artifact in trained.items():
        stage = artifact.folder
        done = run.done(stage, artifact.fingerprint)
        if done is None:
            skipped[label] = f"{stage}/{DONE} not found (not trained for this config yet)"
        elif not run.exists(stage, layout.MODEL, "config.json"):
            skipped[label] = f"{stage}/{layout.MODEL} has no config.json"
        else:
            spec = run.location(stage, layout.MODEL)
            models[label] = Model(label, spec, json.dumps(done, sort_keys=True), done)
    for label, spec in cfg.eval.models.items():
        models[label] = _configured(label, spec)
    for label, reason in skipped.items():
        log.debug("model %s skipped: %s", label, reason)
    return models, skipped


def _configured(label: str, spec: str) -> Model:
    """A model named in the config, known by its content or resolved revision."""
    return Model(label, spec, model_identity(spec))


def published(spec: str, run: RunDir) -> str:
    """What every node of the cluster loads for a model spec of the config. A built-in is built
    on this machine and, when the run dir is in object storage, published there once
    (`builtins/<name>/<content digest>`), so that every node reads the same files instead of
    building its own; anything else is the resolved spec."""
    local = resolve_model(spec)
    if not spec.startswith("builtin:") or isinstance(run.fs, pafs.LocalFileSystem):
        return local
    digest = model_identity(spec)
    folder = layout.builtin(spec.removeprefix("builtin:"), digest)
    if run.done(folder, digest) is None:
        # The folder is named by its content, so stages publishing it at once write the same
        # bytes, file over file; none deletes anything, so a stage loading what another has
        # finished never misses a file. The done record, written last, makes it trusted.
        target = run.path(folder, layout.MODEL)
        run.fs.create_dir(target, recursive=True)
        pafs.copy_files(local, target, destination_filesystem=run.fs)
        run.mark_done(folder, digest, spec=spec)
    return run.location(folder, layout.MODEL)


def model_path(model: Model, run: RunDir) -> str:
    """What vLLM opens: a trained model's run-dir location as it is (an object-store URI is
    downloaded by each node's engine), else the published spec."""
    return model.spec if "://" in model.spec else published(model.spec, run)


def local_model(model: Model) -> str:
    """A folder on this machine with the model's files, for what reads them in this process (a
    tokenizer): a model in object storage is copied once into the cache, under a name made from
    its identity, so new weights at the same URI are copied again."""
    if "://" not in model.spec:
        return resolve_model(model.spec)
    return download(model.spec, hashlib.sha256(model.identity.encode()).hexdigest()[:16])


def parameter_count(spec: str) -> int | None:
    """Parameters of a model from its safetensors headers (a local folder or the hub cache),
    without loading weights; None when the files are not on this machine."""
    folder = Path(spec).expanduser()
    if spec.startswith("builtin:"):
        folder = Path(resolve_model(spec))
    elif not folder.is_dir() and "://" not in spec:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # not cached, or not a hub id
            return None
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as stream:
            (size,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(size))
        total += sum(int(np.prod(t["shape"])) for k, t in header.items() if k != "__metadata__")
    return total
