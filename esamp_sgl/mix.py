"""The latent mix and its variants, the post-filter mode, and the novelty readout.

All functions take per-row β [N] and leave rows with β = 0 bit-identical to their input.
"""

from __future__ import annotations

import torch

from esamp_sgl.config import MixVariant

# Above 1/8 of the vocabulary as candidates, the dense W·ĥ is cheaper than per-row gathers.
DENSE_CANDIDATE_SHARE = 8


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


def candidate_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                   temperature: torch.Tensor, rank_filters: bool = True) -> torch.Tensor:
    """Tokens that the base model's own top-k / top-p / min-p filters keep, per row [N, V].

    top_k ≤ 0 or ≥ V means no top-k limit; top_p = 1 and min_p = 0 disable those filters.
    Probabilities are taken at each row's temperature (as the sampler would). With
    ``rank_filters=False`` the caller promises that no row uses top-k or top-p (SGLang keeps that
    as host flags on the batch): min-p alone needs no sort of the vocabulary.
    """
    probs = torch.softmax(logits.float() / temperature.float().clamp_min(1e-6).unsqueeze(-1), dim=-1)
    if not rank_filters:
        return probs >= min_p.float().unsqueeze(-1) * probs.amax(-1, keepdim=True)
    n, vocab = logits.shape
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).expand(n, vocab)
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).unsqueeze(-1)
    keep_sorted = rank < k
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    # top_p = 1 must keep the whole tail, but a float32 cumsum reaches 1.0 before the last token.
    top_p = top_p.float().unsqueeze(-1)
    keep_sorted &= (mass_before < top_p) | (top_p >= 1)
    keep_sorted &= sorted_probs >= min_p.float().unsqueeze(-1) * sorted_probs[:, :1]
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def post_filter_logits(logits: torch.Tensor, h_hat: torch.Tensor, lm_head: torch.Tensor, beta: torch.Tensor,
                       keep: torch.Tensor, beta_host: list[float]) -> torch.Tensor:
    """Post-filter ESamp: the base model picks the candidates, the contrast reweights only them.

    For rows with β > 0: (1+β)·logits − β·(W·ĥ) on the candidates in ``keep``, −inf elsewhere.
    Rows with β = 0 are returned unchanged. ``beta_host`` is β on the host (which rows explore
    is known without reading the device). It runs beside the sampler, after any CUDA graph. On
    CUDA it never syncs with the host: W·ĥ is computed densely. Elsewhere, when few tokens are
    candidates, W·ĥ is computed for the candidates only (gathered rows of the LM head
    ``lm_head`` [V, d]), which needs their count on the host.
    """
    rows_host = [i for i, b in enumerate(beta_host) if b > 0]
    if not rows_host:
        return logits.clone()
    every = len(rows_host) == logits.shape[0]  # the common case: no row copies
    rows = torch.tensor(rows_host, device=logits.device)
    base = logits.float() if every else logits[rows].float()
    keep = keep if every else keep[rows]
    b = beta[rows].float().unsqueeze(-1)
    k = base.shape[1] if logits.is_cuda else int(keep.sum(-1, dtype=torch.int32).max())
    if k * DENSE_CANDIDATE_SHARE > base.shape[1]:
        # Many candidates (e.g. no filter at all): one matmul beats gathering k LM-head rows per row.
        amateur = (h_hat[rows].to(lm_head.dtype) @ lm_head.T).float()  # [R, V]
        mixed_rows = torch.where(keep, (1 + b) * base - b * amateur, float("-inf"))
    else:
        cand = torch.where(keep, base, float("-inf")).topk(k, dim=-1).indices  # [R, k]
        amateur = torch.einsum("rkd,rd->rk", lm_head[cand].float(), h_hat[rows].float())
        mixed = torch.where(keep.gather(1, cand), (1 + b) * base.gather(1, cand) - b * amateur, float("-inf"))
        mixed_rows = torch.full_like(base, float("-inf")).scatter(1, cand, mixed)
    if every:
        return mixed_rows.to(logits.dtype)
    out = logits.clone()
    out[rows] = mixed_rows.to(out.dtype)
    return out
