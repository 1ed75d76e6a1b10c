"""Where two greedy runs part, and how close the step's top two were: a float tie (another
summation order — TP's all-reduce, another kernel — may pick either) or a real difference."""

from __future__ import annotations


def first_divergence(reference: list[int], ids: list[int]) -> int | None:
    """The first step at which the two token runs differ, or None where they agree throughout."""
    return next((i for i, (a, b) in enumerate(zip(reference, ids)) if a != b), None)


def top_two_gap(out: dict, step: int) -> float:
    """|logprob₁ − logprob₂| at ``step`` of a /generate answer asked with top_logprobs_num ≥ 2."""
    top_two = out["meta_info"]["output_top_logprobs"][step]
    return abs(top_two[0][0] - top_two[1][0])
