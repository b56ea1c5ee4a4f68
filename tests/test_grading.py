"""Grading: answer extraction, mathematical equality, and the time bound on math-verify."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from w2sr import grading
from w2sr.grading import GRADERS, extract_answer, grade_batch, is_correct, split_reasoning

EXTRACT_CASES = [
    ("So the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not delimiters
    ("\\boxed {7}", "7"),
    ("\\fbox{7}", "7"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box wins
    ("\\boxed{ 5. }", "5"),  # outer whitespace and a trailing period go
    ("<answer>3</answer> so \\boxed{4}", "4"),  # a box beats an answer tag
    ("<answer>6</answer> no, <answer> 7 </answer>", "7"),
    ("She has 1234 in all.\n#### 1,234", "1,234"),
    ("#### 5\nwait\n#### 6", "6"),
    ("no final answer here", None),
    ("", None),
    ("\\boxed{12", None),  # truncated
    ("\\boxed{1} and then \\boxed{2", None),  # a malformed last box does not fall back
    ("\\boxed{}", None),
    ("<answer>7", None),
    ("####   ", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# (response, gold, correct)
MATH_CASES = [
    # fractions, decimals and LaTeX spellings of them
    ("\\boxed{0.75}", "\\frac{3}{4}", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{\\tfrac{1}{2}}", "\\frac12", True),
    ("\\boxed{\\frac12}", "0.5", True),
    ("\\boxed{0.333333}", "\\frac{1}{3}", True),  # decimals count to 6 places, as in math-verify
    ("\\boxed{0.33}", "\\frac{1}{3}", False),
    # LaTeX vs plain text
    ("\\boxed{\\frac{1}{2}}", "1/2", True),
    ("\\boxed{\\sqrt{2}}", "sqrt(2)", True),
    ("\\boxed{\\text{Monday}}", "Monday", True),
    ("\\boxed{\\pi}", "\\pi", True),
    # units, words, currency, degrees, a leading "x ="
    ("\\boxed{5 \\text{ cm}}", "5", True),
    ("\\boxed{5\\text{ cm}^2}", "5", True),
    ("\\boxed{5\\mathrm{m}}", "5", True),
    ("The total is 5 apples.\n#### 5 apples", "5", True),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{30^{\\circ}}", "30", True),
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{5x}", "5", False),
    # thousands separators
    ("\\boxed{1000}", "1,000", True),
    ("#### 1,234", "1234", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{1\\,000}", "1000", True),
    # percentages
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{50}", "50\\%", True),
    ("\\boxed{50\\%}", "5", False),
    # negative numbers
    ("\\boxed{-5}", "-5", True),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac12", True),
    ("\\boxed{-5}", "5", False),
    ("\\boxed{5}", "-5", False),
    # sets, intervals, tuples
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", True),
    ("\\boxed{\\{1,3\\}}", "\\{1,2\\}", False),
    ("\\boxed{[0,1)}", "[0, 1)", True),
    ("\\boxed{\\left[0, 1\\right)}", "[0,1)", True),
    ("\\boxed{(0,1)}", "[0,1]", False),
    ("\\boxed{(1, 2)}", "(1,2)", True),
    ("\\boxed{(2,1)}", "(1,2)", False),
    # symbolic
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{\\sqrt{2}}", "2", False),
    # plain mismatches
    ("\\boxed{2}", "3", False),
    # gold given as a worked solution
    ("\\boxed{3}", "Adding gives $\\boxed{3}$.", True),
    ("#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True),
    # several boxes: the last one is graded
    ("\\boxed{2} no wait, \\boxed{3}", "3", True),
    ("\\boxed{3} no wait, \\boxed{2}", "3", False),
    ("<answer>7</answer>", "7", True),
    # nothing to grade
    ("I am not sure.", "12", False),
    ("\\boxed{12", "12", False),
    ("\\boxed{12} or \\boxed{12", "12", False),
    ("\\boxed{12}", "", False),
]


@pytest.mark.parametrize(("response", "gold", "expected"), MATH_CASES)
def test_is_correct(response, gold, expected):
    assert is_correct(response, gold) is expected


# (extracted answer, gold) pairs of MATH_CASES that need math-verify; the rest must not reach it.
NEEDS_MATH_VERIFY = {
    ("\\sqrt{2}", "sqrt(2)"),
    ("5x", "5"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("\\{1,3\\}", "\\{1,2\\}"),
    ("(0,1)", "[0,1]"),
    ("(2,1)", "(1,2)"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\sqrt{2}", "2"),
}


def test_only_what_needs_math_verify_reaches_the_worker(monkeypatch):
    calls = set()

    def recording(pred, gold):
        calls.add((pred, gold))
        return False

    monkeypatch.setattr(grading, "_slow_equal", recording)
    for response, gold, expected in MATH_CASES:
        verdict = is_correct(response, gold)
        if (extract_answer(response), gold) not in NEEDS_MATH_VERIFY:
            assert verdict is expected, (response, gold)
    assert calls == NEEDS_MATH_VERIFY


SLOW_CASES = [
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}"),
    ("\\boxed{(0,1)}", "[0,1]"),
    ("\\boxed{\\sqrt{2}}", "2"),
]


def test_threads_agree_with_the_main_thread():
    expected = [is_correct(r, g) for r, g in SLOW_CASES]
    assert expected == [True, True, True, False, False]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            assert list(pool.map(lambda case: is_correct(*case), SLOW_CASES)) == expected


def _sleep_past_limit(pred, gold):  # runs in the worker, imported there by name
    time.sleep(60)
    return True


def test_time_bound(monkeypatch, caplog):
    case = SLOW_CASES[0]
    assert is_correct(*case)  # the worker is up: the clock below measures the check alone
    monkeypatch.setattr(grading, "TIMEOUT_S", 1.0)
    monkeypatch.setattr(grading, "_mv_equal", _sleep_past_limit)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="w2sr.grading"):
        assert not is_correct(*case)
    assert 1.0 <= time.monotonic() - start < 3.0
    assert "counted incorrect" in caplog.text
    monkeypatch.undo()
    assert is_correct(*case)  # a fresh worker takes over
    assert not is_correct(*SLOW_CASES[-1])


def test_grade_batch_matches_is_correct():
    responses = [r for r, _, _ in MATH_CASES]
    golds = [g for _, g, _ in MATH_CASES]
    assert grade_batch(responses, golds) == [e for _, _, e in MATH_CASES]


def test_grade_batch_grades_each_distinct_answer_once(monkeypatch):
    calls = []

    def counting(response, gold, policy):
        calls.append((response, gold))
        return is_correct(response, gold, policy)

    monkeypatch.setitem(GRADERS, "math", counting)
    responses = ["so \\boxed{4}", "hence \\boxed{4}", "\\boxed{5}", "#### 4", "\\boxed{4}"]
    golds = ["4", "4", "4", "4", "5"]
    assert grade_batch(responses, golds) == [True, True, False, True, False]
    assert len(calls) == 3  # (4, "4"), (5, "4"), (4, "5")


def test_grade_batch_rejects_unequal_lengths():
    with pytest.raises(ValueError):
        grade_batch(["\\boxed{1}"], ["1", "2"])


EXACT_CASES = [
    ("\\boxed{ABC}", "ABC", True),
    ("<answer> x y z </answer>", "x y z", True),
    ("\\boxed{A}", " A ", True),
    ("\\boxed{abc}", "ABC", False),
    ("\\boxed{0.5}", "1/2", False),
    ("\\boxed{x y}", "xy", False),
    ("no answer", "A", False),
]


@pytest.mark.parametrize(("response", "gold", "expected"), EXACT_CASES)
def test_exact_grader(response, gold, expected):
    assert GRADERS["exact"](response, gold) is expected


def test_grade_batch_exact():
    cases = EXACT_CASES
    verdicts = grade_batch([r for r, _, _ in cases], [g for _, g, _ in cases], grader="exact")
    assert verdicts == [e for _, _, e in cases]


def test_graders_by_name():
    assert GRADERS["math"] is is_correct
    with pytest.raises(KeyError):
        grade_batch(["\\boxed{1}"], ["1"], grader="nope")


# Where the two grading policies agree and where they differ, on answers as models write them
# (the first two are unboxed answers of a small instruct model to GSM8K problems).
POLICY_CASES = [
    # response, gold, strict, standard
    ("So, the answer is 4.", "4", False, True),
    ("Therefore, the final answer is 18. I hope it is correct.", "18", False, True),
    ("The final answer is $\\frac{1}{2}$.", "0.5", False, True),
    ("We find $x = 3$.", "3", False, True),
    ("She pays 3 + 4 = 7 dollars in total", "7", False, True),
    ("so \\[ 9 \\]", "9", False, True),
    ("\\boxed{4}", "4", True, True),
    ("\\boxed{5} (the answer is 4)", "4", False, False),  # an explicit answer wins in both
    ("#### 12", "12", True, True),
    ("<answer>7</answer> so the answer is 8", "7", True, True),
    ("I cannot tell.", "4", False, False),
    ("The answer is 5.", "4", False, False),
]


@pytest.mark.parametrize(("response", "gold", "strict", "standard"), POLICY_CASES)
def test_the_grading_policies_agree_and_differ_as_documented(response, gold, strict, standard):
    assert is_correct(response, gold, "strict") is strict
    assert is_correct(response, gold, "standard") is standard
    verdicts = grade_batch([response], [gold], policy="standard")
    assert verdicts == [standard]


# Reasoning models: the final answer is read after the last `</think>` only.
THINK_CASES = [
    # response, strict, standard
    ("<think>Let me try \\boxed{5} hmm wait", None, None),  # a thought never closed: no answer
    ("<think>maybe \\boxed{4}</think> So the final answer is 5.", None, "5"),
    ("<think>2 + 2 = 4</think>", None, None),  # the standard fallback does not read the thought
    ("<think>x = \\boxed{1}</think>\n\n\\boxed{2}", "2", "2"),  # a box in the thought and after
    ("the prefill stayed in the prompt, so \\boxed{6}</think>\\boxed{7}", "7", "7"),
    ("opened in the prompt \\boxed{6}</think>", None, None),
    ("<think>a \\boxed{1}</think> b <think>c \\boxed{2}</think> \\boxed{3}", "3", "3"),
    ("<think>a</think> \\boxed{2} <think>let me check \\boxed{3}", None, None),  # opened again
    ("<think>a</think><answer>8</answer>", "8", "8"),
    ("no thought at all, \\boxed{9}", "9", "9"),
]


@pytest.mark.parametrize(("text", "strict", "standard"), THINK_CASES)
def test_the_answer_is_read_after_the_thought(text, strict, standard):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "standard") == standard


def test_an_unfinished_thought_has_no_answer_under_either_policy():
    for policy in ("strict", "standard"):
        assert not is_correct("<think>Let me try \\boxed{5} hmm wait", "5", policy)
        assert is_correct("<think>Let me try \\boxed{4}</think> \\boxed{5}", "5", policy)


def test_a_thought_opened_before_the_read_window_still_counts():
    loop = "and again " * grading.MAX_RESPONSE_CHARS  # the thought's start is far out of reach
    for policy in ("strict", "standard"):
        assert extract_answer(f"<think>{loop}\\boxed{{5}}", policy) is None
        assert extract_answer(f"<think>{loop}</think>\\boxed{{5}}", policy) == "5"
        assert extract_answer(f"<think>\\boxed{{4}}</think>{loop}\\boxed{{5}}", policy) == "5"
    # a thought that closes inside the read window still bounds it
    assert extract_answer(f"{loop}\\boxed{{4}}</think> so 5", "standard") == "5"


def test_graders_and_grade_batch_read_after_the_thought():
    responses = [
        "<think>\\boxed{4}</think> \\boxed{5}",
        "<think>\\boxed{5}",
        "<think>\\boxed{5}</think> so it is 4",
    ]
    for policy, expected in (("strict", [True, False, False]), ("standard", [True, False, False])):
        assert grade_batch(responses, ["5"] * 3, policy=policy) == expected
        assert [is_correct(r, "5", policy) for r in responses] == expected
    assert GRADERS["exact"]("<think>\\boxed{A}</think>\\boxed{B}", "B")
    assert not GRADERS["exact"]("<think>\\boxed{A}", "A")


SPLIT_CASES = [
    # text, reasoning, answer
    ("no thought \\boxed{1}", None, "no thought \\boxed{1}"),
    ("<think>a</think>\n\nb", "<think>a</think>", "\n\nb"),
    ("a prefilled thought</think>b", "a prefilled thought</think>", "b"),
    ("<think>a</think>b<think>c</think>d", "<think>a</think>b<think>c</think>", "d"),
    ("<think>a</think>", "<think>a</think>", ""),
    ("<think>a", "<think>a", None),
    ("<think>a</think>b<think>c", "<think>a</think>b<think>c", None),
    ("", None, ""),
]


@pytest.mark.parametrize(("text", "reasoning", "answer"), SPLIT_CASES)
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)
    if answer is not None:
        assert (reasoning or "") + answer == text


# The `standard` policy against SimpleRL-Zoo's evaluator (Qwen2.5-Math's parser and math_equal,
# with which the paper was graded), on answers in the shapes that parser handles.
# Where the two agree: response, gold, verdict of both.
SIMPLERL_AGREES = [
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}", True),
    ("The answer is $\\dfrac{1}{2}$.", "0.5", True),
    ("The answer is $x = 3$.", "3", True),
    ("The answer is 25%.", "25", True),
    ("\\boxed{5}. Let me double-check: 2 + 3 = 5, so 6 is wrong.", "5", True),
    ("The answer is 4, I think. Actually \\boxed{5}.", "5", True),
    ("\\boxed{5} (the answer is 4)", "4", False),
    ("\\boxed{2}, or rather \\boxed{3}", "3", True),
    ("\\boxed{2}, or rather \\boxed{3}", "2", False),
    ("\\fbox{7}", "7", True),
    ("\\boxed{12\\text{ cm}}", "12", True),
    ("\\boxed{\\text{Tuesday}}", "\\text{Tuesday}", True),
    ("\\boxed{25\\%}", "25", True),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{30^\\circ}", "30", True),
    ("The angle is $45^\\circ$.", "45", True),
    ("The length is 12 cm.", "12", True),
    ("She has 3 + 4 = 7 apples.", "7", True),
    ("Since $n = 3$, there are 10 ways.", "10", True),  # the last number, after the LaTeX
    ("The total cost is $\\$12$.", "12", True),  # an escaped dollar is no LaTeX delimiter
    ("so 2 + 3 = 5, giving \\boxed{5", "5", True),  # a truncated box: both find the 5
    ("I am not sure.", "4", False),
]


@pytest.mark.parametrize(("response", "gold", "verdict"), SIMPLERL_AGREES)
def test_standard_agrees_with_simplerl_zoo(response, gold, verdict):
    assert is_correct(response, gold, "standard") is verdict


# Where they differ on purpose (the reasons are in w2sr/grading.py): response, gold, our verdict.
SIMPLERL_DIFFERS = [
    # SimpleRL-Zoo reads the rest of the response after "the answer is": counted incorrect there
    ("The answer is 5. To check: 2 + 3 = 5.", "5", True),
    # ... and prefers the last "the answer is" to a later "final answer is": counted incorrect there
    ("The answer is 4. So the final answer is 5.", "5", True),
    # its last number is the 8 of the fraction and the 4 of 3/4: counted incorrect there
    ("The probability is $\\frac{3}{8}$.", "\\frac{3}{8}", True),
    ("Each gets 3/4 of a pie.", "\\frac{3}{4}", True),
    # it reads the box inside the thought: 4, counted incorrect there
    ("<think>maybe \\boxed{4}</think> So the final answer is 5.", "5", True),
    # it takes 100 times or a hundredth of any gold, and numbers within 1e-4: counted correct there
    ("\\boxed{200}", "2", False),
    ("\\boxed{10001}", "10000", False),
    # it reads number words: counted correct there
    ("\\boxed{five}", "5", False),
]


@pytest.mark.parametrize(("response", "gold", "verdict"), SIMPLERL_DIFFERS)
def test_standard_differs_from_simplerl_zoo_as_documented(response, gold, verdict):
    assert is_correct(response, gold, "standard") is verdict
