"""The models of a run by label: what evaluation, serving and reports find in a run directory.

The teacher and the base student come from the config, the W2SR, W2SR-P, W2SR-N and RL students
from the run dir once their stage has finished (the RL reference from the config instead when
`rl` names a published checkpoint), and `eval.models` adds extras.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from w2sr import layout
from w2sr.config import ExperimentConfig
from w2sr.identity import model_identity
from w2sr.lineage import Lineage
from w2sr.models import ModelSpec
from w2sr.rundir import DONE, RunDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    label: str
    spec: str  # a model spec (`models.ModelSpec`) or the run-dir folder of a trained model
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
    """A model named in the config, known by its identity (`identity.model_identity`)."""
    return Model(label, spec, model_identity(spec))


def parameter_count(spec: str) -> int | None:
    """Parameters of a model from its safetensors headers (a local folder or the hub cache),
    without loading weights; None when the files are not on this machine."""
    model = ModelSpec.parse(spec)
    folder = Path(model.local() if model.kind == "builtin" else spec).expanduser()
    if model.kind == "hub":
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
