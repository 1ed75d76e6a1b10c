"""The decode step in CUDA-graph form (esamp_sgl/graph_rows.py), on CPU: what it computes, that
its buffers carry exactly one step's β, and that it compiles as one graph (no host syncs)."""

from __future__ import annotations

import torch

from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller import DistillerBank, RowGroups
from esamp_sgl.graph_rows import GraphRows
from esamp_sgl.latent_step import distill_and_mix_torch

D = 24
CPU = torch.device("cpu")


def _setup(rows: int = 6) -> tuple[DistillerBank, GraphRows, torch.Tensor, torch.Tensor]:
    bank = DistillerBank(4, D, ESampConfig(init="random", rank=8, init_std=0.3))
    gen = torch.Generator().manual_seed(0)
    return bank, GraphRows(8, D, CPU), torch.randn(rows, D, generator=gen), torch.randn(rows, D, generator=gen)


def test_step_equals_the_eager_step_and_leaves_other_rows_unchanged():
    bank, rows, x, h = _setup()
    beta, slot = [1.0, 0.0, 0.5, 2.0], [2, -1, 0, 2]  # 4 live rows; rows 4, 5 are the graph's padding
    rows.load(beta, slot)
    out = rows.step(bank.params, x, h, "plain", mix=True)
    want_mix, want_hat, want_novelty = distill_and_mix_torch(
        bank.params, x[:4], h[:4], torch.tensor(slot), torch.tensor(beta), groups=RowGroups.of(slot, CPU))
    torch.testing.assert_close(out[:4], want_mix, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], h[1]) and torch.equal(out[4:], h[4:])  # β = 0: bit for bit
    snap = rows.rows(4)
    assert torch.equal(snap.x, x[:4]) and torch.equal(snap.h, h[:4])
    torch.testing.assert_close(snap.h_hat, want_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(snap.novelty, want_novelty, rtol=1e-5, atol=1e-5)


def test_post_filter_form_leaves_h_and_still_predicts():
    bank, rows, x, h = _setup()
    rows.load([1.0, 1.0], [0, 1])
    assert torch.equal(rows.step(bank.params, x, h, "plain", mix=False), h)
    assert not torch.equal(rows.rows(2).h_hat, h[:2])


def test_a_step_sees_only_its_own_rows_beta():
    bank, rows, x, h = _setup()
    rows.load([1.0, 1.0, 1.0, 1.0], [0, 1, 2, 3])
    rows.step(bank.params, x, h, "plain", mix=True)
    rows.load([0.5], [1])  # a smaller batch next: rows 1.. must not keep the earlier β
    out = rows.step(bank.params, x, h, "plain", mix=True)
    assert not torch.equal(out[0], h[0]) and torch.equal(out[1:], h[1:])
    rows.clear()
    assert torch.equal(rows.step(bank.params, x, h, "plain", mix=True), h)


def test_step_compiles_fullgraph_without_breaks():
    torch._dynamo.reset()
    bank, rows, x, h = _setup()
    rows.load([1.0, 0.0, 0.5], [2, -1, 0])
    want = rows.step(bank.params, x, h, "plain", mix=True).clone()
    want_hat = rows.rows(6).h_hat.clone()
    rows.h_hat.zero_()
    compiled = torch.compile(rows.step, fullgraph=True, backend="aot_eager", dynamic=False)
    torch.testing.assert_close(compiled(bank.params, x, h, "plain", mix=True), want)
    torch.testing.assert_close(rows.rows(6).h_hat, want_hat)  # the snapshot is written in place
