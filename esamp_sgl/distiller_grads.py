"""The distiller's training loss and its gradients, written out by hand.

At the sizes of one decode step (8 rows per slot, rank 32) autograd's bookkeeping and the
transposed products it chooses cost more than the arithmetic: on the CPU here the forward and
backward of 8 slots × 8 rows at d = 576 took 0.66 ms through autograd and take 0.37 ms here.
This is the same forward (esamp_sgl.distiller.distill) and its exact backward in 7 batched
products and a few dozen element-wise ops, with no graph kept; tests/test_core.py checks it
against autograd.
"""

from __future__ import annotations

import torch

LAYER_NORM_EPS = 1e-5  # F.layer_norm's default, which distill uses


def loss_and_grads(params: tuple[torch.Tensor, ...], rows: torch.Tensor, target: torch.Tensor,
                   weight: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Per-slot loss and the gradients of their sum with respect to ``params``.

    params: A, G [L, d, r], b [L, r], B [L, r, d], ln_w, ln_b [L, d] (one slot per leading index);
    rows, target: [L, n, d]; weight: [L, n] per row, 1 / (slot's row count) on real rows and 0 on
    padding, so that slot l's loss is the mean over its rows of the mean squared error over d.
    Returns (loss [L], grads in the order of params).
    """
    A, G, b, B, ln_w, ln_b = params
    d = rows.shape[-1]
    P = torch.bmm(rows, A)
    Q = torch.baddbmm(b.unsqueeze(1), rows, G)
    gate = torch.sigmoid(Q)
    S = Q * gate  # SiLU(Q)
    M = P * S
    y = torch.baddbmm(rows, M, B)
    z, _, rstd = torch.native_layer_norm(y, (d,), None, None, LAYER_NORM_EPS)
    diff = torch.addcmul(ln_b.unsqueeze(1), z, ln_w.unsqueeze(1)).sub_(target)
    sq = diff.pow(2).sum(-1)
    loss = (sq * weight).sum(1) / d

    d_out = diff.mul_((weight * (2.0 / d)).unsqueeze(-1))  # diff is not needed any more
    d_ln_w = (d_out * z).sum(1)
    d_ln_b = d_out.sum(1)
    d_z = d_out * ln_w.unsqueeze(1)
    # LayerNorm's backward: dy = rstd · (dz − mean(dz) − z · mean(dz ⊙ z)).
    d_y = d_z - d_z.mean(-1, keepdim=True) - z * (d_z * z).mean(-1, keepdim=True)
    d_y.mul_(rstd)
    d_B = torch.bmm(M.transpose(1, 2), d_y)
    d_M = torch.bmm(d_y, B.transpose(1, 2))
    d_P = d_M * S
    d_Q = d_M.mul_(P).mul_(gate * (1 + Q * (1 - gate)))  # SiLU'(q) = σ(q)(1 + q(1 − σ(q)))
    d_AG = torch.bmm(rows.transpose(1, 2), torch.cat([d_P, d_Q], -1))
    r = A.shape[-1]
    return loss, (d_AG[..., :r], d_AG[..., r:], d_Q.sum(1), d_B, d_ln_w, d_ln_b)
