"""Behavior patterns: each marks the phrases its docstring lists and leaves look-alikes alone."""

from __future__ import annotations

import pytest

from w2sr.behaviors import BEHAVIORS, count_behaviors, summarize_behaviors

MARKED = {
    "verification": [
        "Let me check the arithmetic.",
        "Let's double-check: 3 * 4 = 12.",
        "We can verify this by expanding.",
        "Plugging it back into the equation gives 7.",
        "Substituting back, both sides equal 9.",
        "As a sanity check, the area is positive.",
        "Checking whether 17 is prime: it is.",
    ],
    "backtracking": [
        "Wait, the sign is off.",
        "Hmm, that does not work.",
        "That is wrong, since x must be positive.",
        "I made a mistake in the second line.",
        "Let me reconsider the constraint.",
        "Let's try a different approach.",
        "On second thought, the radius is 3.",
    ],
    "subgoal_setting": [
        "First, we find the roots.",
        "Step 2: add the two results.",
        "Next, we need to compute the area.",
        "Let's break this down into two parts.",
        "We need to find the value of x.",
        "Our goal is to bound the sum.",
        "This splits into two subproblems.",
    ],
    "enumeration": [
        "Case 1: n is even.",
        "Let's list all divisors of 12.",
        "The possible values of k are 1, 2 and 4.",
        "For each value of a, count the b that work.",
        "Trying each possible value of d from 1 to 9.",
    ],
}

UNMARKED = [
    "The answer is 12.",
    "The waiter brought 3 plates.",  # "wait" inside a word
    "The checkered board has 64 squares.",  # "check" inside a word
    "The first term is 5, so the sum is 15.",  # "first" not setting a subgoal
    "A case of 24 cans costs $12.",  # "case" without a number
]


@pytest.mark.parametrize("behavior", sorted(MARKED))
def test_each_marked_phrase_counts_once_for_its_behavior_only(behavior):
    for sentence in MARKED[behavior]:
        counts = count_behaviors(sentence)
        assert counts[behavior] == 1, sentence
        assert sum(counts.values()) == 1, (sentence, counts)


def test_plain_text_and_look_alike_words_are_not_marked():
    for sentence in UNMARKED:
        assert sum(count_behaviors(sentence).values()) == 0, sentence


def test_counts_add_up_over_a_trace_and_ignore_case():
    trace = "WAIT. First, we add. wait, no. Let me verify. Case 1: x. Case 2: y. Hmm."
    assert count_behaviors(trace) == {
        "verification": 1,
        "backtracking": 3,
        "subgoal_setting": 1,
        "enumeration": 2,
    }


def test_summary_gives_mean_count_and_share_of_traces():
    summary = summarize_behaviors(["Wait. Wait.", "Let me check.", "Nothing here."])
    assert set(summary) == set(BEHAVIORS)
    assert summary["backtracking"] == {"mean": pytest.approx(2 / 3), "share": pytest.approx(1 / 3)}
    assert summary["verification"] == {"mean": pytest.approx(1 / 3), "share": pytest.approx(1 / 3)}
    assert summary["enumeration"] == {"mean": 0.0, "share": 0.0}
    assert summarize_behaviors([])["verification"] == {"mean": 0.0, "share": 0.0}
