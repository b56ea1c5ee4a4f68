"""Cognitive behaviors labelled by a judge model, as SimpleRL-Zoo's behavior analysis does.

`w2sr.behaviors` counts English phrase markers; SimpleRL-Zoo has a strong model read each
response instead, so its rates are only comparable with rates measured that way. Here a chat model
behind an OpenAI-compatible endpoint (one served by `w2sr serve`, or a hosted API) reads a
seeded sample of a model's responses, one request per response with the fixed `JUDGE_PROMPT`, and
replies with a count per behavior: the same four behaviors, named as in `w2sr.behaviors`.

Counts rather than yes/no, because `summarize_behaviors` reports both a mean count per response
and the share of responses with at least one: a count gives both (the share is what SimpleRL-Zoo
plots, the mean what Gandhi et al. count), a yes/no only the share.

Replies are cached in the run dir (`report/judge/labels.jsonl`) under the response's sha256, the
judge (endpoint, model, reply budget) and `PROMPT_VERSION`, so a rerun asks nothing twice. A
reply that does not parse is cached and counted as a parse failure; a request that fails is
counted as an error, and asked again by the next run. Neither is counted as zero: the shares are
over the parsed replies.

The API key comes only from the environment variable that `api_key_env` names, is never written
anywhere, and is never sent over plain http to a host other than this machine's loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import time
from typing import Any

from w2sr import layout
from w2sr.behaviors import BEHAVIORS
from w2sr.config import JudgeConfig
from w2sr.evaluation.endpoint import (
    SAVE_EVERY_S,
    EndpointError,
    api_base,
    bearer_key,
    chat_completion,
)
from w2sr.rundir import RunDir

log = logging.getLogger(__name__)

# Bump on any change to JUDGE_PROMPT: cached replies belong to the prompt that was asked.
PROMPT_VERSION = "1"
CACHE = layout.JUDGE_LABELS
MAX_REPLY_CHARS = 100_000  # a longer reply is not an answer to this prompt; read none of it
MAX_COUNT = 10_000  # more instances than any benchmark response holds: a confused judge
MAX_STORED_REPLY = 2_000  # of a reply, kept in the cache to show what a parse failure read
BACKOFF_S = 1.0  # first retry's wait; doubles, jittered

JUDGE_PROMPT = """\
You will read a response that a model wrote to a math problem, and count how often it shows \
each of four reasoning behaviors:

- verification: it checks an intermediate or final result, e.g. by substituting an answer back \
into the problem, recomputing it another way, or testing it against the problem's conditions.
- backtracking: it finds that an approach or a step is wrong or leads nowhere, abandons it, and \
goes back to try something else.
- subgoal_setting: it breaks the problem into smaller intermediate goals and states them (e.g. \
"first find x, then use it to find y").
- enumeration: it works systematically through several cases, candidate values or \
possibilities, one by one.

Count distinct instances; a behavior the response does not show counts 0. Judge what the \
response does, not the words it uses: a "wait" that changes nothing is not backtracking, and a \
check carried out without announcing it is verification.

<response>
{response}
</response>

Reply with only a JSON object with exactly these four keys and non-negative integer values, \
and nothing else, e.g.:
{"verification": 1, "backtracking": 0, "subgoal_setting": 2, "enumeration": 0}"""

_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")  # the reply is one flat object; no nesting to follow


def judge_prompt(response: str) -> str:
    return JUDGE_PROMPT.replace("{response}", response, 1)


def parse_reply(text: str) -> dict[str, int] | None:
    """The counts of a judge's reply: its last JSON object that holds no other, wherever it sits
    (code fences, prose, an object around it), with exactly the four behaviors as keys and
    integers in [0, MAX_COUNT] as values. None when the reply holds no such object."""
    if not isinstance(text, str) or len(text) > MAX_REPLY_CHARS:
        return None
    for candidate in reversed(_FLAT_OBJECT.findall(text)):
        try:
            found = json.loads(candidate)
        except (ValueError, RecursionError):  # not JSON, an over-long integer, deep arrays
            continue
        if isinstance(found, dict):
            return _counts(found)
    return None


def _counts(found: dict[str, Any]) -> dict[str, int] | None:
    if set(found) != set(BEHAVIORS):
        return None
    # `type is int`: JSON's true/false are bools, which Python counts as ints.
    if not all(type(found[b]) is int and 0 <= found[b] <= MAX_COUNT for b in BEHAVIORS):
        return None
    return {b: found[b] for b in BEHAVIORS}


def judge_key(cfg: JudgeConfig) -> str | None:
    """The API key (from the variable `api_key_env` names, else none), once the endpoint is
    known to be a place it may go: https, or plain http to this machine's loopback."""
    return bearer_key(cfg.endpoint, "report.judge.endpoint", cfg.api_key_env)


def sample_responses(responses: list[str], limit: int | None, seed: int) -> list[str]:
    """At most `limit` responses, drawn with `seed`, in their order. Models evaluated on the same
    prompts with the same samples keep their responses in the same order, so the same seed
    picks the same problems for each of them."""
    if limit is None or len(responses) <= limit:
        return list(responses)
    picked = sorted(random.Random(seed).sample(range(len(responses)), limit))
    return [responses[i] for i in picked]


def digest(response: str) -> str:
    return hashlib.sha256(response.encode("utf-8", "surrogatepass")).hexdigest()


def judge_identity(cfg: JudgeConfig) -> dict[str, Any]:
    """What a cached reply answered besides the response: the judge, and the tokens it was given
    (a reply cut short may not parse, and a larger budget deserves a new request)."""
    return {"endpoint": api_base(cfg.endpoint), "model": cfg.model, "max_tokens": cfg.max_tokens}


class JudgeCache:
    """The judge's replies in the run dir, one JSON line each. Object stores cannot append, so
    the file is rewritten whole (atomically) whenever it is saved."""

    def __init__(self, run: RunDir):
        self.run = run
        text = run.read_text(*CACHE) if run.exists(*CACHE) else ""
        self.records = [json.loads(line) for line in text.splitlines() if line.strip()]
        self.index = {
            self.key(r["response_sha256"], r["judge"], r["prompt_version"]): r for r in self.records
        }

    @staticmethod
    def key(sha: str, judge: dict[str, Any], version: str) -> str:
        return json.dumps([sha, judge, version], sort_keys=True)

    def get(self, sha: str, judge: dict[str, Any]) -> dict[str, Any] | None:
        return self.index.get(self.key(sha, judge, PROMPT_VERSION))

    def put(self, sha: str, judge: dict[str, Any], reply: str) -> None:
        record = {
            "response_sha256": sha,
            "judge": judge,
            "prompt_version": PROMPT_VERSION,
            "counts": parse_reply(reply),
            "reply": reply[:MAX_STORED_REPLY],
        }
        self.records.append(record)
        self.index[self.key(sha, judge, PROMPT_VERSION)] = record

    def save(self) -> None:
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        self.run.write_text(lines, *CACHE)


def judge_behaviors(
    responses: list[str], cfg: JudgeConfig, run: RunDir, seed: int
) -> dict[str, Any]:
    """Per behavior, the mean count per response and the share of responses with at least one
    (as `summarize_behaviors`; None when no reply parsed), over the parsed replies of a seeded
    sample of at most `cfg.max_responses` responses; with `judged` (parsed), `parse_failures`
    and `errors` (failed requests), which add up to the sample's size."""
    key = judge_key(cfg)  # refuses a key's unsafe destination before anything is sent
    sample = sample_responses(responses, cfg.max_responses, seed)
    chosen = [digest(r) for r in sample]
    texts = dict(zip(chosen, sample, strict=True))
    judge, cache = judge_identity(cfg), JudgeCache(run)
    todo = {sha: texts[sha] for sha in dict.fromkeys(chosen) if cache.get(sha, judge) is None}
    if todo:
        log.info(
            "judge %s: %d requests for %d sampled responses (the rest cached or repeated)",
            cfg.model,
            len(todo),
            len(chosen),
        )
        failed = asyncio.run(_ask(todo, cfg, key, judge, cache))
        if failed:
            log.warning(
                "judge %s: %d of %d requests failed (first: %s); a rerun asks for them again",
                cfg.model,
                len(failed),
                len(todo),
                next(iter(failed.values())),
            )
    records = [cache.get(sha, judge) for sha in chosen]
    parsed = [r["counts"] for r in records if r is not None and r["counts"] is not None]
    n = len(parsed)
    return {
        **{
            b: {
                "mean": sum(c[b] for c in parsed) / n if n else None,
                "share": sum(c[b] > 0 for c in parsed) / n if n else None,
            }
            for b in BEHAVIORS
        },
        "judged": n,
        "parse_failures": sum(r is not None and r["counts"] is None for r in records),
        "errors": sum(r is None for r in records),
    }


async def _ask(
    todo: dict[str, str], cfg: JudgeConfig, key: str | None, judge: dict, cache: JudgeCache
) -> dict[str, str]:
    """Ask the judge about each response, caching the replies as they arrive; returns the
    failures by response digest."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    gate = asyncio.Semaphore(cfg.concurrency)
    limits = httpx.Limits(
        max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency
    )
    failed: dict[str, str] = {}
    saved = [time.monotonic()]
    async with httpx.AsyncClient(
        base_url=api_base(cfg.endpoint), headers=headers, timeout=cfg.timeout_s, limits=limits
    ) as client:

        async def one(sha: str, response: str) -> None:
            body = {
                "model": cfg.model,
                "messages": [{"role": "user", "content": judge_prompt(response)}],
                "temperature": 0,
                "max_tokens": cfg.max_tokens,
            }
            try:
                async with gate:
                    reply = await chat_completion(client, body, cfg.retries, BACKOFF_S)
                content = _content(reply)
            except (EndpointError, httpx.HTTPError, ValueError) as error:
                failed[sha] = f"{type(error).__name__}: {error}"
                return
            cache.put(sha, judge, content)
            if time.monotonic() - saved[0] > SAVE_EVERY_S:
                cache.save()
                saved[0] = time.monotonic()

        try:
            await asyncio.gather(*(one(sha, response) for sha, response in todo.items()))
        finally:
            cache.save()
    return failed


def _content(reply: Any) -> str:
    """The text of a chat completion; ValueError when the server sent something else."""
    if isinstance(reply, dict) and reply.get("too_long"):
        raise ValueError("the response does not fit in the judge's context")
    try:
        content = reply["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"not a chat completion: {str(reply)[:200]}") from None
    if content is not None and not isinstance(content, str):
        raise ValueError(f"not a chat completion: content {str(content)[:200]}")
    return content or ""
