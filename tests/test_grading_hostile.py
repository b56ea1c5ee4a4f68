"""Grading never raises and never hangs, whatever a model writes.

One looping trace must not fail a whole generation or evaluation (and every rerun with the same
seed), so hostile responses are generated: huge numbers, deep nesting, megabyte strings, control
characters and lone surrogates, unbalanced braces, LaTeX that expands without end. Every call is
timed against the grader's own bound, and one that runs past it fails the test at once.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from w2sr import grading
from w2sr.grading import GRADERS, POLICIES, TIMEOUT_S, extract_answer, grade_batch, is_correct

# What one grading call may take: one math-verify check, cut at TIMEOUT_S, plus a margin for
# starting the check's worker again after a cut and for reading megabytes of response here.
BOUND_S = TIMEOUT_S + 10.0


def bounded(call, *args):
    """`call(*args)`, failing the test once it has run past BOUND_S, whether it hangs or not."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call(*args)))
        except BaseException as error:  # re-raised below, in the test's thread
            outcome.append((False, error))

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND_S)
    seconds = time.monotonic() - started
    assert outcome and seconds <= BOUND_S, f"{call.__name__} ran {seconds:.1f}s, over {BOUND_S}s"
    returned, value = outcome[0]
    if not returned:
        raise value
    return value


MARKERS = [
    "\\boxed{",
    "\\fbox{",
    "#### ",
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
    "}",
    "{",
    "\\",
    "$",
]

digits = st.text(alphabet="0123456789", min_size=1, max_size=20_000)
control = st.text(alphabet=st.characters(categories=["Cc", "Cs", "Co", "Zl", "Zp"]), max_size=200)
latex = st.lists(
    st.sampled_from(
        ["\\frac{", "\\sqrt{", "^{", "_{", "x", "10", "!", "\\left(", "\\right)", "}", "{", ","]
    ),
    max_size=400,
).map("".join)
payload = st.one_of(digits, control, latex, st.text(max_size=2_000))
response = st.lists(st.one_of(st.sampled_from(MARKERS), payload), max_size=12).map("".join)
gold = st.one_of(st.sampled_from(["5", "1/2", "\\frac{1}{2}", "x^2", "A"]), digits, latex)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=response, gold=gold)
def test_hostile_responses_get_a_verdict(response, gold):
    for policy in POLICIES:
        answer = bounded(extract_answer, response, policy)
        assert answer is None or isinstance(answer, str)
        for name, grader in GRADERS.items():
            assert isinstance(bounded(grader, response, gold, policy), bool), (name, policy)


@pytest.mark.parametrize(
    "response",
    [
        "#### " + "1" * 5000,  # past Python's int-to-string limit
        "\\boxed{" + "9" * 10_000 + "}",
        "\\boxed{" + "{" * 100_000,  # never closed
        "\\boxed{" + "{" * 50_000 + "1" + "}" * 50_001,  # nested 50,000 deep
        "<answer>" * 200_000,  # an unclosed tag, 1.6 MB
        "<answer>" * 100_000 + "1</answer>",
        "so " * 500_000 + "\\boxed{5}",  # 1.5 MB of loop before the answer
        "\\boxed{10^{10^{10^{10^{10}}}}}",  # LaTeX whose value does not fit in memory
        "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
        "\\boxed{\x00\x07\ud800\udfff}",  # NUL, BEL and lone surrogates
        "$" * 100_000 + "\\(" * 50_000 + "answer is " * 10_000,  # the standard policy's forms
        "<think>" * 200_000,  # a thought opened again and again, never closed
        "</think>" * 200_000 + "\\boxed{5}",
        "\\$" * 100_000 + "$" + "\\" * 100_000,  # escaped dollars, an unclosed one
    ],
)
def test_each_hostile_case_gets_a_verdict(response, monkeypatch):
    # A check cut at a shorter limit is cut the same way: LaTeX whose value never fits is cut
    # once per (gold, policy), at this limit instead of the default's.
    monkeypatch.setattr(grading, "TIMEOUT_S", 1.0)
    for gold, policy in itertools.product(("5", "1", "2"), POLICIES):
        assert isinstance(bounded(is_correct, response, gold, policy), bool)
    assert len(bounded(grade_batch, [response] * 3, ["5"] * 3)) == 3


def test_an_answer_past_the_int_limit_is_compared_as_a_string():
    answer = "7" * 10_000
    assert is_correct(f"\\boxed{{{answer}}}", answer)
    assert not is_correct(f"\\boxed{{{answer}}}", answer + "0")
