"""The latent mix and its variants, the post-filter mode, and the novelty readout.

All functions take per-row β [N] and leave rows with β = 0 bit-identical to their input.
"""

from __future__ import annotations

import math

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
# Where top-p without top-k is found by bisection rather than a sort. On CPU it took 0.36-0.61 of
# the sort's time up to 3.1M probabilities per step (64 rows of 49k, 16 of 152k) but 1.25 at 9.7M
# (64 of 152k: its 31 passes no longer fit in cache; benchmarks/results/candidate_mask.json). On
# CUDA its 31 steps are ~190 small kernels where the sort is a few; benchmarks/gpu_overhead.py
# times both, and until a GPU has run it the sort stays there.
NUCLEUS_BY_BISECTION_ON = ("cpu",)
BISECTION_MAX_ELEMENTS = 4_000_000
# SGLang's top_k for "the whole vocabulary" (sampling_params.TOP_K_ALL, 0.5.23), as a request's
# top_k reaches the candidate mask; named here so that code without SGLang can pass it too.
TOP_K_ALL = 1 << 30
# The sampler's floor on temperature (a greedy row's 0 would divide by zero).
MIN_TEMPERATURE = 1e-6
# Where the min-p-only post-filter runs in float passes (contrast_above_floor_) instead of a
# boolean mask: on CPU a pass that writes or reads a bool [N, V] tensor took 3-6x a float pass
# (64 x 49k fp32: compare 0.7-1.2 ms, masked_fill 1.3-1.6 ms, sub_ 0.12 ms; mask + contrast
# 2.5 -> 1.25 ms). On CUDA the mask is 1 byte per token against 4, so the boolean form stays.
FLOAT_PASSES_ON = ("cpu",)


def candidate_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                   temperature: torch.Tensor, rank_filters: bool = True, max_top_k: int | None = None
                   ) -> torch.Tensor:
    """Tokens that the base model's own top-k / top-p / min-p filters keep, per row [N, V].

    top_k ≤ 0 or ≥ V means no top-k limit; top_p = 1 and min_p = 0 disable those filters.
    Probabilities are taken at each row's temperature (as the sampler would). Each filter is a
    threshold on the row's probabilities: top-k keeps p ≥ the k-th largest, top-p keeps p_i
    whose more probable tokens hold less than top_p of the mass, min-p keeps p ≥ min_p · p_max.
    So tokens tied at a boundary are all kept (a sampler's sort keeps them in an arbitrary
    order), and a row's candidates depend on that row alone, not on what else is in the batch.

    With ``rank_filters=False`` the caller promises that no row uses top-k or top-p (SGLang keeps
    that as host flags on the batch): min-p alone needs no sort of the vocabulary. ``max_top_k``,
    a host-side bound on every row's top_k, spares the sort of the whole vocabulary: at most
    V / SELECT_INSTEAD_OF_SORT, the thresholds come from one top-k selection (SGLang's own
    top_k_top_p_min_p_sampling_from_probs_torch does the same: top-p's mass is that of the full
    distribution in rank order, so the first k ranks need only the first k probabilities); at
    least V (no row limits top-k), top-p is nucleus_mask's bisection on the devices in
    NUCLEUS_BY_BISECTION_ON, for up to BISECTION_MAX_ELEMENTS probabilities.
    """
    t = temperature.float().clamp_min(MIN_TEMPERATURE)
    keep = min_p_mask(logits, min_p, t)
    if not rank_filters:
        return keep
    vocab = logits.shape[1]
    probs = torch.softmax(logits.float() / t.unsqueeze(-1), dim=-1)
    if (max_top_k is not None and max_top_k >= vocab and probs.device.type in NUCLEUS_BY_BISECTION_ON
            and probs.numel() <= BISECTION_MAX_ELEMENTS):
        return keep & nucleus_mask(probs, top_p)
    if max_top_k is not None and 0 < max_top_k <= vocab // SELECT_INSTEAD_OF_SORT:
        ranked = probs.topk(max_top_k, dim=-1).values  # descending: the sort's first max_top_k
    else:
        ranked = probs.sort(dim=-1, descending=True).values
    width = ranked.shape[1]
    k = torch.where((top_k <= 0) | (top_k >= vocab), width, top_k.clamp(max=width))
    top_k_floor = ranked.gather(1, (k - 1).unsqueeze(-1))
    # The last rank whose more probable tokens hold less than top_p; rank 0 always qualifies.
    # top_p = 1 must keep the whole tail, but a float32 cumsum reaches 1.0 before the last token.
    top_p = top_p.float().unsqueeze(-1)
    last = ((ranked.cumsum(-1) - ranked) < top_p).sum(-1, keepdim=True) - 1
    top_p_floor = torch.where(top_p >= 1, 0.0, ranked.gather(1, last))
    return keep & (probs >= torch.maximum(top_k_floor, top_p_floor))


def nucleus_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top-p rule without a sort: token i is kept iff the mass of the tokens more probable
    than it is below top_p, i.e. iff p_i ≥ τ, the smallest threshold with mass(p > τ) < top_p.
    τ is found by bisection over the bit patterns of float32 (positive floats order as their
    bits): 31 fixed steps, each one compare and one masked sum over the vocabulary — no sort, no
    host sync, fixed shapes (CUDA-graph safe). Exact but for the summation order of the mass and
    for ties at τ, which are all kept (a sort keeps them up to the mass, in an arbitrary order).
    top_p ≥ 1 keeps every token."""
    top_p = top_p.float().to(probs.device)
    lo = torch.zeros(probs.shape[0], dtype=torch.int32, device=probs.device)
    hi = probs.amax(-1).view(torch.int32)  # mass(p > p_max) = 0 < top_p: the top token always stays
    for _ in range(31):  # the bits of a probability ≤ 1.0 span < 2^30
        mid = lo + (hi - lo) // 2
        threshold = mid.view(torch.float32).unsqueeze(-1)
        fits = torch.where(probs > threshold, probs, 0.0).sum(-1) < top_p
        hi = torch.where(fits, mid, hi)
        lo = torch.where(fits, lo, mid + 1)
    return (probs >= hi.view(torch.float32).unsqueeze(-1)) | (top_p >= 1).unsqueeze(-1)


def min_p_floor(logits: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The min-p rule p ≥ min_p · p_max at temperature T as a floor on the logits [N, 1]: in the
    log domain softmax's normaliser cancels, so it is l ≥ l_max + T·ln(min_p) — one max, no exp.
    min_p = 0 gives −inf (every token)."""
    t = temperature.float().clamp_min(MIN_TEMPERATURE)
    return (logits.float().amax(-1) + t * torch.log(min_p.float())).unsqueeze(-1)


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Tokens at or above min_p_floor: always the top token; min_p = 0 keeps every token."""
    return logits >= min_p_floor(logits, min_p, temperature)


def contrast_above_floor_(logits: torch.Tensor, amateur: torch.Tensor, beta: torch.Tensor,
                          floor: torch.Tensor) -> torch.Tensor:
    """contrast_candidates_(logits, amateur, beta, logits ≥ floor) in float passes only (see
    FLOAT_PASSES_ON), for fp32 ``logits`` and ``amateur``; returns ``logits``. ``amateur`` is
    overwritten: it takes the contrast, while ``logits`` becomes a cap of +inf on the candidates
    and −inf elsewhere, and their minimum is the result. The first write (into ``amateur``)
    checks the shapes; nothing after it can fail, so ``logits`` is never left half-written."""
    b = beta.to(logits.device, torch.float32).unsqueeze(-1)
    contrast = amateur.lerp_(logits, 1 + b)  # A + (1+β)(L − A) = (1+β)L − βA
    # (l − floor)·∞: +∞ above the floor, −∞ below, and 0·∞ = NaN exactly at it, a candidate too.
    cap = logits.sub_(floor).mul_(math.inf).nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return torch.minimum(contrast, cap, out=logits)


def contrast_candidates(logits: torch.Tensor, amateur: torch.Tensor, beta: torch.Tensor,
                        keep: torch.Tensor) -> torch.Tensor:
    """(1+β)·L(h) − β·L(ĥ) on the candidates in ``keep``, −inf elsewhere, for rows that all
    explore (β > 0), as a new tensor (contrast_candidates_ writes it into ``logits``)."""
    return contrast_candidates_(logits.clone(), amateur, beta, keep)


def contrast_candidates_(logits: torch.Tensor, amateur: torch.Tensor, beta: torch.Tensor,
                         keep: torch.Tensor) -> torch.Tensor:
    """contrast_candidates in place, returning ``logits``: one lerp and one fill over the rows
    and no [N, V] temporary where the logits are fp32 (on CPU a fresh 12 MB tensor per step
    cost more than the arithmetic). Everything that can fail (the inverted mask, fp32 copies)
    comes before the first write, so a caller that serves the base logits on error finds them
    intact."""
    b = beta.to(logits.device, torch.float32).unsqueeze(-1)
    drop = ~keep
    amateur = amateur.float()
    if logits.dtype != torch.float32:
        mixed = torch.lerp(logits.float(), amateur, -b).masked_fill_(drop, float("-inf"))
        return logits.copy_(mixed)
    return logits.lerp_(amateur, -b).masked_fill_(drop, float("-inf"))  # L + (−β)(A − L) = (1+β)L − βA


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
