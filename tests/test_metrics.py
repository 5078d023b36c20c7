"""pass@k / avg@k / bootstrap CI: hand-computed values and the identities they obey."""

import json
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from pipeline.metrics import avg_at_k, bootstrap_ci, ks_for, pass_at_k, summarize


def exact_pass_at_k(n, c, k):
    """Reference: the textbook formula in exact rational arithmetic."""
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


# ---- pass@k -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 0.25),  # one of four
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 2, 3, 1.0),  # only 2 wrong: every 3-subset holds a correct one
        (16, 0, 16, 0.0),
        (16, 16, 1, 1.0),
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_formula_on_a_grid():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_where_the_naive_formula_overflows():
    # C(4000, 2000) ~ 1e1203 cannot be a float; the product form never builds it.
    with pytest.raises(OverflowError):
        float(comb(4000, 2000))
    expected = 1 - (2000 * 1999 * 1998) / (4000 * 3999 * 3998)
    assert pass_at_k(4000, 3, 2000) == pytest.approx(expected, rel=1e-12)


def test_pass_at_1_is_the_fraction_correct():
    for n in (1, 3, 16, 64):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


def test_pass_at_k_is_monotone_in_k():
    for n in (4, 16, 33):
        for c in range(n + 1):
            values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
            assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), (n, c, values)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---- avg@k, ks ----------------------------------------------------------------------


def test_avg_at_k_is_mean_of_per_problem_rates():
    # 2/4, 4/4, 0/4 -> (0.5 + 1 + 0) / 3
    correct = [[True, False, True, False], [True] * 4, [False] * 4]
    assert avg_at_k(correct) == pytest.approx(0.5)


def test_avg_at_k_weights_problems_not_samples():
    # 1/1 and 0/3: per-problem mean is 0.5; a pooled mean over samples would be 0.25.
    assert avg_at_k([[True], [False, False, False]]) == pytest.approx(0.5)


def test_avg_at_k_rejects_empty_input():
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], []])


@pytest.mark.parametrize(
    "n, expected",
    [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]), (5, [1, 2, 4, 5]), (16, [1, 2, 4, 8, 16]),
     (24, [1, 2, 4, 8, 16, 24])],
)
def test_ks_for(n, expected):
    assert ks_for(n) == expected


def test_ks_for_rejects_zero():
    with pytest.raises(ValueError):
        ks_for(0)


# ---- bootstrap CI ---------------------------------------------------------------------


def test_bootstrap_ci_is_deterministic_given_seed():
    scores = np.random.default_rng(1).random(50)
    assert bootstrap_ci(scores, seed=7) == bootstrap_ci(scores, seed=7)
    assert bootstrap_ci(scores, seed=7) != bootstrap_ci(scores, seed=8)


def test_bootstrap_ci_contains_point_estimate_and_is_ordered():
    scores = np.random.default_rng(2).random(40)
    low, high = bootstrap_ci(scores)
    assert low < float(np.mean(scores)) < high


def test_bootstrap_ci_narrows_with_more_problems():
    rng = np.random.default_rng(3)
    widths = []
    for problems in (20, 200, 2000):
        low, high = bootstrap_ci(rng.random(problems))
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # Standard error shrinks like 1/sqrt(P): 100x the problems, ~1/10 the width.
    assert widths[2] / widths[0] == pytest.approx(0.1, rel=0.3)


def test_bootstrap_ci_width_grows_with_level():
    scores = np.random.default_rng(4).random(100)
    low90, high90 = bootstrap_ci(scores, level=0.90)
    low99, high99 = bootstrap_ci(scores, level=0.99)
    assert low99 < low90 and high99 > high90


def test_bootstrap_ci_matches_the_normal_interval_for_a_large_sample():
    # For a mean over 400 problems the bootstrap is close to mean +- 1.96 SE.
    scores = np.random.default_rng(6).random(400)
    se = scores.std() / np.sqrt(scores.size)
    low, high = bootstrap_ci(scores, level=0.95, resamples=4000)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.08)
    assert (low + high) / 2 == pytest.approx(scores.mean(), abs=0.2 * se)


def test_bootstrap_ci_of_constant_scores_is_a_point():
    assert bootstrap_ci([0.25] * 30) == (0.25, 0.25)
    assert bootstrap_ci([1.0]) == (1.0, 1.0)


def test_bootstrap_ci_chunking_does_not_change_the_result(monkeypatch):
    # Large benchmarks are resampled in chunks; the answer must not depend on it.
    import pipeline.metrics as metrics

    scores = np.random.default_rng(5).random(300)
    whole = bootstrap_ci(scores, seed=3)
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK_ELEMENTS", 300 * 7)  # 7 rows a chunk
    chunked = bootstrap_ci(scores, seed=3)
    assert chunked == pytest.approx(whole, abs=0.02)
    low, high = chunked
    assert low < float(np.mean(scores)) < high


def test_bootstrap_ci_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([0.5], level=1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([0.5], resamples=0)


# ---- summarize ------------------------------------------------------------------------


def _random_run(problems, n, seed):
    rng = np.random.default_rng(seed)
    difficulty = rng.random(problems)
    correct = (rng.random((problems, n)) < difficulty[:, None]).tolist()
    lengths = rng.integers(10, 500, size=(problems, n)).tolist()
    truncated = (rng.random((problems, n)) < 0.1).tolist()
    return correct, lengths, truncated


def test_summarize_hand_computed():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4]
    lengths = [[10, 20, 30, 40], [50, 60, 70, 80], [100, 100, 100, 100]]
    truncated = [[False] * 4, [False, False, False, True], [True, True, False, False]]
    s = summarize(correct, lengths, truncated)
    assert s["problems"] == 3
    assert s["n"] == 4
    assert s["avg_at_n"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    assert sorted(s["pass_at_k"]) == [1, 2, 4]
    # pass@2 per problem: 1 - C(3,2)/C(4,2) = 1/2, 1 - C(2,2)/C(4,2) = 5/6, 0
    assert s["pass_at_k"][2] == pytest.approx((1 / 2 + 5 / 6 + 0) / 3)
    assert s["pass_at_k"][4] == pytest.approx(2 / 3)
    assert s["mean_response_tokens"] == pytest.approx(760 / 12)
    assert s["truncation_rate"] == pytest.approx(3 / 12)
    low, high = s["avg_ci"]
    assert 0.0 <= low <= s["avg_at_n"] <= high <= 1.0


def test_summarize_identities():
    correct, lengths, truncated = _random_run(problems=200, n=16, seed=0)
    s = summarize(correct, lengths, truncated)
    # pass@1 is avg@n when every problem has n samples.
    assert s["pass_at_k"][1] == pytest.approx(s["avg_at_n"], abs=1e-12)
    assert s["avg_at_n"] == pytest.approx(avg_at_k(correct), abs=1e-12)
    # pass@n is the share of problems with at least one correct sample.
    assert s["pass_at_k"][16] == pytest.approx(np.mean([any(row) for row in correct]))
    values = [s["pass_at_k"][k] for k in ks_for(16)]
    assert values == sorted(values)
    low, high = s["avg_ci"]
    assert low < s["avg_at_n"] < high


def test_summarize_ci_resamples_problems_not_samples():
    # 10 problems always solved, 10 never: 20 independent units, not 320. The CI must
    # be as wide as a mean of 20 coin flips (SE 0.11, width ~0.44).
    correct = [[True] * 16] * 10 + [[False] * 16] * 10
    s = summarize(correct, [[1] * 16] * 20, [[False] * 16] * 20)
    low, high = s["avg_ci"]
    assert high - low > 0.3
    assert s["avg_ci"] == bootstrap_ci([1.0] * 10 + [0.0] * 10)


def test_summarize_is_json_serialisable():
    s = summarize(*_random_run(problems=5, n=3, seed=1))
    assert sorted(s["pass_at_k"]) == [1, 2, 3]
    json.dumps(s)  # numpy scalars would raise here


@pytest.mark.parametrize("value, expected", [(True, 1.0), (False, 0.0)])
def test_summarize_all_correct_or_none(value, expected):
    correct = [[value] * 8 for _ in range(10)]
    s = summarize(correct, [[5] * 8] * 10, [[False] * 8] * 10)
    assert s["avg_at_n"] == expected
    assert s["avg_ci"] == (expected, expected)
    assert s["pass_at_k"] == {1: expected, 2: expected, 4: expected, 8: expected}
    assert s["truncation_rate"] == 0.0


def test_summarize_single_sample_per_problem():
    correct = [[True], [False], [True], [True]]
    s = summarize(correct, [[1], [2], [3], [4]], [[False], [True], [False], [False]])
    assert s["n"] == 1
    assert s["pass_at_k"] == {1: pytest.approx(0.75)}
    assert s["avg_at_n"] == pytest.approx(0.75)
    assert s["mean_response_tokens"] == pytest.approx(2.5)
    assert s["truncation_rate"] == pytest.approx(0.25)


def test_summarize_rejects_ragged_or_mismatched_input():
    with pytest.raises(ValueError):
        summarize([[True, False], [True]], [[1, 1], [1]], [[False, False], [False]])
    with pytest.raises(ValueError):
        summarize([[True, False]], [[1]], [[False, False]])
    with pytest.raises(ValueError):
        summarize([], [], [])
