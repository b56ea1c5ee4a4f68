"""The experiment config: YAML, dotted overrides, and errors that name the key before Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from w2sr.config import ConfigError, load_config, parse_override, validate
from w2sr.layout import fingerprint

BASE = {"run_dir": "runs/x", "teacher": "some/model"}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_follow_the_paper():
    cfg = validate(BASE)
    assert cfg.template == "paper" and cfg.grader == "math"
    assert cfg.train.lr == 2e-5 and cfg.train.lr_scheduler == "cosine"
    assert cfg.train.warmup_ratio == 0.1 and cfg.train.global_batch_size == 128
    assert cfg.train.cutoff_len == 4096 and cfg.train.bf16
    assert cfg.trust_remote_code is False


def test_overrides_keep_yaml_types(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "generation.samples_per_prompt=8",
            "generation.sampling.temperature=0.5",
            "use_gpu=true",
            "generation.engine.replicas={min: 1, max: 4}",
            "prompts.source.type=file",
            "prompts.source.path=data/p.jsonl",
        ],
    )
    assert cfg.generation.samples_per_prompt == 8
    assert cfg.generation.sampling.temperature == 0.5
    assert cfg.use_gpu is True
    assert (cfg.generation.engine.replicas.min, cfg.generation.engine.replicas.max) == (1, 4)
    assert cfg.prompts.source.path == "data/p.jsonl"


def test_replicas_accept_a_fixed_count():
    cfg = validate({**BASE, "generation": {"engine": {"replicas": 3}}})
    assert (cfg.generation.engine.replicas.min, cfg.generation.engine.replicas.max) == (3, 3)


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({**BASE, "generaton": {}}, "generaton", "Extra inputs"),
        (
            {**BASE, "generation": {"samples_per_prompt": 0}},
            "generation.samples_per_prompt",
            "greater than 0",
        ),
        ({**BASE, "generation": {"samples_per_prompt": "many"}}, "samples_per_prompt", "integer"),
        ({**BASE, "generation": {"sampling": {"top_p": 1.5}}}, "generation.sampling.top_p", "1"),
        (
            {**BASE, "generation": {"engine": {"replicas": {"min": 3, "max": 2}}}},
            "generation.engine.replicas",
            "below min",
        ),
        (
            {**BASE, "train": {"global_batch_size": 10, "num_workers": 4}},
            "train",
            "not a multiple",
        ),
        ({**BASE, "template": "fancy"}, "template", "unknown"),
        ({**BASE, "grader": "vibes"}, "grader", "unknown"),
        ({"teacher": "m"}, "run_dir", "Field required"),
        ({**BASE, "prompts": {"source": {"type": "csv"}}}, "prompts.source", "type"),
        ({**BASE, "prompts": {"source": {"type": "file"}}}, "prompts.source.path", "required"),
        (
            {**BASE, "prompts": {"source": {"type": "benchmark", "name": "gsm8k", "levels": [3]}}},
            "prompts.source",
            "levels",
        ),
        (
            {**BASE, "prompts": {"source": {"type": "reasoning_gym", "task": "basic_arithmetc"}}},
            "prompts.source.task",
            "did you mean basic_arithmetic",
        ),
        (
            {
                **BASE,
                "prompts": {
                    "source": {
                        "type": "reasoning_gym",
                        "task_config": {"min_terms": 5, "max_terms": 2},
                    }
                },
            },
            "prompts.source.task_config",
            "max_terms must be >= min_terms",
        ),
        ({**BASE, "teacher": "builtin:nope"}, "teacher", "unknown built-in 'nope'"),
        ({**BASE, "student": "./no/such/folder"}, "student", "no model folder"),
        ({**BASE, "eval": {"models": {"mine": "/no/such/model"}}}, "eval.models.mine", "no model"),
        ({**BASE, "generation": {"engine": {"replicas": True}}}, "engine.replicas", "valid"),
        (
            {**BASE, "student": "s/m", "rl": "org/rl", "grpo": {}},
            "rl",
            "the grpo section trains one",
        ),
        ({**BASE, "rl": "org/rl"}, "rl", "needs the student"),
        ({**BASE, "student": "s/m", "rl": "./no/such/rl"}, "rl", "no model folder"),
        ({**BASE, "eval": {"greedy": ["nobody"]}}, "eval.greedy", "not a model of the run"),
        ({**BASE, "eval": {"protocol": "mine"}}, "eval.protocol", "simplerl_zoo"),
        (
            {**BASE, "eval": {"benchmarks": [{"name": "aime24", "samples": 2, "pass_k": [4]}]}},
            "eval.benchmarks.0.pass_k",
            "exceeds samples (2)",
        ),
        (
            {
                **BASE,
                "eval": {
                    "benchmarks": [
                        {"name": "minerva_math", "answer_field": "a", "solution_field": "s"}
                    ]
                },
            },
            "eval.benchmarks.0.solution_field",
            "not both",
        ),  # fmt: skip
        ({**BASE, "eval": {"benchmarks": [{"name": "khop", "path": "k.jsonl"}]}}, "khop", "built"),
        (
            {**BASE, "prompts": {"source": {"type": "benchmark", "name": "offline"}}},
            "prompts.source.name",
            "not a prompt source",
        ),
    ],
)
def test_invalid_configs_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as error:
        validate(data)
    message = str(error.value)
    assert key in message and words in message


@pytest.mark.parametrize("text", ["novalue", "=3", ""])
def test_malformed_overrides_are_refused(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_override_cannot_descend_into_a_value(tmp_path):
    with pytest.raises(ConfigError, match="not a section"):
        load_config(write(tmp_path, BASE), ["teacher.name=x"])


def test_fingerprint_changes_only_with_its_sections():
    a = validate(BASE)
    b = validate({**BASE, "train": {"lr": 1e-5}})
    c = validate({**BASE, "generation": {"samples_per_prompt": 2}})
    assert fingerprint(a.fields("generation")) == fingerprint(b.fields("generation"))
    assert fingerprint(a.fields("generation")) != fingerprint(c.fields("generation"))


def test_fingerprints_ignore_how_a_stage_runs():
    """More replicas, a bigger batch, another checkpoint cadence or failure budget resume the
    same work; a change to what comes out starts it over."""
    a = validate({**BASE, "grpo": {}})
    operational = validate(
        {
            **BASE,
            "generation": {"engine": {"replicas": {"min": 1, "max": 8}, "batch_size": 64}},
            "train": {"checkpoint_every": 7, "max_failures": 3, "gradient_checkpointing": True},
            "grpo": {"weight_sync": "collective", "num_to_keep": 5, "engine": {"replicas": 2}},
        }
    )
    for section in ("generation", "train", "grpo"):
        assert fingerprint(a.fields(section)) == fingerprint(operational.fields(section)), section
    for changed in (
        {"generation": {"engine": {"max_model_len": 1024}}},
        {"generation": {"sampling": {"temperature": 0.5}}},
        {"train": {"num_workers": 4, "micro_batch_size": 1}},
        {"grpo": {"lr": 1e-5}},
    ):
        section = next(iter(changed))
        assert fingerprint(a.fields(section)) != fingerprint(
            validate({**BASE, "grpo": {}, **changed}).fields(section)
        )


@pytest.mark.parametrize(
    ("command", "override", "key"),
    [
        ("train", "train.num_workers=16", "train.num_workers: needs 16 CPUs"),
        ("generate", "generation.engine.replicas={min: 3, max: 9}", "replicas.min: needs 6 CPUs"),
        ("run", "grpo.placement=separate", "grpo.num_workers: needs 10 CPUs"),
        ("train", "use_gpu=true", "train.num_workers: needs 2 GPUs at once"),
        (
            "eval",
            "eval.concurrent_models=6",
            "eval.concurrent_models x eval.engine.replicas.min: needs 6 CPUs",
        ),
    ],
)
def test_more_cpus_or_gpus_than_a_local_session_has_fail_before_ray_starts(
    tmp_path, command, override, key
):
    data = {**BASE, "run_dir": str(tmp_path / "run"), "ray": {"num_cpus": 5}}
    data["generation"] = {"engine": {"cpus_per_replica": 2}}
    data["grpo"] = {
        "num_workers": 2,
        "cpus_per_worker": 3,
        "engine": {"replicas": 2, "cpus_per_replica": 2},
    }
    cmd = [sys.executable, "-m", "w2sr.cli", command, str(write(tmp_path, data)), override]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=no_cluster())
    assert done.returncode == 2, done.stderr
    assert "the local Ray session is too small" in done.stderr and key in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"run_dir": "s3://AKIA123:secret@bucket/run"}, "run_dir"),
        ({"train": {"mlflow_tracking_uri": "https://me:pw@mlflow.example"}}, "train.mlflow"),
        ({"teacher": "s3://AKIA1:s3cret@bucket/teacher"}, "teacher"),
        ({"student": "s/m", "rl": "gs://u:tok@bucket/rl"}, "rl"),
        (
            {"prompts": {"source": {"type": "file", "path": "s3://k:s@b/p.jsonl"}}},
            "prompts.source.path",
        ),
        (
            {"eval": {"benchmarks": [{"name": "aime24", "path": "https://u:p@h/aime.jsonl"}]}},
            "eval.benchmarks.0.path",
        ),
        (
            {
                "report": {
                    "behaviors": "judge",
                    "judge": {"endpoint": "https://u:key@api.example/v1", "model": "m"},
                }
            },
            "report.judge.endpoint",
        ),  # fmt: skip
    ],
)
def test_credentials_in_a_config_are_refused(data, key):
    with pytest.raises(ConfigError, match=f"{key}.*holds credentials"):
        validate({**BASE, **data})
    validate({**BASE, "run_dir": "s3://bucket/run"})  # the same store, keys from the environment


@pytest.mark.parametrize(
    "uri",
    [
        "abfs://container@account.dfs.core.windows.net/runs/x",  # Azure: a container, no secret
        "hdfs://w2sr@namenode:8020/runs/x",  # HDFS: a user name, no secret
    ],
)
def test_a_user_name_alone_is_not_a_credential(uri):
    assert validate({**BASE, "run_dir": uri}).run_dir == uri


def no_cluster() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_cli_rejects_a_bad_config_before_ray_starts(tmp_path):
    path = write(tmp_path, {**BASE, "run_dir": str(tmp_path / "run")})
    cmd = [sys.executable, "-m", "w2sr.cli", "generate", str(path), "generation.sampling.top_p=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "generation.sampling.top_p" in done.stderr
    assert "ray" not in done.stderr.lower()
    assert not (tmp_path / "run").exists()


def test_the_simplerl_zoo_protocol_sets_its_evaluator_values_and_keys_given_override_them():
    """Base models greedy with one sample, others once at T 1.0 / top-p 0.95, AIME over 32
    samples, the standard grading policy; a key written in the config wins over the preset."""
    benchmarks = ["math500", "aime24", {"name": "gsm8k", "sampling": {"max_tokens": 99}}]
    cfg = validate(
        {
            **BASE,
            "student": "s/m",
            "eval": {"protocol": "simplerl_zoo", "benchmarks": benchmarks,
                     "sampling": {"max_tokens": 3000}},
        }
    )  # fmt: skip
    ev = cfg.eval
    math500, aime, gsm8k = ev.benchmarks
    sampled = ev.setting(aime, "w2sr")
    assert (sampled.samples, sampled.sampling.temperature, sampled.sampling.top_p) == (
        32,
        1.0,
        0.95,
    )
    assert sampled.ks == [1, 2, 4, 8, 16, 32] and not sampled.greedy
    assert sampled.sampling.max_tokens == 3000
    base = ev.setting(aime, "base")
    assert (base.samples, base.sampling.temperature, base.ks, base.greedy) == (1, 0.0, [1], True)
    assert ev.setting(math500, "rl").samples == 1
    # a benchmark's own sampling is merged over the section's
    assert ev.setting(gsm8k, "teacher").sampling.max_tokens == 99
    assert ev.setting(gsm8k, "teacher").sampling.temperature == 1.0
    assert cfg.eval_grading_policy == "standard" and cfg.grading_policy == "strict"

    mine = validate(
        {**BASE, "eval": {"protocol": "simplerl_zoo", "greedy": [], "grading_policy": "strict",
                          "benchmarks": [{"name": "aime24", "samples": 8}]}}
    )  # fmt: skip
    assert mine.eval.setting(mine.eval.benchmarks[0], "base").samples == 8
    assert mine.eval_grading_policy == "strict"
    plain = validate({**BASE, "eval": {"benchmarks": ["aime24"]}})
    assert plain.eval.setting(plain.eval.benchmarks[0], "base").samples == 4  # no protocol


def test_new_keys_at_their_default_leave_fingerprints_as_they_were():
    """Run dirs made before `train.reasoning` and the benchmark field mapping existed keep
    finding their artifacts; setting one of them makes new ones."""
    cfg = validate({**BASE, "prompts": {"source": {"type": "benchmark", "name": "math"}}})
    assert "reasoning" not in cfg.train.outcome()
    assert set(cfg.prompts.outcome()["source"]) == {"type", "name", "path", "split", "levels"}
    strip = validate({**BASE, "train": {"reasoning": "strip"}})
    assert strip.train.outcome()["reasoning"] == "strip"
    assert fingerprint(strip.fields("train")) != fingerprint(cfg.fields("train"))
    mapped = validate(
        {**BASE, "prompts": {"source": {"type": "benchmark", "name": "math", "path": "m.jsonl",
                                        "problem_field": "q"}}}
    )  # fmt: skip
    assert mapped.prompts.outcome()["source"]["problem_field"] == "q"
