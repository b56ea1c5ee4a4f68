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
def ray_session(s3_bucket):
    """The tests' Ray session, started after the S3 server so that its workers (Ray Train's
    storage, engines reading a student from the store) find it through their environment."""
    import ray

    from w2sr.session import start_local

    if not ray.is_initialized():
        # Workers' logs stay in Ray's session folder: printed here, they would arrive late, in
        # whichever later test is reading what a command printed.
        start_local(8, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}, log_to_driver=False)
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


@pytest.fixture(scope="session")
def s3_bucket():
    """A real S3 API on 127.0.0.1 (the dev extra's `moto_server`) with a fresh bucket; yields
    its `s3://` URI. The endpoint and test credentials are set in this process's environment,
    so pyarrow and the processes the tests start use that server and nothing else."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pyarrow.fs as pafs
    from network import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "moto_server did not start"
                time.sleep(0.2)
        fs, _ = pafs.FileSystem.from_uri("s3://w2sr-tests?allow_bucket_creation=true")
        fs.create_dir("w2sr-tests")
        yield "s3://w2sr-tests"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
