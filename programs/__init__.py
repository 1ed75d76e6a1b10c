"""SGLang programs that explore with ESamp: each a function to import and a CLI
(``esamp-sgl run NAME ...``). Programs take ``explore`` (β; None = plain sampling)."""

PROGRAMS = {
    "self-consistency": "programs.self_consistency",
    "best-of-n": "programs.best_of_n",
    "tree-of-thought": "programs.tree_of_thought",
    "creative-fanout": "programs.creative_fanout",
}
