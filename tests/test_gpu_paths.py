"""What only a GPU can check, skipped without CUDA: the decode step captured in a CUDA graph and
replayed against β, slots and distiller weights that change between replays, and the side-stream
training lane's exact staleness. On CPU the same logic is covered by test_graph_rows.py,
test_core.py and the servers run with --esamp-decode-path graph."""

from __future__ import annotations

import pytest
import torch

from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller import DistillerBank, distiller_forward
from esamp_sgl.graph_rows import GraphRows
from esamp_sgl.lane import CudaStreamLane
from esamp_sgl.latent_step import distill_and_mix_torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: needs a CUDA device")

D, ROWS = 48, 8


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("variant", ["plain", "learned"])  # plain: the fused Triton kernel; learned: torch
def test_captured_step_replays_with_what_was_loaded_before_each_replay(variant):
    bank = DistillerBank(4, D, ESampConfig(init="random", rank=8, init_std=0.3, lr=0.5), device="cuda")
    rows = GraphRows(ROWS, D, torch.device("cuda"))
    static_x, static_h = torch.zeros(ROWS, D, device="cuda"), torch.zeros(ROWS, D, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (kernel compilation, allocator)
        rows.step(bank.params, static_x, static_h, variant, mix=True, start=bank.template)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = rows.step(bank.params, static_x, static_h, variant, mix=True, start=bank.template)

    steps = [([1.0, 0.0, 0.5], [2, -1, 0]), ([2.0] * ROWS, [0, 1, 2, 3] * 2), ([], [])]
    for seed, (beta, slot) in enumerate(steps):
        x, h = _rows(ROWS, seed), _rows(ROWS, 100 + seed)
        static_x.copy_(x)
        static_h.copy_(h)
        rows.load(beta, slot)
        graph.replay()
        pad = ROWS - len(beta)
        full_beta = torch.tensor(beta + [0.0] * pad, device="cuda")
        full_slot = torch.tensor([max(s, 0) for s in slot] + [0] * pad, device="cuda")
        want, want_hat, want_novelty = distill_and_mix_torch(bank.params, x, h, full_slot, full_beta, variant,
                                                             start=bank.template)
        torch.testing.assert_close(static_out, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rows.h_hat, want_hat, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rows.novelty, want_novelty, rtol=1e-4, atol=1e-5)
        assert torch.equal(static_out[full_beta == 0], h[full_beta == 0])
        assert torch.equal(rows.x, x) and torch.equal(rows.h, h)
        bank.train_step(x, h, torch.tensor([0, 1, 2, 3] * 2))  # in place: the next replay must see it


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_side_stream_lane_keeps_the_staleness_contract(staleness):
    """The prediction at step t comes from the weights after jobs 0 … t−1−k, as on CPU."""
    cfg = ESampConfig(init="random", rank=8, lr=0.05, staleness=staleness)
    lane_bank, ref_bank = DistillerBank(2, D, cfg, device="cuda"), DistillerBank(2, D, cfg, device="cuda")
    lane = CudaStreamLane(lane_bank, staleness)
    slot = torch.tensor([0, 1, 0, 1])
    probe, probe_slot = _rows(4, 99), slot.cuda()
    history = [distiller_forward(ref_bank.params, probe, probe_slot)]  # history[j]: after j jobs
    jobs = [(_rows(4, t), _rows(4, 50 + t)) for t in range(8)]
    for x, h in jobs:
        ref_bank.train_step(x, h, slot)
        history.append(distiller_forward(ref_bank.params, probe, probe_slot))
    for t, (x, h) in enumerate(jobs):
        assert lane.begin_step() == t
        seen = distiller_forward(lane.forward_params, probe, probe_slot)
        torch.testing.assert_close(seen, history[max(0, t - staleness)], rtol=1e-5, atol=1e-5)
        lane.submit(x, h, slot)
    lane.flush()
    torch.cuda.synchronize()
    assert lane.lag == 0
    torch.testing.assert_close(distiller_forward(lane.forward_params, probe, probe_slot), history[-1])
