"""Evaluation metrics: avg@k, unbiased pass@k, and a bootstrap CI over problems.

All values are fractions in [0, 1]; the report multiplies by 100.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Bound the bootstrap's index matrix (resamples x problems) to ~32 MiB of int64 per
# chunk, so a large benchmark cannot allocate gigabytes at once.
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Uses the product form of the Codex paper (Chen et al. 2021):
    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), which never forms the huge
    binomials (C(4000, 2000) overflows a float).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of (correct samples / samples of that problem)."""
    return float(np.mean(_per_problem_accuracy(correct)))


def ks_for(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, plus n itself."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def bootstrap_ci(
    per_problem_scores: Sequence[float],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling problems with replacement.

    Problems are the unit of resampling because samples of one problem are correlated;
    the CI thus says how much the score would move on another draw of problems.
    Deterministic for a given seed.
    """
    scores = np.asarray(per_problem_scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError("need a non-empty 1-D sequence of per-problem scores")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")

    rng = np.random.default_rng(seed)
    p = scores.size
    rows = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // p)
    means = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        idx = rng.integers(0, p, size=(stop - start, p))
        means[start:stop] = scores[idx].mean(axis=1)

    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(
    correct: list[list[bool]],
    lengths: list[list[int]],
    truncated: list[list[bool]],
) -> dict:
    """Summary of one model on one benchmark; the three lists are [problem][sample].

    Every problem must have the same number of samples n: pass@k for k up to n needs
    it, and a ragged input means samples went missing upstream.

    Keys: problems, n, avg_at_n, avg_ci (low, high), pass_at_k {k: value} for
    ks_for(n), mean_response_tokens, truncation_rate (share of samples cut at the
    token limit).
    """
    if not correct:
        raise ValueError("no problems to summarize")
    n = len(correct[0])
    if n == 0 or any(len(row) != n for row in correct):
        counts = sorted({len(row) for row in correct})
        raise ValueError(f"every problem needs the same n >= 1 samples, got {counts}")
    shape = (len(correct), n)
    corr = np.asarray(correct, dtype=bool)
    lens = np.asarray(lengths, dtype=np.float64)
    trunc = np.asarray(truncated, dtype=bool)
    if lens.shape != shape or trunc.shape != shape:
        raise ValueError(
            f"lengths {lens.shape} and truncated {trunc.shape} must match correct {shape}"
        )

    per_problem = corr.mean(axis=1)
    counts = corr.sum(axis=1)
    return {
        "problems": shape[0],
        "n": n,
        "avg_at_n": float(per_problem.mean()),
        "avg_ci": bootstrap_ci(per_problem),
        "pass_at_k": {
            k: float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks_for(n)
        },
        "mean_response_tokens": float(lens.mean()),
        "truncation_rate": float(trunc.mean()),
    }


def _per_problem_accuracy(correct: Sequence[Sequence[bool]]) -> np.ndarray:
    if len(correct) == 0:
        raise ValueError("no problems")
    if any(len(row) == 0 for row in correct):
        raise ValueError("a problem has no samples")
    return np.array([np.mean(np.asarray(row, dtype=bool)) for row in correct])
