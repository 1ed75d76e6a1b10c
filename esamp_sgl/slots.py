"""Group key → distiller slot, with a bound, least-recently-used eviction and a time to live.

A group may outlive its requests (a program's forks call ``gen`` several times and should keep
learning in one distiller) for ``ttl`` seconds after its last use. Slots held by running
requests (``pin``) are never evicted.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


class NoFreeSlot(RuntimeError):
    """Every slot is pinned by a running request."""


@dataclass
class _Entry:
    slot: int
    last_used: float
    pins: int = 0


@dataclass
class SlotTable:
    num_slots: int
    ttl: float = 600.0
    clock: Callable[[], float] = time.monotonic
    evictions: int = 0
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    _free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._free = list(range(self.num_slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def acquire(self, key: str) -> tuple[int, bool]:
        """Slot for ``key``, pinned once more; ``fresh`` is True when the caller must reset it."""
        now = self.clock()
        self.expire()
        entry = self._entries.get(key)
        fresh = entry is None
        if entry is None:
            entry = _Entry(self._take_slot(), now)
            self._entries[key] = entry
        entry.pins += 1
        entry.last_used = now
        self._entries.move_to_end(key)
        return entry.slot, fresh

    def release(self, key: str) -> None:
        """Unpin once (a request of the group finished); the group stays until TTL or eviction."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.pins = max(0, entry.pins - 1)
            entry.last_used = self.clock()

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._free.append(entry.slot)

    def expire(self) -> list[int]:
        """Free unpinned groups idle for longer than ``ttl``; returns their slots."""
        now = self.clock()
        stale = [k for k, e in self._entries.items() if e.pins == 0 and now - e.last_used > self.ttl]
        freed = [self._entries[k].slot for k in stale]
        for k in stale:
            self.drop(k)
        return freed

    def digest(self) -> str:
        """The table's choices — each group's slot and pins, in LRU order, and the free slots in
        the order they will be handed out — as a short digest: equal on tensor-parallel ranks
        whose tables agree (their clocks, last_used, are left out)."""
        state = [(key, e.slot, e.pins) for key, e in self._entries.items()], self._free
        return hashlib.sha256(repr(state).encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for key, entry in self._entries.items():  # least recently used first
            if entry.pins == 0:
                self.drop(key)
                self.evictions += 1
                return self._free.pop()
        raise NoFreeSlot(f"all {self.num_slots} ESamp group slots are held by running requests")
