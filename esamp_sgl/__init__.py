"""esamp-sgl: Exploratory Sampling (ESamp) for SGLang.

Importing the package enables ``explore=`` in SGLang's frontend (``sgl.gen(..., explore=0.5)``,
``.run(..., explore=...)``); ``esamp_sgl.gen`` is the same function, ``esamp_sgl.Runtime``
starts a local ESamp server for scripts and notebooks.
"""

from esamp_sgl.frontend import ExploreUnavailable, gen, install
from esamp_sgl.runtime import Runtime

install()

__all__ = ["ExploreUnavailable", "Runtime", "gen"]
