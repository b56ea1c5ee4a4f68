"""Metrics on cases small enough to compute by hand."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from w2sr.metrics import (
    bootstrap_ci,
    majority_vote,
    pass_at_k,
    pass_at_k_per_problem,
    resample_means,
    rgr,
    rgr_interval,
)

# --- pass@k ----------------------------------------------------------------------------------


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share correct
    assert pass_at_k(5, 1, 3) == pytest.approx(0.6)  # 1 - C(4,3)/C(5,3) = 1 - 4/10
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0  # every sample drawn: the correct one among them


def test_pass_at_k_equals_the_binomial_formula_everywhere():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert 0.0 < pass_at_k(2000, 1, 1) < 1e-3


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_pass_at_k_per_problem_rows():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_allclose(pass_at_k_per_problem(correct, 1), [0.25, 0.5, 0.0])
    np.testing.assert_allclose(pass_at_k_per_problem(correct, 2), [0.5, 5 / 6, 0.0])


# --- majority vote ---------------------------------------------------------------------------


def test_majority_vote_takes_the_most_frequent_answer():
    assert majority_vote(["4", "4", "5"], [True, True, False]) == 1.0
    assert majority_vote(["5", "5", "4"], [False, False, True]) == 0.0


def test_majority_vote_pools_correct_answers_whatever_their_spelling():
    # 1/2 and 0.5 both equal the gold answer: two votes for it against one for 3
    assert majority_vote(["1/2", "0.5", "3"], [True, True, False]) == 1.0
    # wrong answers are grouped by their text, whitespace aside
    assert majority_vote(["x + 1", "x+1", "2"], [False, False, True]) == 0.0


def test_majority_vote_splits_ties_and_ignores_missing_answers():
    assert majority_vote(["4", "5"], [True, False]) == 0.5
    assert majority_vote(["4", "5", "6"], [True, False, False]) == pytest.approx(1 / 3)
    assert majority_vote([None, None, "4"], [False, False, True]) == 1.0
    assert majority_vote([None, None], [False, False]) == 0.0


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_ci_matches_the_exact_bootstrap_distribution():
    # scores [0, 0, 0, 1]: the resampled mean is Binomial(4, 1/4) / 4, with P(<= 0.5) = 0.949
    # and P(<= 0.75) = 0.996, so the 97.5% point is 0.75; P(0) = 0.316 puts the 2.5% point at 0.
    low, high = bootstrap_ci([0, 0, 0, 1], resamples=20000, confidence=0.95, seed=0)
    assert (low, high) == (0.0, 0.75)
    assert bootstrap_ci([0, 1], resamples=20000, confidence=0.95, seed=0) == (0.0, 1.0)
    assert bootstrap_ci([0.5] * 7, resamples=100, confidence=0.95, seed=0) == (0.5, 0.5)


def test_bootstrap_ci_width_matches_the_normal_approximation_for_many_problems():
    scores = np.array([1] * 120 + [0] * 280, dtype=float)  # p = 0.3, n = 400
    low, high = bootstrap_ci(scores, resamples=4000, confidence=0.95, seed=1)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 400)
    assert low < 0.3 < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)


def test_resampling_is_paired_across_models_and_stratified_across_benchmarks():
    first = np.array([[0, 1, 0, 1, 1], [0, 1, 0, 1, 1]], dtype=float)  # two identical models
    second = np.array([[1, 1, 1], [0, 0, 0]], dtype=float)
    means = resample_means([first, second], resamples=500, seed=3)
    assert means.shape == (500, 2, 2)
    np.testing.assert_array_equal(means[:, 0, 0], means[:, 1, 0])  # same draw for both models
    assert np.all(means[:, 0, 1] == 1.0) and np.all(means[:, 1, 1] == 0.0)
    np.testing.assert_array_equal(means, resample_means([first, second], 500, seed=3))


# --- RGR -------------------------------------------------------------------------------------


def test_rgr_hand_computed():
    assert rgr(base=0.2, w2sr=0.5, rl=0.6) == pytest.approx(0.75)
    assert rgr(base=0.2, w2sr=0.7, rl=0.6) == pytest.approx(1.25)  # W2SR beats RL
    assert rgr(base=0.2, w2sr=0.1, rl=0.6) == pytest.approx(-0.25)  # SFT hurt the student


def test_rgr_is_undefined_when_rl_gains_nothing():
    assert rgr(base=0.4, w2sr=0.5, rl=0.4) is None
    assert rgr(base=0.4, w2sr=0.5, rl=0.3) is None


def test_rgr_interval_is_exact_when_the_student_equals_rl_problem_for_problem():
    base = np.array([[0, 0, 1, 0, 0, 1, 0, 0]], dtype=float)
    rl = np.array([[1, 1, 1, 0, 1, 1, 0, 1]], dtype=float)
    means = resample_means([np.vstack([base, rl, rl])], resamples=1000, seed=0)[:, :, 0]
    assert rgr_interval(means[:, 0], means[:, 2], means[:, 1], 0.95) == (1.0, 1.0)


def test_rgr_interval_is_undefined_when_rl_gain_is_not_clearly_positive():
    base = np.array([0.5, 0.4, 0.6, 0.5])
    rl = np.array([0.6, 0.5, 0.5, 0.7])  # RL below base in a quarter of the resamples
    assert rgr_interval(base, base + 0.05, rl, 0.95) is None
    rl = np.array([0.6] * 79 + [0.4])  # 1 of 80 resamples: within the 2.5% tail
    base80 = np.full(80, 0.5)
    low, high = rgr_interval(base80, np.full(80, 0.55), rl, 0.95)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
