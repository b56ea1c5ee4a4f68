"""Session-wide fixtures: one local Ray session and one set of tiny models for every test.

vLLM engines and Ray sessions take tens of seconds to start on a CPU, so tests share them.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tracker tests log to MLflow's file store (mlflow-skinny has no database backend).
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def pytest_collection_modifyitems(items):
    """Every test that needs the Ray session (vLLM engines, Ray Train, Serve) is `slow`, so
    `pytest -m "not slow"` runs the ones that start none."""
    for item in items:
        if "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer Qwen2 with a byte-level tokenizer and ChatML: the teacher of the tests."""
    from w2sr.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> str:
    """A second, wider tiny model, standing in for the strong student."""
    from w2sr.models import build_tiny_model

    path = tmp_path_factory.mktemp("models") / "student"
    return str(build_tiny_model(path, hidden_size=128, num_layers=3, num_heads=2, seed=1))
