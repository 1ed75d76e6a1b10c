"""Triton kernels against their torch references: on CPU under TRITON_INTERPRET=1 (set by
tests/conftest.py before anything imports triton), on CUDA natively. And the kernel compiled for
NVIDIA GPUs by Triton's own compiler and ptxas, which need no GPU (benchmarks/kernel_build.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller import DistillerBank
from esamp_sgl.kernels.distill_mix import distill_mix_triton
from esamp_sgl.latent_step import distill_and_mix_torch
from tests.conftest import child_env

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bank(slots: int, d: int, r: int, seed: int) -> DistillerBank:
    bank = DistillerBank(slots, d, ESampConfig(init="random", rank=r, init_std=0.2), seed=seed, device=DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in bank.params:  # make slots differ from each other and from the identity LayerNorm
        p += (torch.randn(p.shape, generator=gen) * 0.1).to(DEVICE)
    return bank


@pytest.mark.parametrize("n,d,r,slots", [(1, 16, 4, 1), (5, 48, 8, 3), (13, 72, 12, 4), (33, 130, 16, 2)])
def test_fused_distill_mix_matches_torch(n, d, r, slots):
    bank = _bank(slots, d, r, seed=n)
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(n, d, generator=gen)
    h = torch.randn(n, d, generator=gen)
    slot = torch.randint(0, slots, (n,), generator=gen)
    beta = torch.rand(n, generator=gen) * 2
    beta[::3] = 0.0  # mixed β = 0 rows
    slot[::3] = -1  # …which need no slot
    x, h, slot, beta = (t.to(DEVICE) for t in (x, h, slot, beta))

    out, h_hat, nov = distill_mix_triton(bank.params, x, h, slot, beta)
    ref_out, ref_hat, ref_nov = distill_and_mix_torch(bank.params, x, h, slot, beta)

    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h_hat, ref_hat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nov, ref_nov, rtol=1e-4, atol=1e-5)
    zero = beta == 0
    assert torch.equal(out[zero], h[zero])  # bit-identical, not just close


def test_fused_kernel_keeps_half_precision_h():
    bank = _bank(2, 32, 8, seed=3)
    h = torch.randn(4, 32).to(torch.float16)
    x = torch.randn(4, 32)
    slot = torch.tensor([0, 1, 0, 1])
    beta = torch.tensor([0.0, 0.5, 1.0, 0.0])
    x, h, slot, beta = (t.to(DEVICE) for t in (x, h, slot, beta))
    out, _, _ = distill_mix_triton(bank.params, x, h, slot, beta)
    ref, _, _ = distill_and_mix_torch(bank.params, x, h, slot, beta)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    assert torch.equal(out[beta == 0], h[beta == 0])


def test_the_kernel_builds_for_each_nvidia_generation_without_spilling(tmp_path):
    """What a GPU's just-in-time compile would make of the decode path's launches, for sm_80, sm_90
    and sm_100 at d = 4096, ranks 32 and 128 (two block shapes), bf16: a cubin whose registers fit
    (no bytes spilled to local memory) and whose shared memory is far under the 48 KiB any launch
    gets."""
    out = tmp_path / "builds.json"
    env = child_env(TRITON_CACHE_DIR=str(tmp_path / "cache"))  # a compile of its own, not an earlier one's cubin
    subprocess.run([sys.executable, "benchmarks/kernel_build.py", "--dims", "4096", "--ranks", "32", "128",
                    "--dtypes", "bfloat16", "--out", str(out)],
                   env=env, check=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    builds = json.loads(out.read_text())["builds"]
    assert {(b["target"], b["rank"], b["dtype"]) for b in builds} == {
        (t, r, "bfloat16") for t in ("sm_80", "sm_90", "sm_100") for r in (32, 128)}
    for b in builds:
        assert b["local_bytes"] == 0 and b["stack_bytes"] == 0, b
        assert 0 < b["registers"] <= 255 and b["static_shared_bytes"] + b["dynamic_shared_bytes"] <= 48 * 1024, b
