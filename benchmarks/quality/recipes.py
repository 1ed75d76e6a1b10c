"""ESamp server recipes the quality benchmark compares: each is a set of ``--esamp-*`` flags.

Screening changes one thing at a time from a parent recipe. Methods with β = 0 (plain
sampling, min-p, FIRE) run on whichever server is up: β = 0 is plain SGLang, token for token.
"""

from __future__ import annotations

RECIPES: dict[str, list[str]] = {
    # the reference recipe: random init, SGD lr 1e-3, plain mix, pre-filter, embedding source
    "random": ["--esamp-init", "random"],
    "svd": ["--esamp-init", "svd"],
    "base": ["--esamp-init", "base"],
    "base-post": ["--esamp-init", "base", "--esamp-filter-mode", "post"],
    "base-orthogonal": ["--esamp-init", "base", "--esamp-mix", "orthogonal"],
    "base-rescaled": ["--esamp-init", "base", "--esamp-mix", "rescaled"],
    "base-tempered": ["--esamp-init", "base", "--esamp-mix", "tempered"],
    "base-layer2": ["--esamp-init", "base", "--esamp-source", "layer:2"],
    "base-lr1e-2": ["--esamp-init", "base", "--esamp-lr", "1e-2"],
    "base-adamw": ["--esamp-init", "base", "--esamp-optimizer", "adamw"],
    # combinations: a distiller that adapts to the group fast, without the 1+β logit scale
    "base-tempered-lr1e-2": ["--esamp-init", "base", "--esamp-mix", "tempered", "--esamp-lr", "1e-2"],
    "base-tempered-post": ["--esamp-init", "base", "--esamp-mix", "tempered", "--esamp-filter-mode", "post"],
}

POST_FILTER_MIN_P = 0.05  # post-filter recipes: the base distribution's min-p picks the candidates


def recipe_min_p(recipe: str) -> float:
    """The min-p an exploring request samples with under ``recipe``."""
    flags = RECIPES[recipe]
    post = any(a == "--esamp-filter-mode" and b == "post" for a, b in zip(flags, flags[1:]))
    return POST_FILTER_MIN_P if post else 0.0
