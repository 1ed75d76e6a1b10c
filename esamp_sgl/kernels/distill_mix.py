"""Fused distiller forward + plain latent mix + novelty, one program per row.

Each row reads its own slot's weights directly (no [N, d, r] gather) and its own β; rows with
β = 0 copy h unchanged (bit-identical) and skip the distiller. Shapes:
x, h: [N, D]; slot: [N] int; beta: [N] fp32; A, G: [S, D, R]; b: [S, R]; B: [S, R, D];
ln_w, ln_b: [S, D]. Outputs h_mix [N, D] (dtype of h), h_hat [N, D] fp32, novelty [N] fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _distill_mix_kernel(
    x_ptr, h_ptr, slot_ptr, beta_ptr,
    a_ptr, g_ptr, b_ptr, bmat_ptr, lnw_ptr, lnb_ptr,
    out_ptr, hhat_ptr, nov_ptr,
    D, R, eps,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    beta = tl.load(beta_ptr + row).to(tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if beta == 0.0:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            hv = tl.load(h_ptr + row * D + offs_d, mask=md)
            tl.store(out_ptr + row * D + offs_d, hv, mask=md)
            tl.store(hhat_ptr + row * D + offs_d, hv.to(tl.float32), mask=md)
        tl.store(nov_ptr + row, 0.0)
    else:
        slot = tl.load(slot_ptr + row).to(tl.int64)
        up = tl.zeros([BLOCK_R], dtype=tl.float32)
        gate = tl.zeros([BLOCK_R], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # up = x·A, gate = x·G
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            x = tl.load(x_ptr + row * D + offs_d, mask=md, other=0.0).to(tl.float32)
            w_off = slot * D * R + offs_d[:, None] * R + offs_r[None, :]
            w_mask = md[:, None] & mask_r[None, :]
            a = tl.load(a_ptr + w_off, mask=w_mask, other=0.0)
            g = tl.load(g_ptr + w_off, mask=w_mask, other=0.0)
            up += tl.sum(x[:, None] * a, axis=0)
            gate += tl.sum(x[:, None] * g, axis=0)
        gate += tl.load(b_ptr + slot * R + offs_r, mask=mask_r, other=0.0)
        z = up * gate * tl.sigmoid(gate)  # up ⊙ SiLU(gate)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # y = x + z·B, kept in h_hat until normalized
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            x = tl.load(x_ptr + row * D + offs_d, mask=md, other=0.0).to(tl.float32)
            bm = tl.load(bmat_ptr + slot * R * D + offs_r[:, None] * D + offs_d[None, :],
                         mask=mask_r[:, None] & md[None, :], other=0.0)
            y = x + tl.sum(z[:, None] * bm, axis=0)
            y = tl.where(md, y, 0.0)
            acc += y
            acc2 += y * y
            tl.store(hhat_ptr + row * D + offs_d, y, mask=md)
        tl.debug_barrier()  # y was stored in another layout than the loads below use
        mean = tl.sum(acc, axis=0) / D
        rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(acc2, axis=0) / D - mean * mean, 0.0) + eps)
        err = tl.zeros([BLOCK_D], dtype=tl.float32)
        norm = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):  # LayerNorm, mix, novelty
            offs_d = d0 + tl.arange(0, BLOCK_D)
            md = offs_d < D
            y = tl.load(hhat_ptr + row * D + offs_d, mask=md, other=0.0)
            w = tl.load(lnw_ptr + slot * D + offs_d, mask=md, other=0.0)
            bias = tl.load(lnb_ptr + slot * D + offs_d, mask=md, other=0.0)
            hat = (y - mean) * rstd * w + bias
            hv = tl.load(h_ptr + row * D + offs_d, mask=md, other=0.0).to(tl.float32)
            diff = tl.where(md, hv - hat, 0.0)
            err += diff * diff
            norm += hv * hv
            tl.store(hhat_ptr + row * D + offs_d, hat, mask=md)
            tl.store(out_ptr + row * D + offs_d, (hv + beta * diff).to(out_ptr.dtype.element_ty), mask=md)
        tl.store(nov_ptr + row, tl.sum(err, axis=0) / tl.maximum(tl.sum(norm, axis=0), 1e-12))


def distill_mix_triton(params: tuple[torch.Tensor, ...], x: torch.Tensor, h: torch.Tensor, slot: torch.Tensor,
                       beta: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel; see the module docstring for shapes. Graph-capturable."""
    A, G, b, B, ln_w, ln_b = params
    n, d = h.shape
    r = A.shape[-1]
    out = torch.empty_like(h)
    h_hat = torch.empty(n, d, dtype=torch.float32, device=h.device)
    nov = torch.empty(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return out, h_hat, nov
    block_r = triton.next_power_of_2(r)
    block_d = max(16, min(triton.next_power_of_2(d), 8192 // block_r))
    _distill_mix_kernel[(n,)](
        x.contiguous(), h.contiguous(), slot.contiguous(), beta.to(torch.float32).contiguous(),
        A.contiguous(), G.contiguous(), b.contiguous(), B.contiguous(), ln_w.contiguous(), ln_b.contiguous(),
        out, h_hat, nov, d, r, eps, BLOCK_D=block_d, BLOCK_R=block_r,
    )
    return out, h_hat, nov
