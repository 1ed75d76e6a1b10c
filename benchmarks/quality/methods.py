"""Sampling methods compared by the quality benchmark, and how each draws n samples of a prompt.

Every sample carries a seed that depends only on (problem, sample index), and every method
samples through ESamp's seeded path (β = 0 is seeded plain sampling), so sample j of a problem
shares its random numbers across methods: differences between methods are paired.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import requests


@dataclass(frozen=True)
class Method:
    """One point of a frontier. ``recipe`` names the server configuration it needs (see
    recipes.py); methods with β = 0 run on any ESamp server."""

    family: str  # "plain", "min_p", "fire", or an ESamp recipe name
    temperature: float
    beta: float = 0.0
    min_p: float = 0.0
    fire_temperature: float = 0.0  # FIRE: the first token's temperature (with top-k FIRE_TOP_K)
    recipe: str = "default"

    @property
    def key(self) -> str:
        parts = [self.family, f"T{self.temperature:g}"]
        if self.beta:
            parts.append(f"b{self.beta:g}")
        if self.min_p:
            parts.append(f"minp{self.min_p:g}")
        if self.fire_temperature:
            parts.append(f"fire{self.fire_temperature:g}")
        return "-".join(parts)


FIRE_TOP_K = 16  # FIRE (Chen et al., 2024): a hot first token among the top candidates only


@dataclass(frozen=True)
class Sample:
    text: str
    output_ids: list[int]
    tokens: int
    novelty: float | None  # mean distiller relative error over mixed tokens (ESamp only)


def _sampling(method: Method, max_tokens: int, seed: int, group: str | None, stop: list[str], *,
              temperature: float | None = None, top_k: int = -1) -> dict:
    esamp: dict = {"seed": seed}
    if method.beta:
        esamp.update(beta=method.beta, group=group)
    params = {"temperature": method.temperature if temperature is None else temperature, "max_new_tokens": max_tokens,
              "min_p": method.min_p, "top_k": top_k, "custom_params": {"esamp": esamp}}
    return params | ({"stop": stop} if stop else {})


def _generate(url: str, ids: list[list[int]], params: list[dict]) -> list[dict]:
    response = requests.post(url + "/generate", json={"input_ids": ids, "sampling_params": params}, timeout=3600)
    response.raise_for_status()
    return response.json()


def draw(url: str, prompt_ids: list[int], method: Method, seeds: list[int], max_tokens: int,
         stop: Sequence[str] = ()) -> list[Sample]:
    """len(seeds) samples of one prompt, each ending at EOS, a ``stop`` string or ``max_tokens``;
    an exploring method puts them all in one fresh group."""
    stop = list(stop)
    group = f"bench-{uuid.uuid4().hex}" if method.beta else None
    if method.fire_temperature:
        return _draw_fire(url, prompt_ids, method, seeds, max_tokens, stop)
    outs = _generate(url, [prompt_ids] * len(seeds), [_sampling(method, max_tokens, s, group, stop) for s in seeds])
    return [Sample(o["text"], o["output_ids"], o["meta_info"]["completion_tokens"],
                   (o["meta_info"].get("esamp") or {}).get("mean_novelty")) for o in outs]


def _draw_fire(url: str, prompt_ids: list[int], method: Method, seeds: list[int], max_tokens: int,
               stop: list[str]) -> list[Sample]:
    """FIRE: the first token at ``fire_temperature`` among the top FIRE_TOP_K, the rest as plain."""
    first = _generate(url, [prompt_ids] * len(seeds),
                      [_sampling(method, 1, s, None, [], temperature=method.fire_temperature, top_k=FIRE_TOP_K)
                       for s in seeds])
    heads = [o["output_ids"] for o in first]
    rest = _generate(url, [prompt_ids + h for h in heads],
                     [_sampling(method, max_tokens - 1, s, None, stop) for s in seeds])
    return [Sample(f["text"] + o["text"], h + o["output_ids"], 1 + o["meta_info"]["completion_tokens"], None)
            for f, h, o in zip(first, heads, rest)]
