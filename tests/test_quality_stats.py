"""The quality benchmark's statistics and scoring, against hand-computed values."""

from __future__ import annotations

import itertools
from math import isclose

import numpy as np
import pytest

from benchmarks.quality.metrics import frontier_gap
from benchmarks.quality.stats import bootstrap_mean, distinct, majority_correct, paired_bootstrap, pass_at_k
from benchmarks.quality.tasks import TASKS
from benchmarks.quality.writing import distinct_n, mean_pairwise_cosine, vendi_score


@pytest.mark.parametrize("n,c,k", [(4, 1, 1), (4, 2, 2), (5, 2, 3), (6, 0, 2), (6, 6, 4)])
def test_pass_at_k_is_the_chance_that_k_of_n_samples_contain_a_correct_one(n: int, c: int, k: int) -> None:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_refuses_more_draws_than_samples() -> None:
    with pytest.raises(ValueError, match="pass@5"):
        pass_at_k(4, 1, 5)


def test_majority_vote_and_distinct_answers_ignore_unanswered_samples() -> None:
    answers = ["3", None, "4", "3", None, None]
    assert majority_correct(answers, [True, False, False, True, False, False]) == 1.0
    assert majority_correct(answers, [False, False, True, False, False, False]) == 0.0
    assert majority_correct([None, None], [False, False]) == 0.0
    assert distinct(answers) == 2


def test_paired_bootstrap_interval_brackets_a_constant_shift_and_a_noisy_zero() -> None:
    rng = np.random.default_rng(1)
    b = rng.random(40)
    diff, lo, hi = paired_bootstrap(b + 0.1, b)
    assert isclose(diff, 0.1) and isclose(lo, 0.1) and isclose(hi, 0.1)
    diff, lo, hi = paired_bootstrap(rng.random(40), rng.random(40))
    assert lo < diff < hi and lo < 0.2 and hi > -0.2


def test_frontier_gap_interpolates_between_the_bracketing_points() -> None:
    low = {"pass@1": np.array([0.1, 0.1]), "pass@16": np.array([0.4, 0.4])}
    high = {"pass@1": np.array([0.3, 0.3]), "pass@16": np.array([0.6, 0.6])}
    point = {"pass@1": np.array([0.2, 0.2]), "pass@16": np.array([0.7, 0.7])}
    gap = frontier_gap(point, [high, low])
    assert gap.inside and isclose(gap.diff, 0.2) and isclose(gap.lo, 0.2)
    beyond = frontier_gap({"pass@1": np.array([0.5, 0.5]), "pass@16": np.array([0.5, 0.5])}, [low, high])
    assert not beyond.inside and isclose(beyond.diff, -0.1)


def test_diversity_scores_of_identical_and_orthogonal_items() -> None:
    same = np.tile([[1.0, 2.0, 3.0]], (4, 1))
    orthogonal = np.eye(4)
    assert isclose(vendi_score(same), 1.0, rel_tol=1e-6) and isclose(vendi_score(orthogonal), 4.0, rel_tol=1e-6)
    assert isclose(mean_pairwise_cosine(same), 1.0) and isclose(mean_pairwise_cosine(orthogonal), 0.0)
    assert distinct_n(["a b c", "a b c"]) == 0.5 and distinct_n(["a b", "c d"]) == 1.0


def test_tasks_score_the_last_number_with_reasoning_gyms_scorer() -> None:
    problem = TASKS["products"].problems(2)[0]
    answer = str(problem.entry["answer"])
    assert problem.correct(problem.final_answer(f"First 2, then the result is {answer}."))
    assert not problem.correct(problem.final_answer(f"It is {answer}1"))
    assert problem.final_answer("no number here") is None
    assert TASKS["products"].problems(2)[0].entry == problem.entry  # fixed seed: the same problems


def test_bootstrap_mean_interval_brackets_the_mean_and_narrows_with_agreement() -> None:
    mean, lo, hi = bootstrap_mean([1.0, 1.2, 0.9, 1.1, 1.05])
    assert lo < mean < hi and mean == pytest.approx(1.05)
    assert bootstrap_mean([1.0] * 5) == (1.0, 1.0, 1.0)
