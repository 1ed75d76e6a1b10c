"""The in-graph part of ESamp for one decode step: distiller forward, latent mix, novelty.

``distill_and_mix`` is what the server calls between the final norm and the LM head. It runs
the fused Triton kernel on CUDA for the plain mix, and the torch path otherwise (CPU, or the
other mix variants). Both are graph-safe: persistent inputs, fixed shapes, no host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from esamp_sgl.config import MixVariant
from esamp_sgl.distiller import Params, RowGroups, distill, distiller_forward, distiller_forward_grouped
from esamp_sgl.mix import mix_hidden, novelty


def distill_and_mix_torch(params: Params, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor,
                          beta: torch.Tensor, variant: MixVariant = "plain", groups: RowGroups | None = None,
                          start: Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h_mix, ĥ, novelty) per row. Rows with β = 0: h_mix = h bit for bit, ĥ = h, novelty 0.

    Without ``groups`` each row gathers its slot's weights (graph-safe). With ``groups`` (rows
    grouped by slot on the host; eager) the distiller runs once per slot on its rows, which is
    measured faster on CPU; rows outside every group keep ĥ = h.

    Variant "learned" needs ``start``, the weights every group starts from (no slot dimension):
    with ĥ₀ their prediction, the returned ĥ is h − (ĥ₀ − ĥ_group), so that the plain mix (and
    the post-filter's contrast) steer by ĥ₀ − ĥ_group alone; novelty stays the group
    distiller's own error.
    """
    return mix_prediction(x, h, predict(params, x, h, slot, groups), beta, variant, start)


def predict(params: Params, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor,
            groups: RowGroups | None = None) -> torch.Tensor:
    """The distillers' ĥ [N, d] fp32, before the mix: as distill_and_mix_torch describes
    (``groups`` or not), whatever the rows' β."""
    if groups is None:
        return distiller_forward(params, x.to(torch.float32), slot.clamp_min(0))
    grouped = distiller_forward_grouped(tuple(p.index_select(0, groups.live) for p in params),
                                        x.to(torch.float32), groups)
    padded = torch.cat([h.to(torch.float32), h.new_zeros(1, h.shape[1], dtype=torch.float32)])
    return padded.index_copy(0, groups.index.flatten(), grouped.flatten(0, 1))[:-1]


def mix_prediction(x: torch.Tensor, h: torch.Tensor, h_hat: torch.Tensor, beta: torch.Tensor,
                   variant: MixVariant = "plain", start: Params | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h_mix, ĥ, novelty) from ĥ [N, d] fp32 predicted for the exploring rows (other rows: any
    value; they come out with ĥ = h, novelty 0 and h_mix = h bit for bit)."""
    active = (beta != 0).unsqueeze(-1)
    h_hat = torch.where(active, h_hat, h.to(torch.float32))
    error = novelty(h, h_hat)
    if variant == "learned":
        if start is None:
            raise ValueError("mix variant 'learned' needs the groups' starting weights (start=)")
        h_hat = torch.where(active, h.to(torch.float32) - distill(x.to(torch.float32), *start) + h_hat, h_hat)
        variant = "plain"
    return mix_hidden(h, h_hat, beta, variant), h_hat, error


def distill_and_mix(params: Params, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor,
                    beta: torch.Tensor, variant: MixVariant = "plain", groups: RowGroups | None = None,
                    start: Params | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if h.is_cuda and variant == "plain":
        from esamp_sgl.kernels.distill_mix import distill_mix_triton

        return distill_mix_triton(params, x, h, slot, beta)
    return distill_and_mix_torch(params, x, h, slot, beta, variant, None if h.is_cuda else groups, start)


def distill_and_mix_sharded(params: Params, x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor,
                            held: torch.Tensor, beta: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor],
                            variant: MixVariant = "plain", groups: RowGroups | None = None,
                            start: Params | None = None, on_error: Callable[[Exception], None] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """distill_and_mix with the groups shared out over tensor-parallel ranks (esamp_sgl/shard.py):
    ``params`` and ``slot`` are this rank's bank and local slots, ``held`` [N] bool marks the rows
    of the groups it holds, ``reduce`` sums a tensor over the ranks (SGLang's TP all-reduce, which
    is CUDA-graph safe), ``groups`` (eager, CPU) groups the held rows by local slot. Every rank
    must call it for the same rows, and gets the same (h_mix, ĥ, novelty).

    The ranks must meet in the all-reduce whatever happens on one of them: where this rank's
    prediction raises, ``on_error`` gets the error and the rank contributes NaN rows for its
    groups. A row whose summed ĥ is not finite is served unmixed (β = 0) on every rank alike —
    which also covers a prediction that is itself NaN."""
    try:
        if h.is_cuda:  # the fused kernel skips rows with β = 0: here those of other ranks' groups
            from esamp_sgl.kernels.distill_mix import distill_mix_triton

            _, own, _ = distill_mix_triton(params, x, h, slot, torch.where(held, beta, 0.0))
        else:  # the prediction alone: the mix comes after the sum
            own = predict(params, x, h, slot, groups)
        part = torch.where(held.unsqueeze(-1), own, 0.0)
    except Exception as error:
        if on_error is None:
            raise
        on_error(error)
        part = torch.zeros(h.shape, dtype=torch.float32, device=h.device).masked_fill_(held.unsqueeze(-1), math.nan)
    h_hat = reduce(part)
    served = h_hat.isfinite().all(-1)
    return mix_prediction(x, h, h_hat, torch.where(served, beta, 0.0), variant, start)
