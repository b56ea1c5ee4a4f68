"""Experiment trackers: a learner's steps as they come, and a run's results where researchers
compare runs.

MLflow and W&B log a learner's steps (`Trackers`) when `train` or `grpo` names them. With MLflow,
each model's evaluation (pass@k per benchmark, pass@1's interval, the rates of responses without
an answer or cut short) and each student's RGR and cost go to that model's run: the training run
its stage logged to, named by the stage's fingerprint (`sft-<fp>`, `grpo-<fp>`), or, for a model
trained elsewhere (the teacher, the base student, an outside RL reference), a run of its own
named by its label and identity. A sweep logs a parent run named by its run dir, with a child
run per cell: its teacher, student, training set, seed and match as parameters, its accuracy,
RGR and cost as metrics, so that the teacher x student table can be built in MLflow's UI.
"""

from __future__ import annotations

import re
import time
from typing import Any

from w2sr.config import LearnerConfig

EXPERIMENT = "w2sr"


def check_trackers(learner: LearnerConfig, name: str) -> None:
    """A configured tracker must be installed: fail before any Ray work, not on rank 0 later.
    `name` is the learner's config key (`train` or `grpo`)."""
    import importlib.util

    for key, module in (("mlflow_tracking_uri", "mlflow"), ("wandb_project", "wandb")):
        if getattr(learner, key) and importlib.util.find_spec(module) is None:
            raise RuntimeError(
                f"{name}.{key} is set but {module} is not installed: pip install {module}"
            )


class Trackers:
    """MLflow and W&B through Ray Train's integrations (rank 0 logs, the others get no-ops).
    `params` are recorded with the run."""

    def __init__(self, learner: LearnerConfig, run_name: str, params: dict[str, Any]):
        self.mlflow = self.wandb = None
        if learner.mlflow_tracking_uri:
            from ray.air.integrations.mlflow import setup_mlflow

            self.mlflow = setup_mlflow(
                params,
                tracking_uri=learner.mlflow_tracking_uri,
                experiment_name=EXPERIMENT,
                run_name=run_name,
                create_experiment_if_not_exists=True,
            )
        if learner.wandb_project:
            from ray.air.integrations.wandb import setup_wandb

            self.wandb = setup_wandb(
                params, project=learner.wandb_project, name=run_name, id=run_name, resume="allow"
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


# --- results -----------------------------------------------------------------------------


def results_uri(config: dict[str, Any]) -> str | None:
    """Where a run's results go: the MLflow tracking URI its `train` section names, else its
    `grpo` section's (a config as written, so that a copied run dir still reports)."""
    for section in ("train", "grpo"):
        uri = (config.get(section) or {}).get("mlflow_tracking_uri")
        if uri:
            return str(uri)
    return None


def model_run_name(label: str, source: dict[str, Any]) -> str:
    """The MLflow run a model's results go to: its training run, else one named by label and
    identity (`source` as the evaluation summary gives it)."""
    if source.get("kind") == "trained":
        kind = "grpo" if str(source.get("stage") or "").startswith("rl/") else "sft"
        return f"{kind}-{source['fingerprint']}"
    return f"{label}-{source.get('identity') or 'unknown'}"


def log_evaluation(uri: str, summary: dict[str, Any]) -> None:
    """Each model's results of an evaluation summary, to the model's run."""
    runs = _Runs(uri)
    for label, model in summary["models"].items():
        metrics: dict[str, float] = {}
        for bench, result in model["results"].items():
            for k, value in result["pass@k"].items():
                metrics[f"{bench}/pass_at_{k}"] = value
            low, high = result["pass@1_ci"]
            metrics |= {f"{bench}/pass_at_1_ci_low": low, f"{bench}/pass_at_1_ci_high": high}
            for rate in ("no_answer", "truncated"):
                metrics[f"{bench}/{rate}"] = result[rate]
        name = model_run_name(label, model.get("source") or {})
        runs.log(name, metrics, {"w2sr.label": label})


def log_report(
    uri: str,
    sources: dict[str, dict[str, Any]],
    rgr: dict[str, dict[str, float | None]],
    rgr_ci: dict[str, dict[str, tuple[float, float] | None]],
    spent: dict[str, dict[str, float]],
) -> None:
    """Each student's RGR (per benchmark and averaged, with the average's interval) and each
    trained model's cost in worker-hours, to the model's run."""
    runs = _Runs(uri)
    for label in sorted(set(rgr) | set(spent)):
        metrics: dict[str, float] = {}
        for bench, value in (rgr.get(label) or {}).items():
            if value is not None:
                metrics["rgr" if bench == "avg" else f"{bench}/rgr"] = value
        interval = (rgr_ci.get(label) or {}).get("avg")
        if interval is not None:
            metrics |= {"rgr_ci_low": interval[0], "rgr_ci_high": interval[1]}
        for part, seconds in (spent.get(label) or {}).items():
            metrics[f"{part}_worker_hours"] = seconds / 3600
        if metrics:
            runs.log(model_run_name(label, sources[label]), metrics, {"w2sr.label": label})


def log_sweep(uri: str, name: str, cells: list[tuple[dict[str, str], dict[str, float]]]) -> None:
    """A sweep's parent run, and a child run per cell with its parameters and metrics."""
    runs = _Runs(uri)
    parent = runs.log(name, {}, {"w2sr.kind": "sweep"})
    for params, metrics in cells:
        cell = f"{name}/{params['cell']}"
        runs.log(cell, metrics, {"mlflow.parentRunId": parent, "w2sr.kind": "cell"}, params)


class _Runs:
    """Runs of the `w2sr` experiment found by name, made when missing."""

    def __init__(self, uri: str):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise RuntimeError(
                f"an MLflow tracking URI is set ({uri}) but mlflow is not installed: "
                "pip install mlflow"
            ) from None

        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment = (
            found.experiment_id if found else self.client.create_experiment(EXPERIMENT)
        )

    def log(
        self,
        name: str,
        metrics: dict[str, float],
        tags: dict[str, str],
        params: dict[str, str] | None = None,
    ) -> str:
        """Log to the latest run named `name` (a new one when there is none); its id."""
        from mlflow.entities import Metric, Param, RunTag

        quoted = name.replace("'", "\\'")
        found = self.client.search_runs(
            [self.experiment],
            filter_string=f"attributes.run_name = '{quoted}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = self.client.create_run(self.experiment, run_name=name).info.run_id
            self.client.set_terminated(run_id)
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(_key(k), float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        return run_id


def _key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, and _ - . / space)."""
    return re.sub(r"[^\w\-./ ]", "_", name)
