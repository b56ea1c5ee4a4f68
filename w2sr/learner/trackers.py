"""Experiment trackers: MLflow and W&B, when a learner's config names them."""

from __future__ import annotations

from typing import Any

from w2sr.config import LearnerConfig


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
                experiment_name="w2sr",
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
