"""Per-problem metrics of saved points, and comparisons against a family's frontier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import distinct, majority_correct, paired_bootstrap, pass_at_k

METRICS = ("pass@1", "pass@4", "pass@16", "distinct", "majority", "tokens")


def per_problem(point: dict) -> dict[str, np.ndarray]:
    """Each metric as an array over the point's problems (in problem order)."""
    rows = sorted(point["problems"], key=lambda p: p["index"])
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    for p in rows:
        n, c = len(p["correct"]), sum(p["correct"])
        for k in (1, 4, 16):
            out[f"pass@{k}"].append(pass_at_k(n, c, k) if k <= n else float("nan"))
        out["distinct"].append(distinct(p["answers"]))
        out["majority"].append(majority_correct(p["answers"], p["correct"]))
        out["tokens"].append(float(np.mean(p["tokens"])))
    return {m: np.asarray(v) for m, v in out.items()}


def novelty(point: dict) -> float | None:
    values = [p["novelty"] for p in point["problems"] if p["novelty"] is not None]
    return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class FrontierGap:
    """``metric`` of a point minus the family's frontier at the point's own pass@1."""

    diff: float
    lo: float
    hi: float
    inside: bool  # False: the point's pass@1 lies outside the family's range (nearest end used)


def frontier_gap(point: dict[str, np.ndarray], family: list[dict[str, np.ndarray]], metric: str = "pass@16",
                 *, x: str = "pass@1") -> FrontierGap:
    """Paired bootstrap of point − frontier, the frontier interpolated linearly (per problem)
    between the two family points whose mean ``x`` brackets the point's."""
    ordered = sorted(family, key=lambda f: f[x].mean())
    target = point[x].mean()
    xs = [f[x].mean() for f in ordered]
    inside = xs[0] <= target <= xs[-1]
    if target <= xs[0]:
        ref = ordered[0][metric]
    elif target >= xs[-1]:
        ref = ordered[-1][metric]
    else:
        i = next(i for i in range(len(xs) - 1) if xs[i] <= target <= xs[i + 1])
        w = 0.0 if xs[i + 1] == xs[i] else (target - xs[i]) / (xs[i + 1] - xs[i])
        ref = (1 - w) * ordered[i][metric] + w * ordered[i + 1][metric]
    diff, lo, hi = paired_bootstrap(point[metric], ref)
    return FrontierGap(diff, lo, hi, inside)
