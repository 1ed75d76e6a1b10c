"""Seeded sampling: the same request seed gives the same tokens, whatever else is in the batch.

SGLang honours ``sampling_seed`` only under --enable-deterministic-inference, which the CPU
attention backend here does not support. ESamp's seeded path samples rows itself: the base
filters (top-k / top-p / min-p) on the row's probabilities, then a Gumbel-max draw whose noise
comes from a generator seeded by (request seed, token position) — so a β = 0 request with a
seed is a seeded plain sample, and methods can be paired sample by sample.
"""

from __future__ import annotations

import torch

from esamp_sgl.mix import candidate_mask


def _row_seed(seed: int, position: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def seeded_sample(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  seeds: list[int], positions: list[int], rank_filters: bool = True) -> torch.Tensor:
    """Token ids [R] for probability rows [R, V] (temperature already applied); ``rank_filters``
    as in candidate_mask."""
    keep = candidate_mask(probs.clamp_min(1e-30).log(), top_k, top_p, min_p, torch.ones_like(top_p), rank_filters)
    scores = probs.float().clamp_min(1e-30).log().masked_fill(~keep, float("-inf"))
    noise = torch.stack([
        torch.rand(probs.shape[1], generator=torch.Generator().manual_seed(_row_seed(s, p)))
        for s, p in zip(seeds, positions)
    ]).to(probs.device)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
    return (scores + gumbel).argmax(dim=-1)
