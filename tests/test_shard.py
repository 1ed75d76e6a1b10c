"""Groups shared out over tensor-parallel ranks (esamp_sgl/shard.py), on CPU without SGLang: two
simulated ranks, each holding half of a bank, give every row the ĥ, mix and novelty of the whole
bank bit for bit, eagerly and in the graph form; the real TP 2 server is in test_scale_out.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from esamp_sgl.config import ESampConfig
from esamp_sgl.distiller import DistillerBank, RowGroups
from esamp_sgl.graph_rows import GraphRows
from esamp_sgl.latent_step import distill_and_mix_sharded, distill_and_mix_torch
from esamp_sgl.shard import GroupShard
from esamp_sgl.slots import SlotTable

D, SLOTS, TP = 24, 5, 2
CPU = torch.device("cpu")
BETA = [1.0, 0.0, 0.5, 2.0, 1.0, 0.7]
SLOT = [2, -1, 0, 3, 4, 1]  # global slots; row 1 explores in no group
ONE_RANK = [0, -1, 2, 4, 0, 2]  # every group on rank 0: rank 1 holds no row of the step


def test_every_slot_has_one_holder_and_the_banks_cover_it():
    shards = [GroupShard(rank, TP) for rank in range(TP)]
    assert [s.slots_held(SLOTS) for s in shards] == [3, 3]
    for slot in range(SLOTS):
        held = [(s.rank, s.local(slot)) for s in shards if s.local(slot) >= 0]
        assert len(held) == 1 and held[0][1] < shards[held[0][0]].slots_held(SLOTS)
    assert GroupShard().local_slots(SLOT) == SLOT  # TP 1 holds every group where it is
    assert shards[0].local(-1) == shards[1].local(-1) == -1


def whole_and_shards(variant_cfg: ESampConfig) -> tuple[DistillerBank, list[DistillerBank]]:
    """A trained-looking bank of SLOTS slots, and each rank's bank of the slots it holds."""
    whole = DistillerBank(SLOTS, D, variant_cfg)
    gen = torch.Generator().manual_seed(1)
    for p in whole.params:
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)  # distinct slots
    banks = []
    for rank in range(TP):
        shard = GroupShard(rank, TP)
        bank = DistillerBank(shard.slots_held(SLOTS), D, variant_cfg)
        for slot in range(SLOTS):
            if (local := shard.local(slot)) >= 0:
                for mine, theirs in zip(bank.params, whole.params):
                    mine[local] = theirs[slot]
        banks.append(bank)
    return whole, banks


def run_ranks(step: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], tuple]) -> list[tuple]:
    """Call ``step(rank, reduce)`` for every rank as the ranks would, each ``reduce`` returning
    the sum of every rank's input: a first pass collects the parts, a second uses their sum."""
    parts: list[torch.Tensor] = []
    for rank in range(TP):
        step(rank, lambda t: parts.append(t.clone()) or t)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return [step(rank, lambda t: total.clone()) for rank in range(TP)]


@pytest.mark.parametrize("slots", [SLOT, ONE_RANK], ids=["both-ranks", "one-rank"])
@pytest.mark.parametrize("variant", ["plain", "orthogonal", "learned"])
def test_sharded_step_equals_the_whole_bank_bit_for_bit(variant, slots):
    cfg = ESampConfig(init="random", rank=8, init_std=0.3, mix=variant)
    whole, banks = whole_and_shards(cfg)
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(len(BETA), D, generator=gen), torch.randn(len(BETA), D, generator=gen)
    beta = torch.tensor(BETA)
    want = distill_and_mix_torch(whole.params, x, h, torch.tensor(slots), beta, variant,
                                 RowGroups.of(slots, CPU), start=whole.template)

    def step(rank: int, reduce) -> tuple:
        local = GroupShard(rank, TP).local_slots(slots)
        held = torch.tensor([s >= 0 for s in local])
        return distill_and_mix_sharded(banks[rank].params, x, h, torch.tensor(local).clamp_min(0), held, beta,
                                       reduce, variant, RowGroups.of(local, CPU), start=banks[rank].template)

    for got in run_ranks(step):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_sharded_graph_form_equals_the_whole_bank_on_padded_rows():
    cfg = ESampConfig(init="random", rank=8, init_std=0.3)
    whole, banks = whole_and_shards(cfg)
    gen = torch.Generator().manual_seed(2)
    x, h = torch.randn(8, D, generator=gen), torch.randn(8, D, generator=gen)  # 6 live rows, 2 padding
    reference = GraphRows(8, D, CPU)
    reference.load(BETA, SLOT)
    want = reference.step(whole.params, x, h, "plain", mix=True)
    graphs = [GraphRows(8, D, CPU) for _ in range(TP)]

    def step(rank: int, reduce) -> tuple:
        graphs[rank].load(BETA, GroupShard(rank, TP).local_slots(SLOT))
        out = graphs[rank].step(banks[rank].params, x, h, "plain", mix=True, reduce=reduce)
        return out, graphs[rank].rows(len(BETA)).h_hat

    for out, h_hat in run_ranks(step):
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)  # the graph-safe per-row gather
        torch.testing.assert_close(h_hat, reference.rows(len(BETA)).h_hat, rtol=0, atol=1e-6)
        assert torch.equal(out[6:], h[6:]) and torch.equal(out[1], h[1])


def test_training_touches_only_the_groups_a_rank_holds():
    cfg = ESampConfig(init="random", rank=8, init_std=0.3)
    _, banks = whole_and_shards(cfg)
    gen = torch.Generator().manual_seed(3)
    x, h = torch.randn(len(SLOT), D, generator=gen), torch.randn(len(SLOT), D, generator=gen)
    for rank, bank in enumerate(banks):
        local = GroupShard(rank, TP).local_slots(SLOT)
        before = [p.clone() for p in bank.params]
        bank.train_step(x, h, local)
        changed = sorted(s for s in range(bank.num_slots) if not torch.equal(bank.params[0][s], before[0][s]))
        assert changed == sorted(s for s in local if s >= 0)


def test_slot_table_digests_tell_whether_ranks_made_the_same_choices():
    clocks = [[0.0], [0.0]]
    tables = [SlotTable(3, ttl=5.0, clock=lambda c=c: c[0]) for c in clocks]
    for table in tables:
        for group in ("a", "b"):
            table.acquire(group)
            table.release(group)
    assert tables[0].digest() == tables[1].digest()
    clocks[0][0] = 10.0  # rank 0's clock says the TTL ran out, rank 1's does not yet
    for table in tables:
        table.acquire("c")
    assert tables[0].digest() != tables[1].digest()
