"""The CPU side of benchmarks/gpu_check.sh: what it will run on a GPU is valid and fits one GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from w2sr.recipe import sections
from w2sr.session import resource_asks

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_every_gpu_path_has_a_check_and_the_config_turns_each_gpu_feature_on(tmp_path):
    path, cfg = gpu_check.prepare(tmp_path, cpu=False)
    assert path.exists()
    assert list(gpu_check.CHECKS) == list(gpu_check.PATHS)
    assert set(gpu_check.PATHS) == {"generate", "train", "grpo", "eval", "serve"}
    assert cfg.use_gpu and cfg.teacher == cfg.student == "builtin:smollm2-135m-instruct"
    for engine in (cfg.generation.engine, cfg.grpo.engine, cfg.eval.engine, cfg.serve.engine):
        assert engine.dtype == "bfloat16"
    for learner in (cfg.train, cfg.grpo):
        assert (learner.zero_stage, learner.bf16, learner.num_workers) == (3, True, 1)
    # colocated on a GPU: the engine sleeps while the learner updates; NCCL cannot join the two
    # processes on one device, so weights go through the object store
    assert (cfg.grpo.placement, cfg.grpo.weight_sync) == ("colocated", "object_store")
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.models == ["w2sr"]


def test_no_command_of_the_check_asks_for_more_than_one_gpu(tmp_path):
    _, cfg = gpu_check.prepare(tmp_path, cpu=False)
    for command in gpu_check.PATHS:  # each path is the command of its name
        for key, ask in resource_asks(cfg, sections(command)).items():
            assert ask["GPU"] <= 1, (command, key, ask)


def test_the_cpu_variant_runs_the_same_paths_without_a_gpu(tmp_path):
    _, gpu = gpu_check.prepare(tmp_path / "gpu", cpu=False)
    _, cpu = gpu_check.prepare(tmp_path / "cpu", cpu=True)
    assert not cpu.use_gpu and cpu.teacher == "builtin:tiny-random"
    assert cpu.generation.engine.dtype == "float32" and not cpu.train.bf16
    same = ("prompts", "select")
    assert [cpu.fields(name) for name in same] == [gpu.fields(name) for name in same]
    assert cpu.eval.benchmarks == gpu.eval.benchmarks and cpu.grpo.steps == gpu.grpo.steps


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has a GPU")
def test_the_script_says_when_no_gpu_is_visible(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert "no GPU is visible" in done.stderr
    assert not any(tmp_path.iterdir()), "nothing runs without a GPU"


def test_the_learner_check_runs_on_torch_and_transformers_alone_at_a_tiny_shape(tmp_path):
    """benchmarks/gpu_learner_check.py, as the GPU machine (torch and transformers, nothing of
    Ray, vLLM, DeepSpeed or w2sr's config) would run it, on CPU at a tiny shape."""
    out = tmp_path / "rows.jsonl"
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['gpu_learner_check.py', '--shape', 'tiny', '--device', 'cpu', "
        f"'--steps', '1', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_learner_check.py')!r}, "
        "run_name='__main__')\n"
        "print('LOADED', sorted({'ray', 'vllm', 'deepspeed', 'pydantic', 'w2sr.config'} "
        "& set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    checks = [r for r in rows if "check" in r]
    assert [r["check"] for r in checks] == ["sft w2sr_sample_sdpa", "grpo w2sr_sample_sdpa"]
    assert all(r["ok"] and r["loss"] == pytest.approx(r["plain_loss"], rel=1e-3) for r in checks)
    timings = [r for r in rows if "step" in r]
    variants = {(r["step"], r["checkpointing"], r["loss_path"]) for r in timings}
    assert len(timings) == len(variants) == 8
    assert all(r["tokens_per_second"] > 0 and r["mfu"] is None for r in timings)
