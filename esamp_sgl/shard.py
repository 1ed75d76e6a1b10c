"""Exploration groups shared out over tensor-parallel ranks.

Under tensor parallelism every rank runs ESamp's step on the same rows. A replicated bank would
have every rank read (for the mix) and read and write (for the update) every group's weights each
step: bytes that TP does not divide, ≈ 3% of a 7B decode step per rank at TP 8, batch 256
(benchmarks/README.md, on paper). Instead rank r of T holds the groups whose global slot s has
s mod T = r, at local slot s div T. It predicts ĥ for the rows of its own groups and zeros for
the others, one all-reduce over the TP group sums the ranks' parts, and from there every rank
mixes (and post-filters) every row alike. Each row's ĥ comes from exactly one rank and x + 0 = x,
so the sum is the holder's prediction bit for bit: TP T explores as TP 1 does, up to the model's
own TP arithmetic. Training and warm-up touch only a rank's own groups and need no collective.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupShard:
    rank: int = 0  # this process's rank in the tensor-parallel group
    size: int = 1  # the tensor-parallel group's size

    def slots_held(self, num_slots: int) -> int:
        """Bank slots this rank needs for ``num_slots`` global slots (⌈num_slots / size⌉)."""
        return -(-num_slots // self.size)

    def local(self, slot: int) -> int:
        """This rank's bank slot for global ``slot``; −1 where another rank holds it or slot < 0."""
        return slot // self.size if slot >= 0 and slot % self.size == self.rank else -1

    def local_slots(self, slots: list[int]) -> list[int]:
        return [self.local(s) for s in slots]
