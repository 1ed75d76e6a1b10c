"""ESamp server recipes the quality benchmark compares, as ``--esamp-*`` flags.

Every recipe spells out each screened knob, starting from the reference recipe and changing
one thing at a time, so that a recipe means the same whatever the server's defaults are.
Methods with β = 0 (plain sampling, min-p, FIRE) run on whichever server is up: β = 0 is plain
SGLang, token for token.
"""

from __future__ import annotations

# The reference recipe: random init, SGD lr 1e-3, plain mix, pre-filter, embedding source.
REFERENCE = {"init": "random", "optimizer": "sgd", "lr": "1e-3", "mix": "plain", "filter-mode": "pre",
             "source": "embed"}


def _flags(**changes: str) -> list[str]:
    knobs = {**REFERENCE, **{k.replace("_", "-"): v for k, v in changes.items()}}
    return [arg for name, value in knobs.items() for arg in (f"--esamp-{name}", value)]


RECIPES: dict[str, list[str]] = {
    "random": _flags(),
    "svd": _flags(init="svd"),
    "base": _flags(init="base"),
    "base-post": _flags(init="base", filter_mode="post"),
    "base-orthogonal": _flags(init="base", mix="orthogonal"),
    "base-rescaled": _flags(init="base", mix="rescaled"),
    "base-tempered": _flags(init="base", mix="tempered"),
    "base-lr1e-2": _flags(init="base", lr="1e-2"),
    "base-adamw": _flags(init="base", optimizer="adamw"),
    "base-layer2": _flags(init="base", source="layer:2"),
    # One knob at a time from the default recipe (base-post):
    "base-post-warmup8": _flags(init="base", filter_mode="post", warmup_steps="8"),
    "base-post-steps2": _flags(init="base", filter_mode="post", steps_per_decode="2"),
    "base-post-halflife16": _flags(init="base", filter_mode="post", beta_halflife="16"),
    "base-post-layer2": _flags(init="base", filter_mode="post", source="layer:2"),
    # The learned mix, h + β·(ĥ₀ − ĥ): a group starts as plain sampling and is steered only by
    # what it learned from its own samples; the lr sets how far a group moves within an answer.
    "base-learned-lr2e-2": _flags(init="base", mix="learned", lr="2e-2"),
    "base-learned-lr5e-2": _flags(init="base", mix="learned", lr="5e-2"),
    "base-learned-lr2e-1": _flags(init="base", mix="learned", lr="2e-1"),
}
SCREEN_RECIPES = ("random", "svd", "base", "base-post", "base-orthogonal", "base-rescaled", "base-tempered",
                  "base-lr1e-2", "base-adamw", "base-layer2")
TUNE_RECIPES = ("base-post", "base-post-warmup8", "base-post-steps2", "base-post-halflife16", "base-post-layer2")
LEARNED_RECIPES = ("base-learned-lr2e-2", "base-learned-lr5e-2", "base-learned-lr2e-1")

POST_FILTER_MIN_P = 0.05  # post-filter recipes: the base distribution's min-p picks the candidates
# `bench quality --url`: the recipe is whatever that server serves, named by its filter mode
# (/server_info → internal_states[0].esamp.config.filter_mode).
SERVED_MIN_P = {"served-post": POST_FILTER_MIN_P, "served-pre": 0.0}


def recipe_min_p(recipe: str) -> float:
    """The min-p an exploring request samples with under ``recipe``."""
    if recipe in SERVED_MIN_P:
        return SERVED_MIN_P[recipe]
    flags = RECIPES[recipe]
    post = any(a == "--esamp-filter-mode" and b == "post" for a, b in zip(flags, flags[1:]))
    return POST_FILTER_MIN_P if post else 0.0
