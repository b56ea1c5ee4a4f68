"""Known failures end in one line that names the key and says what to do, before any work: a run
dir that cannot be written (a file in its way, a bucket that does not exist on a real S3 API) and
a Ray cluster that does not answer at the configured address."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from network import free_port
from test_generate import experiment

from w2sr.cli import main
from w2sr.config import ConfigError
from w2sr.recipe import EXIT_USAGE
from w2sr.session import check_reachable

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "jobs" / "demo.yaml"


def test_a_run_dir_with_a_file_in_its_way_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    run_dir = tmp_path / "file" / "run"
    assert main(["select", str(DEMO), f"run_dir={run_dir}"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"w2sr: run_dir: {run_dir} cannot be written: ")
    assert line.endswith("or the machine's role)")


def test_a_run_dir_in_a_bucket_that_does_not_exist_is_one_line(s3_bucket, capsys):
    run_dir = "s3://no-such-bucket/run"
    assert main(["select", str(DEMO), f"run_dir={run_dir}"]) == EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"w2sr: run_dir: {run_dir} cannot be written: ")
    assert "no-such-bucket" in line.split("cannot be written: ", 1)[1]


def test_a_cluster_that_does_not_answer_is_one_line_in_seconds():
    address = f"127.0.0.1:{free_port()}"
    start = time.time()
    with pytest.raises(ConfigError, match=rf"^ray.address: no Ray cluster answers at {address} "):
        check_reachable(address, "ray.address")
    assert time.time() - start < 10  # Ray itself retries for minutes


def test_a_stage_told_of_a_cluster_that_does_not_answer_ends_in_its_line(tmp_path, tiny_model):
    """As users run it, in a process of its own (one with a Ray session would not look)."""
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(experiment(tmp_path, tiny_model)))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "w2sr.cli", "generate", str(config), f"ray.address={address}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    started, line = done.stderr.splitlines()
    assert started.startswith("generate: started (log: ")
    assert line.startswith(f"w2sr: ray.address: no Ray cluster answers at {address} (")
