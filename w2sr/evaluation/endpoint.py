"""Evaluation through an OpenAI-compatible endpoint (`w2sr serve`, or any server that hosts the
models under their labels): requests go out with bounded concurrency, time-outs and retries.

Prompts are the run's template messages; the server applies the model's chat template (with
`enable_thinking` when the config's `thinking` is set). The server's prompt text is not seen here,
so a response is stored as the server returns it, without a `<think>` its chat template may have
prefilled. A benchmark's replies are saved as they arrive in a `.partial.json` beside its
result, so one that loses requests or is killed keeps them, and a rerun asks only for the rest.

The URL is recorded with each result, so it may carry no credentials, and the API key (from the
variable `eval.endpoint.api_key_env` names) goes only over https or to this machine's loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import re
import time
from urllib.parse import urlsplit

from tqdm import tqdm

from w2sr import layout
from w2sr.config import ConfigError, ExperimentConfig
from w2sr.console import progress
from w2sr.data.templates import TEMPLATES
from w2sr.evaluation.problems import Problems
from w2sr.evaluation.results import Task, sample_rows, scorer, write_result
from w2sr.rundir import RunDir
from w2sr.schemas import TOO_LONG

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
SAVE_EVERY_S = 2.0  # how often the replies so far are saved
_TOO_LONG_MESSAGE = re.compile(r"maximum (?:context|model) length|longer than the maximum", re.I)


def api_base(endpoint: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` all name the same server."""
    return re.sub(r"/v1/?$", "", endpoint.rstrip("/"))


def endpoint_key(endpoint: str, cfg: ExperimentConfig) -> str | None:
    """The API key for `--endpoint` (see `bearer_key`)."""
    return bearer_key(endpoint, "--endpoint", cfg.eval.endpoint.api_key_env)


def bearer_key(url: str, name: str, env: str) -> str | None:
    """The API key in `env` (none when unset), once `url` (the setting `name`) is known to be a
    URL that may be recorded and a place the key may go: raises ConfigError, before any request,
    for a URL holding credentials, a query or a fragment, and for a key bound for plain http off
    loopback. The messages never repeat the URL, which may hold a secret."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        hostname = None
    if not hostname or parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name}: not an http(s) URL; give one like http://host:8000/v1")
    if "@" in parts.netloc:
        raise ConfigError(
            f"{name}: holds credentials, which would be recorded with every result; give the "
            f"key through the environment variable {env} instead"
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{name}: takes no query or fragment (they would be recorded with every result); "
            f"give the server's base URL, and a key through the environment variable {env}"
        )
    key = os.environ.get(env) or None
    if key and parts.scheme == "http" and not _loopback(hostname):
        raise ConfigError(
            f"{name}: {hostname} would receive the key in {env} in clear over http; "
            "use https, or a server on this machine's loopback"
        )
    return key


def _loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1; any other name may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _headers(endpoint: str, cfg: ExperimentConfig) -> dict[str, str]:
    key = endpoint_key(endpoint, cfg)
    return {"Authorization": f"Bearer {key}"} if key else {}


class EndpointError(RuntimeError):
    """A request the server refused for good, or that failed after every retry."""


def served_models(endpoint: str, cfg: ExperimentConfig) -> set[str]:
    """The model ids the server lists at /v1/models."""
    import httpx

    headers = _headers(endpoint, cfg)
    url = f"{api_base(endpoint)}/v1/models"
    try:
        response = httpx.get(url, headers=headers, timeout=cfg.eval.endpoint.timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise EndpointError(f"cannot list the models at {url}: {error}") from error
    return {card["id"] for card in response.json()["data"]}


async def chat_completion(client, body: dict, retries: int, backoff_s: float) -> dict:
    """One chat completion, retried with jittered exponential back-off on transient failures."""
    import httpx

    for attempt in range(retries + 1):
        try:
            response = await client.post("/v1/chat/completions", json=body)
        except (httpx.TimeoutException, httpx.TransportError) as error:
            failure = f"{type(error).__name__}: {error}"
        else:
            if response.status_code == 200:
                return response.json()
            if response.status_code == 400 and _TOO_LONG_MESSAGE.search(response.text):
                return {"too_long": True}
            if response.status_code not in _RETRY_STATUS:
                raise EndpointError(f"HTTP {response.status_code}: {response.text[:500]}")
            failure = f"HTTP {response.status_code}: {response.text[:200]}"
        if attempt < retries:
            await asyncio.sleep(min(30.0, backoff_s * 2.0**attempt) * (0.5 + random.random()))
    raise EndpointError(f"{body['model']}: failed after {retries + 1} attempts; last: {failure}")


async def evaluate_endpoint(
    cfg: ExperimentConfig,
    run: RunDir,
    todo: list[Task],
    problems: dict[str, Problems],
    endpoint: str,
) -> None:
    """Evaluate one model (every task of `todo` is the same model's) on its benchmarks, one
    request per sample at each benchmark's setting."""
    import httpx

    ep = cfg.eval.endpoint
    # vLLM's server passes `chat_template_kwargs` on to the model's chat template
    thinking = {"chat_template_kwargs": {"enable_thinking": cfg.thinking}}
    extra = {} if cfg.thinking is None else thinking
    template = TEMPLATES[cfg.template]
    label = todo[0].model.label
    score = scorer(cfg, label)
    gate = asyncio.Semaphore(ep.concurrency)
    limits = httpx.Limits(max_connections=ep.concurrency, max_keepalive_connections=ep.concurrency)
    headers = _headers(endpoint, cfg)
    async with httpx.AsyncClient(
        base_url=api_base(endpoint), headers=headers, timeout=ep.timeout_s, limits=limits
    ) as client:

        async def complete(sample: dict, task: Task, counted: list[int], bar: tqdm) -> dict:
            sampling = task.setting.sampling
            body = {
                "model": label,
                "messages": template.messages(sample["problem"]),
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens,
                "seed": sample["seed"],
                "n": 1,
                **extra,
            }
            async with gate:
                reply = await chat_completion(client, body, ep.retries, ep.backoff_s)
            counted[0] += 1
            bar.update(1)
            if counted[0] % max(1, counted[1] // 10) == 0:  # every tenth
                log.info("%s: %d of %d completions", label, *counted)
            if reply.get("too_long"):
                return {**sample, "response": "", "finish_reason": TOO_LONG}
            choice, usage = reply["choices"][0], reply.get("usage") or {}
            return {
                **sample,
                "response": choice["message"].get("content") or "",
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "finish_reason": "length" if choice.get("finish_reason") == "length" else "stop",
            }

        async def one_benchmark(task: Task) -> None:
            # Replies are saved as they arrive: an attempt that lost some requests, or was
            # killed, leaves them here for a rerun, which asks only for the rest.
            partial = layout.eval_partial(task.model.label, task.bench.name, task.fingerprint)
            replies = run.read_json(*partial) if run.exists(*partial) else []
            have = {(r["prompt_id"], r["sample_index"]) for r in replies}
            posed = problems[task.bench.name]
            samples = [
                s
                for s in sample_rows(cfg, task, posed)
                if (s["prompt_id"], s["sample_index"]) not in have
            ]
            counted, saved = [0, len(samples)], [time.monotonic()]
            log.info("%s on %s: %d requests", label, task.bench.name, len(samples))

            async def kept(sample: dict, bar: tqdm) -> None:
                replies.append(await complete(sample, task, counted, bar))
                if time.monotonic() - saved[0] > SAVE_EVERY_S:
                    run.write_json(replies, *partial)
                    saved[0] = time.monotonic()

            with progress(len(samples), "requests", f"{label} on {task.bench.name}") as bar:
                asked = (kept(s, bar) for s in samples)
                results = await asyncio.gather(*asked, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                run.write_json(replies, *partial)
                if not isinstance(failures[0], EndpointError):
                    raise failures[0]
                raise EndpointError(
                    f"{label} on {task.bench.name}: {len(failures)} of {len(samples)} requests "
                    f"failed (first: {failures[0]}); the {len(replies)} replies are kept in "
                    f"{run.path(*partial)} and a rerun asks only for the rest"
                )
            graded = await asyncio.to_thread(list, map(score, replies))  # may take seconds
            write_result(cfg, run, task, posed, graded, f"endpoint {api_base(endpoint)}")
            run.delete(*partial)

        for task in todo:  # benchmark by benchmark, so a failure keeps the finished ones
            await one_benchmark(task)
