"""Ray Serve hosting: which models a config hosts, and served evaluation matching offline eval.

The agreement test runs the real stack twice on one tiny model: Ray Data + vLLM offline, then Ray
Serve LLM on 127.0.0.1 behind the OpenAI API, with greedy decoding; the two must write the same
responses token for token.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from artifacts import trained_student
from network import free_port

from w2sr import layout
from w2sr.config import ConfigError, JudgeConfig, validate
from w2sr.engines import settings as engines
from w2sr.engines.serve_app import llm_config
from w2sr.evaluation.endpoint import served_models
from w2sr.judge import CACHE as judge_cache
from w2sr.judge import judge_behaviors
from w2sr.lineage import Lineage
from w2sr.rundir import RunDir
from w2sr.stages.evaluate import evaluate
from w2sr.stages.serve import hosted_models

PROBLEMS = [f"What is {a} * {b}?" for a, b in [(2, 3), (4, 5), (6, 7), (8, 9), (3, 3)]]
KEY = "test-key-0123456789"


def experiment(tmp_path, model: str, **extra) -> dict:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"question": p, "answer": "6"}) + "\n" for p in PROBLEMS))
    return {
        "run_dir": str(tmp_path / "run"),
        "teacher": model,
        "eval": {
            "benchmarks": [{"name": "amc23", "path": str(path)}],
            "samples": 1,
            "sampling": {"temperature": 0, "max_tokens": 32},
            "engine": {"batch_size": 8, "max_model_len": 512},
        },
        **extra,
    }


def trained(data: dict, variant: str, model: str) -> str:
    """A student as the SFT stage leaves it: a model folder and its completion record."""
    folder = trained_student(validate(data), variant, wall_seconds=1.0)
    RunDir(data["run_dir"]).write_text(
        RunDir(model).read_text("config.json"), folder, "model", "config.json"
    )
    return folder


def test_default_hosts_every_trained_student_present(tmp_path, tiny_model):
    data = experiment(tmp_path, tiny_model, student=tiny_model)
    folder = trained(data, "all", tiny_model)
    trained(data, "incorrect", tiny_model)
    models = hosted_models(validate(data))
    assert [m.label for m in models] == ["w2sr", "w2sr_n"]
    assert models[0].spec == RunDir(data["run_dir"]).path(folder, "model")


def test_a_missing_or_unknown_model_fails_before_ray_starts(tmp_path, tiny_model):
    data = experiment(tmp_path, tiny_model, student=tiny_model)
    with pytest.raises(ValueError, match="no trained student"):
        hosted_models(validate(data))
    with pytest.raises(ValueError, match="w2sr_p.*not trained for this config yet"):
        hosted_models(validate({**data, "serve": {"models": ["w2sr_p"]}}))
    with pytest.raises(ValueError, match="nope.*not a label"):
        hosted_models(validate({**data, "serve": {"models": ["teacher", "nope"]}}))


def test_deployment_uses_the_engine_settings_and_scales_between_the_replica_bounds(
    tmp_path, tiny_model
):
    serve_cfg = {"engine": {"replicas": {"min": 1, "max": 3}, "max_model_len": 1024}}
    cfg = validate(experiment(tmp_path, tiny_model, serve={"models": ["teacher"], **serve_cfg}))
    config = llm_config(cfg, hosted_models(cfg)[0])
    assert config.model_id == "teacher"
    assert config.model_loading_config.model_source == tiny_model
    engine = cfg.serve.engine  # the offline stages' settings, from serve.engine
    assert config.engine_kwargs == engines.engine_kwargs(
        engine, use_gpu=False, trust_remote_code=False
    )
    assert config.engine_kwargs["max_model_len"] == 1024
    assert config.runtime_env == engines.engine_env(engine, use_gpu=False)
    assert config.placement_group_config == {"bundle_per_worker": {"CPU": 1}}
    scaling = config.deployment_config["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 3)


def publish_student(cfg) -> str:
    """The W2SR-N student of `cfg`, with the student's weights, as SFT publishes it in the run
    dir; its model folder's location."""
    run, student = RunDir(cfg.run_dir), Lineage(cfg).student("incorrect")
    with run.staged_folder(student.folder, layout.MODEL) as out:
        shutil.copytree(cfg.student, out, dirs_exist_ok=True)
    run.mark_done(student.folder, student.fingerprint)
    return run.location(student.folder, layout.MODEL)


def test_two_students_served_under_one_label_each_load_their_own_files(
    tmp_path, tiny_model, tiny_student, s3_bucket, monkeypatch
):
    """Serve LLM names its download of a store's model by the served label, so two students
    served as `w2sr_n` on a node would share one folder; the app's start-up hook loads the node
    copy named by the model's URI instead, whose fingerprinted folder names its content."""
    monkeypatch.setenv("W2SR_CACHE", str(tmp_path / "cache"))
    run_dir = f"{s3_bucket}/one-label-{uuid.uuid4().hex[:8]}"
    loaded = {}
    for student in (tiny_model, tiny_student):  # two configs of one run dir
        data = experiment(tmp_path, tiny_model, student=student, serve={"models": ["w2sr_n"]})
        cfg = validate({**data, "run_dir": run_dir})
        uri = publish_student(cfg)
        config = llm_config(cfg, hosted_models(cfg)[0])
        assert (config.model_id, config.model_loading_config.model_source) == ("w2sr_n", uri)
        hooks = config.callback_config
        hook = hooks.callback_class(llm_config=config, **hooks.callback_kwargs)
        asyncio.run(hook.run_callback("on_before_node_init"))  # as a replica starts its engine
        engine = config.get_engine_config()
        assert engine.mirror_config is None  # nothing left for Serve LLM to fetch by label
        loaded[student] = Path(engine.actual_hf_model_id)
    assert len(set(loaded.values())) == 2
    for student, folder in loaded.items():
        files = sorted(f.name for f in Path(student).iterdir())
        assert sorted(f.name for f in folder.iterdir()) == files
        for name in files:
            assert (folder / name).read_bytes() == (Path(student) / name).read_bytes(), name


async def load(url: str, clients: int) -> dict:
    """`clients` chat requests at once on loopback, each generating 128 tokens: status counts,
    latencies of the replies (the fastest is one whole generation), and the slowest 503."""
    body = {"model": "w2sr_n", "messages": [{"role": "user", "content": PROBLEMS[0]}]}
    body |= {"max_tokens": 128, "ignore_eos": True, "temperature": 0}

    async def one(client) -> tuple[int, float]:
        start = time.perf_counter()
        response = await client.post("/chat/completions", json=body)
        return response.status_code, time.perf_counter() - start

    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:
        results = await asyncio.gather(*(one(client) for _ in range(clients)))
    latencies = sorted(seconds for status, seconds in results if status == 200)
    shed = [seconds for status, seconds in results if status == 503]
    return {
        "status": dict(Counter(status for status, _ in results)),
        "p50_s": round(float(np.percentile(latencies, 50)), 3),
        "p99_s": round(float(np.percentile(latencies, 99)), 3),
        "fastest_s": round(latencies[0], 3),
        "max_503_s": round(max(shed), 3) if shed else None,
    }


def test_serving_beyond_loopback_needs_an_api_key(tmp_path, tiny_model, monkeypatch):
    from w2sr.stages.serve import serve

    monkeypatch.delenv("W2SR_API_KEY", raising=False)
    data = experiment(tmp_path, tiny_model, serve={"models": ["teacher"], "host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="serve.host: 0.0.0.0 would expose the API"):
        serve(validate(data), blocking=False)


def test_the_api_key_is_checked_on_every_request_and_required_on_a_cluster(monkeypatch):
    import hashlib

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from w2sr.engines.serve_app import BearerKey
    from w2sr.stages.serve import rayservice_app

    inner = Starlette(routes=[Route("/v1/models", lambda request: PlainTextResponse("ok"))])
    app = BearerKey(inner, key_sha256=hashlib.sha256(KEY.encode()).hexdigest())

    async def status(headers: dict) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.get("/v1/models", headers=headers)).status_code

    assert asyncio.run(status({"Authorization": f"Bearer {KEY}"})) == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        assert asyncio.run(status(headers)) == 401, headers
    monkeypatch.delenv("W2SR_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="W2SR_API_KEY is not set"):
        rayservice_app({"config": str(Path(__file__).parents[1] / "jobs" / "paper.yaml")})


@pytest.mark.slow
def test_served_and_offline_greedy_evaluation_agree(
    tmp_path, tiny_model, ray_session, monkeypatch, s3_bucket
):
    """Offline, the teacher from its folder; served, the same weights as a student published in
    a run dir on the loopback S3 server, which each Serve node copies under its URI. The keyed
    app is then neither replaced by a keyless one nor moved to another port."""
    from ray import serve as ray_serve

    from w2sr.models import ModelSpec
    from w2sr.stages.serve import serve

    offline_dir = tmp_path / "offline"
    offline_dir.mkdir()
    offline = evaluate(validate(experiment(offline_dir, tiny_model)))

    # The app answers only requests bearing the key; `w2sr eval --endpoint` sends it.
    monkeypatch.setenv("W2SR_API_KEY", KEY)
    port = free_port()
    # One replica that takes 2 requests at a time and queues 4 more: the load test's bound.
    hosting = {"models": ["w2sr_n"], "port": port, "max_ongoing_requests": 2}
    hosting["max_queued_requests"] = 4
    served = experiment(tmp_path, tiny_model, student=tiny_model, serve=hosting)
    served["run_dir"] = f"{s3_bucket}/served-{uuid.uuid4().hex[:8]}"
    cfg = validate(served)
    uri = publish_student(cfg)
    run = RunDir(cfg.run_dir)
    chat = {"model": "w2sr_n", "messages": [{"role": "user", "content": PROBLEMS[0]}]}
    try:
        info = serve(cfg, blocking=False)
        deployed_at = time.time()
        # The replica loaded the node copy named by the URI: a Ray worker finds it there, made
        # before the deployment returned.
        local = ray_session.remote(ModelSpec.local).options(num_cpus=0)
        copy = ray_session.get(local.remote(ModelSpec.parse(uri)))
        assert Path(copy).stat().st_mtime < deployed_at
        assert info["url"] == f"http://127.0.0.1:{port}/v1"
        moved = cfg.serve.model_copy(update={"port": port + 1})
        with pytest.raises(ConfigError, match=f"already listens on 127.0.0.1:{port}"):
            serve(cfg.model_copy(update={"serve": moved}), blocking=False)
        monkeypatch.delenv("W2SR_API_KEY")
        with pytest.raises(ConfigError, match=r"already serves \['w2sr'\] behind an API key"):
            serve(cfg, blocking=False)
        monkeypatch.setenv("W2SR_API_KEY", KEY)
        assert served_models(info["url"], cfg) == {"w2sr_n"}
        online = evaluate(cfg, endpoint=info["url"])
        refused = [
            httpx.request(method, f"{info['url']}/{path}", headers=headers, json=body).status_code
            for method, path, body in (("GET", "models", None), ("POST", "chat/completions", chat))
            for headers in ({}, {"Authorization": "Bearer wrong"})
        ]
        completion = httpx.post(
            f"{info['url']}/chat/completions",
            json=chat | {"max_tokens": 8, "temperature": 0},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        # within 2 ongoing + 4 queued, with room for a request of the phase before still ending
        under = asyncio.run(load(info["url"], clients=4))
        over = asyncio.run(load(info["url"], clients=48))
        # The served model as a behavior judge: its random replies do not parse, which is
        # counted, not raised. Two at a time, within the server's bound.
        judge = JudgeConfig(
            endpoint=info["url"], model="w2sr_n", api_key_env="W2SR_API_KEY", concurrency=2
        )
        responses = ["First, 2 * 3 = 6. Let me check: 6 / 3 = 2.", "Case 1: n = 2.", "Wait."]
        judged = judge_behaviors(responses, judge, run, seed=0)
    finally:
        ray_serve.shutdown()

    assert refused == [401, 401, 401, 401]
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] > 0, completion.text
    assert under["status"] == {200: 4}, under
    # Over the bound the server sheds load (503) and answers the rest. At once: each 503 came
    # back within a second and sooner than one generation, the fastest reply.
    assert set(over["status"]) == {200, 503} and over["status"][200] >= 6, over
    assert over["max_503_s"] < min(1.0, over["fastest_s"]), over
    print("load:", {"under": under, "over": over})
    assert judged["judged"] + judged["parse_failures"] + judged["errors"] == 3, judged
    assert judged["errors"] == 0, judged
    assert KEY not in run.read_text(*judge_cache)  # the replies, in the store, without the key

    assert (
        "not served" in online["skipped"]["base"]
    )  # the base student is neither cached nor served
    rows = {}
    for summary, label, run_dir in (
        (offline, "teacher", str(offline_dir / "run")),
        (online, "w2sr_n", cfg.run_dir),
    ):
        entry = summary["models"][label]["results"]["amc23"]
        rows[entry["backend"].split()[0]] = (
            RunDir(run_dir).read_parquet(*entry["file"].split("/")).to_pylist()
        )
    assert set(rows) == {"offline", "endpoint"}
    assert len(rows["offline"]) == len(rows["endpoint"]) == len(PROBLEMS)
    for here, there in zip(rows["offline"], rows["endpoint"], strict=True):
        assert here["prompt_id"] == there["prompt_id"]
        assert here["completion_tokens"] > 4
        assert here["response"] == there["response"]
        for key in ("prompt_tokens", "completion_tokens", "finish_reason", "correct"):
            assert here[key] == there[key], key
