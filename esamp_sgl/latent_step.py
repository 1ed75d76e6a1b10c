"""The in-graph part of ESamp for one decode step: distiller forward, latent mix, novelty.

``distill_and_mix`` is what the server calls between the final norm and the LM head. It runs
the fused Triton kernel on CUDA for the plain mix, and the torch path otherwise (CPU, or the
other mix variants). Both are graph-safe: persistent inputs, fixed shapes, no host syncs.
"""

from __future__ import annotations

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
    if groups is None:
        h_hat = distiller_forward(params, x.to(torch.float32), slot.clamp_min(0))
    else:
        grouped = distiller_forward_grouped(tuple(p.index_select(0, groups.live) for p in params),
                                            x.to(torch.float32), groups)
        padded = torch.cat([h.to(torch.float32), h.new_zeros(1, h.shape[1], dtype=torch.float32)])
        h_hat = padded.index_copy(0, groups.index.flatten(), grouped.flatten(0, 1))[:-1]
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
