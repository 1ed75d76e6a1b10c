"""The latent mix and its variants, the post-filter mode, and the novelty readout.

All functions take per-row β [N] and leave rows with β = 0 bit-identical to their input.
"""

from __future__ import annotations

import torch

from esamp_sgl.config import MixVariant

def mix_hidden(h: torch.Tensor, h_hat: torch.Tensor, beta: torch.Tensor, variant: MixVariant = "plain") -> torch.Tensor:
    """h_mix per row; W·h_mix equals the contrastive logits (1+β)·W·h − β·W·ĥ for 'plain'.

    plain:      h + β(h − ĥ)
    orthogonal: h + β·(h − ĥ)⊥h — only the part of h − ĥ orthogonal to h, so ‖h‖ (and the
                logit scale, i.e. the effective temperature) changes only to second order
    rescaled:   the plain mix rescaled to ‖h‖
    tempered:   the plain mix divided by 1 + β, undoing the 1+β logit scale that an
                uninformative ĥ would otherwise turn into a lower temperature
    ("learned" is the plain mix of a transformed ĥ: see latent_step.distill_and_mix_torch.)
    Graph-safe: no host syncs, no data-dependent shapes.
    """
    hf, hat = h.to(torch.float32), h_hat.to(torch.float32)
    b = beta.to(torch.float32).unsqueeze(-1)
    delta = hf - hat
    if variant == "orthogonal":
        coef = (delta * hf).sum(-1, keepdim=True) / (hf * hf).sum(-1, keepdim=True).clamp_min(1e-12)
        delta = delta - coef * hf
    mixed = hf + b * delta
    if variant == "rescaled":
        mixed = mixed * (hf.norm(dim=-1, keepdim=True) / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    elif variant == "tempered":
        mixed = mixed / (1 + b)
    return torch.where(b == 0, h, mixed.to(h.dtype))


def novelty(h: torch.Tensor, h_hat: torch.Tensor) -> torch.Tensor:
    """Relative prediction error ‖h − ĥ‖² / ‖h‖² per row: ≈ 0 on familiar paths, ≈ 1+ on new ones."""
    hf = h.to(torch.float32)
    return (hf - h_hat.to(torch.float32)).pow(2).sum(-1) / hf.pow(2).sum(-1).clamp_min(1e-12)


# Ranks from a top-k selection instead of a sort of the vocabulary while k ≤ V / this: on CPU the
# selection took 5-21% of the sort's time up to k = 1024 (benchmarks/results/candidate_mask.json);
# k between 1024 and V / 16 is not measured, nor is any of it on GPU.
SELECT_INSTEAD_OF_SORT = 16


def candidate_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                   temperature: torch.Tensor, rank_filters: bool = True, max_top_k: int | None = None
                   ) -> torch.Tensor:
    """Tokens that the base model's own top-k / top-p / min-p filters keep, per row [N, V].

    top_k ≤ 0 or ≥ V means no top-k limit; top_p = 1 and min_p = 0 disable those filters.
    Probabilities are taken at each row's temperature (as the sampler would). With
    ``rank_filters=False`` the caller promises that no row uses top-k or top-p (SGLang keeps that
    as host flags on the batch): min-p alone needs no sort of the vocabulary. ``max_top_k``, a
    host-side bound on every row's top_k (a limit on each), lets the ranks come from one top-k
    selection instead of a sort of the whole vocabulary: SGLang's top-p mass is that of the
    full distribution in rank order, so the first k ranks need only the first k probabilities.
    """
    t = temperature.float().clamp_min(1e-6)
    keep = min_p_mask(logits, min_p, t)
    if not rank_filters:
        return keep
    n, vocab = logits.shape
    probs = torch.softmax(logits.float() / t.unsqueeze(-1), dim=-1)
    if max_top_k is not None and 0 < max_top_k <= vocab // SELECT_INSTEAD_OF_SORT:
        sorted_probs, order = probs.topk(max_top_k, dim=-1)  # descending, like the sort's head
    else:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(order.shape[1], device=logits.device).expand(n, -1)
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).unsqueeze(-1)
    keep_sorted = rank < k
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    # top_p = 1 must keep the whole tail, but a float32 cumsum reaches 1.0 before the last token.
    top_p = top_p.float().unsqueeze(-1)
    keep_sorted &= (mass_before < top_p) | (top_p >= 1)
    keep_sorted[:, 0] = True
    ranked = torch.zeros_like(keep).scatter_(1, order, keep_sorted)
    return keep & ranked


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """p ≥ min_p · p_max at temperature T, in the log domain: softmax's normaliser cancels, so it
    is l ≥ l_max + T·ln(min_p) — one max and one compare over the vocabulary, no exp. Always
    keeps the top token; min_p = 0 keeps every token."""
    floor = logits.float().amax(-1) + temperature * torch.log(min_p.float())
    return logits >= floor.unsqueeze(-1)


def contrast_candidates(logits: torch.Tensor, amateur: torch.Tensor, beta: torch.Tensor,
                        keep: torch.Tensor) -> torch.Tensor:
    """(1+β)·L(h) − β·L(ĥ) on the candidates in ``keep``, −inf elsewhere, for rows that all
    explore (β > 0): one fused pass (lerp) and an in-place fill."""
    b = beta.to(logits.device, torch.float32).unsqueeze(-1)
    mixed = torch.lerp(logits.float(), amateur.float(), -b)  # L + (−β)(A − L) = (1+β)L − βA
    return mixed.masked_fill_(~keep, float("-inf")).to(logits.dtype)


def post_filter_logits(logits: torch.Tensor, amateur: torch.Tensor, beta: torch.Tensor,
                       keep: torch.Tensor) -> torch.Tensor:
    """Post-filter ESamp: the base model picks the candidates, the contrast reweights only them.

    ``logits`` [N, V] are the base logits L(h), ``amateur`` [N, V] the logits L(ĥ) of the same
    LM head with the same head transform (vocabulary cut, logit scale, softcapping), ``beta``
    [N] on the logits' device. Rows with β > 0: contrast_candidates; rows with β = 0 are
    returned unchanged. Dense and on the device: no host sync, no data-dependent shapes.
    """
    b = beta.to(logits.device, torch.float32).unsqueeze(-1)
    return torch.where(b > 0, contrast_candidates(logits, amateur, beta, keep), logits)
