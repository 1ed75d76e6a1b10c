"""Per-request ESamp parameters: the ``custom_params["esamp"]`` contract, validated in one place.

The server validates with it where SGLang turns request errors into HTTP 400; the DSL client
validates ``explore=`` with the same rules before sending anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

KEY = "esamp"
FIELDS = ("beta", "group", "seed", "debug")


@dataclass(frozen=True)
class ExploreParams:
    beta: float = 0.0
    group: str | None = None
    seed: int | None = None
    debug: bool = False

    @property
    def active(self) -> bool:
        return self.beta > 0


def check_beta(value: Any, max_beta: float, name: str = "esamp.beta") -> float:
    """A finite number in [0, max_beta], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    beta = float(value)
    if not math.isfinite(beta) or beta < 0 or beta > max_beta:
        bound = ">= 0" if math.isinf(max_beta) else f"in [0, {max_beta}] (the server's maximum)"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return beta


MAX_GROUP_CHARS = 256


def check_group(value: Any, name: str = "esamp.group") -> str:
    """A non-empty string of at most MAX_GROUP_CHARS characters (any characters), or a ValueError naming ``name``."""
    if not isinstance(value, str) or not value or len(value) > MAX_GROUP_CHARS:
        raise ValueError(f"{name} must be a non-empty string of at most {MAX_GROUP_CHARS} characters, "
                         f"got {value!r:.80}")
    return value


def parse(custom_params: dict[str, Any] | None, max_beta: float) -> ExploreParams:
    """ExploreParams from a request's custom_params; no ``esamp`` entry means plain sampling.
    custom_params that is not an object (SGLang types it as one but only checks on its OpenAI
    endpoints) is refused rather than read as "no entry": a client that sent
    ``"custom_params": "{\"esamp\": ...}"`` meant to explore."""
    if custom_params is None:
        return ExploreParams()
    if not isinstance(custom_params, dict):
        raise ValueError(f"custom_params must be an object like {{\"{KEY}\": {{\"beta\": 0.5}}}}, "
                         f"got {custom_params!r:.80}")
    raw = custom_params.get(KEY)
    if raw is None:
        return ExploreParams()
    if not isinstance(raw, dict):
        raise ValueError(f"custom_params.{KEY} must be an object like {{\"beta\": 0.5}}, got {raw!r}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"custom_params.{KEY} has unknown field(s) {unknown}; known: {list(FIELDS)}")
    beta = check_beta(raw.get("beta", 0.0), max_beta)
    group = raw.get("group")
    if group is not None:
        check_group(group)
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"esamp.seed must be a non-negative integer, got {seed!r}")
    debug = raw.get("debug", False)
    if not isinstance(debug, bool):
        raise ValueError(f"esamp.debug must be true or false, got {debug!r}")
    return ExploreParams(beta, group, seed, debug)
