"""Statistics of the quality benchmark: unbiased pass@k, majority vote, bootstrap intervals."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 − C(n−c, k)/C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """1.0 if the most frequent answer (ties: first seen) is correct; unanswered samples do not vote."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = votes.most_common(1)[0][0]
    return float(next(ok for a, ok in zip(answers, correct) if a == top))


def distinct(answers: Sequence[str | None]) -> int:
    return len({a for a in answers if a is not None})


def bootstrap_mean(values: Sequence[float], *, iters: int = 4000, level: float = 0.9,
                   seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap interval at ``level``."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(iters, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(lo), float(hi)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, iters: int = 4000, level: float = 0.9,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over problems and its percentile interval, resampling problems with the
    same indices for both sides (a[i] and b[i] belong to one problem)."""
    if len(a) == 0:
        raise ValueError("paired_bootstrap needs at least one problem")
    return bootstrap_mean(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), iters=iters, level=level, seed=seed)
