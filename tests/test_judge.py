"""The behavior judge: its replies parsed strictly, its sample seeded, its answers cached, its
key kept off the wire where it would travel in clear.

The requests go to a real HTTP server on 127.0.0.1 that answers like an OpenAI chat endpoint:
a response holding "COUNTS v b s e" gets those counts back (in a fenced block with prose
around), one holding "PROSE" a reply without them, and one holding "REFUSE" an HTTP 400.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from w2sr import judge as judge_module
from w2sr import layout
from w2sr.config import JudgeConfig
from w2sr.judge import (
    CACHE,
    PROMPT_VERSION,
    digest,
    judge_behaviors,
    judge_key,
    parse_reply,
    sample_responses,
)
from w2sr.rundir import RunDir

KEY = "judge-key-0123456789"
KEY_ENV = "W2SR_TEST_JUDGE_KEY"
GOOD = '{"verification": 2, "backtracking": 0, "subgoal_setting": 1, "enumeration": 3}'
COUNTS = {"verification": 2, "backtracking": 0, "subgoal_setting": 1, "enumeration": 3}


@pytest.mark.parametrize(
    "reply",
    [
        GOOD,
        f"Here is my count.\n```json\n{GOOD}\n```\nThe response verifies twice.",
        # A reasoning judge's draft before its answer: the last object is the answer.
        '{"verification": 9, "backtracking": 9, "subgoal_setting": 9, "enumeration": 9} no, '
        f"\\boxed{{3}} {GOOD}",
        GOOD.replace(" ", "").replace(",", ",\n"),
        '{"counts": ' * 5_000 + GOOD + "}" * 5_000,  # deeply nested: the innermost object
    ],
)
def test_a_reply_with_the_four_counts_parses(reply):
    assert parse_reply(reply) == COUNTS


@pytest.mark.parametrize(
    "reply",
    [
        '{"verification": 2, "backtracking": 0, "subgoal_setting": 1}',  # a key missing
        GOOD.replace("}", ', "reasoning": 1}'),  # a key too many
        GOOD.replace('"backtracking": 0', '"backtracking": -1'),
        GOOD.replace('"backtracking": 0', '"backtracking": 1.0'),
        GOOD.replace('"backtracking": 0', '"backtracking": true'),
        GOOD.replace('"backtracking": 0', '"backtracking": "1"'),
        GOOD.replace('"backtracking": 0', '"backtracking": NaN'),
        GOOD.replace('"backtracking": 0', '"backtracking": 1e400'),
        GOOD.replace('"backtracking": 0', f'"backtracking": {10**6}'),
        GOOD.replace('"backtracking": 0', f'"backtracking": {"9" * 5000}'),  # over int digits
        GOOD.replace('"backtracking": 0', '"backtracking": ' + "[" * 40_000 + "]" * 40_000),
        "verification: 2, backtracking: 0, subgoal setting: 1, enumeration: 3",
        "{'verification': 2, 'backtracking': 0, 'subgoal_setting': 1, 'enumeration': 3}",
        '{"verification": {"backtracking": 0}, "subgoal_setting": 1}',
        '{"a": ' * 12_000 + "1" + "}" * 12_000,  # deeply nested
        "{" * 60_000 + GOOD[1:-1],  # unclosed
        GOOD + " " * 10_000_000,  # 10 MB
        "\ufffd" * 1000 + "{\ufffd}" + "\udc80",
        "",
    ],
)
def test_anything_else_is_a_parse_failure(reply):
    assert parse_reply(reply) is None


def test_the_sample_is_seeded_bounded_and_in_order():
    responses = [f"response {i}" for i in range(100)]
    drawn = sample_responses(responses, 10, seed=3)
    assert len(drawn) == 10 and len(set(drawn)) == 10
    assert drawn == sorted(drawn, key=responses.index)
    assert sample_responses(responses, 10, seed=3) == drawn
    assert sample_responses(responses, 10, seed=4) != drawn
    assert sample_responses(responses, None, seed=3) == responses
    assert sample_responses(responses[:5], 10, seed=3) == responses[:5]


@pytest.fixture
def judge_server():
    """A chat endpoint on loopback that records every request it gets."""
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({"path": self.path, "auth": self.headers["Authorization"], **body})
            prompt = body["messages"][0]["content"]
            response = prompt.split("<response>\n", 1)[1].rsplit("\n</response>", 1)[0]
            if "REFUSE" in response:
                return self.send(400, {"error": {"message": "refused"}})
            counts = re.search(r"COUNTS (\d+) (\d+) (\d+) (\d+)", response)
            content = "I could not decide."
            if counts:
                obj = dict(zip(COUNTS, map(int, counts.groups()), strict=True))
                content = f"Counting.\n```json\n{json.dumps(obj)}\n```\nDone."
            message = {"role": "assistant", "content": content}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            self.send(200, {"id": "x", "object": "chat.completion", "choices": [choice]})

        def send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    server.shutdown()
    server.server_close()
    thread.join()


def config(endpoint: str, **extra) -> JudgeConfig:
    return JudgeConfig(endpoint=endpoint, model="judge-m", api_key_env=KEY_ENV, **extra)


def test_replies_are_counted_cached_and_never_asked_twice(judge_server, tmp_path, monkeypatch):
    url, requests = judge_server
    monkeypatch.setenv(KEY_ENV, KEY)
    run = RunDir(str(tmp_path / "run"))
    responses = [
        "First, COUNTS 2 0 1 3",
        "COUNTS 0 1 0 0",
        "First, COUNTS 2 0 1 3",  # the same response again: judged once, counted twice
        "PROSE only",
        "REFUSE this",
    ]
    cfg = config(url, max_responses=None, retries=0)

    found = judge_behaviors(responses, cfg, run, seed=0)
    assert (found["judged"], found["parse_failures"], found["errors"]) == (3, 1, 1)
    assert found["verification"] == {"mean": 4 / 3, "share": 2 / 3}
    assert found["backtracking"] == {"mean": 1 / 3, "share": 1 / 3}
    assert found["subgoal_setting"] == {"mean": 2 / 3, "share": 2 / 3}
    assert found["enumeration"] == {"mean": 2.0, "share": 2 / 3}
    assert len(requests) == 4
    for request in requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["auth"] == f"Bearer {KEY}"
        assert (request["model"], request["temperature"]) == ("judge-m", 0)
        assert request["max_tokens"] == cfg.max_tokens

    text = run.read_text(*CACHE)
    assert KEY not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert {r["response_sha256"]: r["counts"] for r in records} == {
        digest("First, COUNTS 2 0 1 3"): COUNTS,
        digest("COUNTS 0 1 0 0"): dict(zip(COUNTS, (0, 1, 0, 0), strict=True)),
        digest("PROSE only"): None,  # a parse failure is an answer, kept
    }  # the refused request is not: the next run asks again
    for record in records:
        assert record["prompt_version"] == PROMPT_VERSION
        assert record["judge"] == {"endpoint": url[: -len("/v1")], "model": "judge-m"} | {
            "max_tokens": cfg.max_tokens
        }

    assert judge_behaviors(responses, cfg, run, seed=0) == found
    assert len(requests) == 5 and "REFUSE" in requests[-1]["messages"][0]["content"]

    # Another judge, or another prompt, asks afresh.
    judge_behaviors(responses, cfg.model_copy(update={"model": "judge-2"}), run, seed=0)
    assert len(requests) == 9 and requests[-1]["model"] == "judge-2"
    monkeypatch.setattr(judge_module, "PROMPT_VERSION", "next")
    judge_behaviors(responses, cfg, run, seed=0)
    assert len(requests) == 13


def test_no_reply_parses_gives_no_rates(judge_server, tmp_path, monkeypatch):
    url, requests = judge_server
    monkeypatch.delenv(KEY_ENV, raising=False)
    found = judge_behaviors(["PROSE a", "PROSE b"], config(url), RunDir(str(tmp_path)), seed=0)
    assert (found["judged"], found["parse_failures"], found["errors"]) == (0, 2, 0)
    assert found["verification"] == {"mean": None, "share": None}  # not zero: unknown
    assert [r["auth"] for r in requests] == [None, None]  # no key set, none sent


def test_only_the_seeded_sample_is_asked(judge_server, tmp_path):
    url, requests = judge_server
    responses = [f"COUNTS {i} 0 0 0" for i in range(20)]
    cfg = config(url, max_responses=4)
    found = judge_behaviors(responses, cfg, RunDir(str(tmp_path)), seed=7)
    assert found["judged"] == len(requests) == 4
    asked = sorted(r["messages"][0]["content"].split("<response>\n")[1][:10] for r in requests)
    assert asked == sorted(r[:10] for r in sample_responses(responses, 4, seed=7))


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8000/v1",
        "http://127.8.9.10:8000/v1",
        "http://localhost:8000/v1",
        "http://[::1]:8000/v1",
        "https://judge.example.com/v1",
    ],
)
def test_the_key_goes_over_https_or_loopback(endpoint, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    assert judge_key(config(endpoint)) == KEY


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://judge.example.com/v1",
        "http://10.0.0.5:8000/v1",
        "http://0.0.0.0:8000/v1",
        "http://localhost.example.com/v1",
        "http://127.0.0.1.example.com/v1",
    ],
)
def test_a_key_is_refused_in_clear_to_another_host(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    run = RunDir(str(tmp_path))
    with pytest.raises(ValueError, match=f"would receive the key in {KEY_ENV} in clear"):
        judge_behaviors(["COUNTS 1 1 1 1"], config(endpoint), run, seed=0)
    assert not run.exists(*CACHE)  # refused before any request: none failed, none answered
    monkeypatch.delenv(KEY_ENV)
    assert judge_key(config(endpoint)) is None  # without a key there is nothing to leak


def test_credentials_in_the_url_are_refused(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match="holds credentials"):
        judge_key(config("https://user:token@judge.example.com/v1"))
    with pytest.raises(ValueError, match="not an http"):
        judge_key(config("ftp://judge.example.com/v1"))


def test_the_report_shows_the_judges_labels_when_the_config_asks_for_them(
    judge_server, tmp_path, monkeypatch
):
    """`report.behaviors: judge` in the run's config: every behavior is a column, with how many
    responses the judge labelled and how many replies did not parse; a second report asks
    nothing again."""
    from test_report import build_run

    from w2sr.stages.report import report

    endpoint, requests = judge_server
    monkeypatch.setenv(KEY_ENV, "k")
    run_dir = build_run(tmp_path / "run", teacher_parameters=1500)
    judge = {"endpoint": endpoint, "model": "judge-m", "api_key_env": KEY_ENV}
    config = {"report": {"behaviors": "judge", "judge": judge}, "seed": 0}
    RunDir(run_dir).write_text(yaml.safe_dump(config), layout.CONFIG)
    text = Path(report(run_dir)["report"]).read_text()
    behaviors = text.split("## Cognitive behaviors")[1].split("\n## ")[0]
    assert "labelled by the judge model judge-m" in behaviors
    assert "| judged | parse failures | errors |" in behaviors
    teacher = next(line for line in behaviors.splitlines() if line.startswith("| Teacher |"))
    cells = [cell.strip() for cell in teacher.strip("|").split("|")]
    n = int(cells[1])
    assert n > 0 and cells[2:6] == ["–"] * 4  # the fixed replies never parse
    assert cells[6:] == ["0", str(n), "0"]
    asked = len(requests)
    assert asked > 0
    report(run_dir)
    assert len(requests) == asked
