"""Accuracy metrics over sampled completions, their bootstrap intervals, and RGR. Pure functions.

Scores are per problem, so every interval comes from resampling problems: the benchmark is the
sample, the k completions of a problem are its measurement. Models compared on one benchmark are
resampled together (paired), which is what makes a difference or a ratio such as RGR tight when
the models fail on the same problems.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k completions, drawn without replacement from n of which
    c are correct, is correct: 1 - C(n-c, k) / C(n, k), the unbiased estimator of Chen et al.
    (2021), computed as a product so it neither overflows nor loses precision."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_per_problem(correct: np.ndarray, k: int) -> np.ndarray:
    """pass@k of each row of a (problems, samples) boolean matrix; pass@1 is the row mean."""
    n = correct.shape[1]
    return np.array([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)])


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """Whether the most frequent final answer among a problem's samples is correct.

    Correct answers form one cluster (each equals the gold answer, so they equal each other
    whatever their spelling, e.g. 1/2 and 0.5); wrong ones are clustered by their text with
    whitespace removed, so a wrong answer spelled two ways splits its votes. Samples without an
    answer do not vote. A tie scores the share of correct clusters among the tied ones: the
    expected result of breaking the tie at random, and independent of sample order.
    """
    votes: Counter[str] = Counter()
    for answer, right in zip(answers, correct, strict=True):
        if right:
            votes["\0correct"] += 1
        elif answer is not None:
            votes["".join(answer.split())] += 1
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [key for key, count in votes.items() if count == top]
    return ("\0correct" in tied) / len(tied)


def resample_means(scores: Sequence[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Bootstrap means over problems: (resamples, models, benchmarks).

    `scores[b]` is a (models, problems) array of per-problem scores on benchmark b. Each
    benchmark's problems are resampled with replacement on their own (a stratified bootstrap:
    benchmarks keep their sizes), and the same draw is used for every model (paired).
    """
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, scores[0].shape[0], len(scores)))
    for b, matrix in enumerate(scores):
        problems = matrix.shape[1]
        counts = rng.multinomial(problems, np.full(problems, 1.0 / problems), size=resamples)
        out[:, :, b] = counts @ matrix.T / problems
    return out


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of a bootstrap distribution (percentile method)."""
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray, *, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean of per-problem scores."""
    matrix = np.asarray(scores, dtype=float)[None, :]
    return percentile_interval(resample_means([matrix], resamples, seed)[:, 0, 0], confidence)


def rgr(base: float, w2sr: float, rl: float) -> float | None:
    """Reasoning Gap Recovered: (W2SR - base) / (RL - base), the share of RL's gain that weak
    supervision recovers. None (undefined) when RL gains nothing: there is no gap to recover,
    and a ratio over a zero or negative gain is meaningless."""
    gain = rl - base
    return (w2sr - base) / gain if gain > 0 else None


def rgr_interval(
    base: np.ndarray, w2sr: np.ndarray, rl: np.ndarray, confidence: float
) -> tuple[float, float] | None:
    """Interval of RGR from paired bootstrap means (one value per resample for each model).

    None when RL's gain is not positive in more than (1 - confidence) / 2 of the resamples: RL's
    gain is then not distinguishable from zero at this level, and the ratio's distribution has
    no finite tail to quote. Otherwise the percentiles of the resamples where RGR is defined.
    """
    gain = rl - base
    defined = gain > 0
    if (~defined).mean() > (1.0 - confidence) / 2.0:
        return None
    ratios = (w2sr[defined] - base[defined]) / gain[defined]
    return percentile_interval(ratios, confidence)
