"""Many keyed deadlines, and the earliest of them: `Deadlines`.

The registry times detached leases, leases waiting for `resume` and lingering
instances. Each has at most one deadline, which may be moved or cancelled at
any time; the daemon asks after every change which comes first. A heap answers
that in O(log n) whatever the number of timers. A moved or cancelled deadline
leaves its old heap entry behind (lazy deletion): an entry counts only while
it still matches the key's current deadline, and the heap is rebuilt from the
current deadlines once stale entries outnumber them, so its size stays within
a constant factor of the timers held however often they move.

Pure: no clock, no I/O; the caller passes every time.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# The heap is rebuilt once it holds more than twice the live deadlines plus
# this many entries: the slack keeps a handful of timers from rebuilding at
# every move, and the factor keeps each rebuild paid for by the moves before it.
COMPACT_SLACK = 64


class Deadlines(Generic[K]):
    """Keys with a deadline each. Keys must order among themselves (they break
    ties between equal deadlines, so `pop_due` is deterministic)."""

    def __init__(self) -> None:
        self._when: dict[K, float] = {}
        self._heap: list[tuple[float, K]] = []

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: object) -> bool:
        return key in self._when

    def get(self, key: K) -> float | None:
        """The key's deadline, or None if it has none."""
        return self._when.get(key)

    def as_dict(self) -> dict[K, float]:
        """Every key with its deadline (a copy)."""
        return dict(self._when)

    def set(self, key: K, when: float) -> None:
        """Give `key` the deadline `when`, replacing any it had. O(log n) amortized."""
        if self._when.get(key) == when:
            return
        self._when[key] = when
        heapq.heappush(self._heap, (when, key))
        self._compact_if_stale()

    def discard(self, key: K) -> None:
        """Cancel the key's deadline, if it has one. O(1) amortized."""
        if self._when.pop(key, None) is not None:
            self._compact_if_stale()

    def earliest(self) -> float | None:
        """The earliest deadline, or None. O(log n) amortized."""
        top = self._top()
        return None if top is None else top[0]

    def pop_due(self, now: float) -> K | None:
        """Remove and return the key with the earliest deadline if that is at
        or before `now` (ties in key order), else None."""
        top = self._top()
        if top is None or top[0] > now:
            return None
        heapq.heappop(self._heap)
        del self._when[top[1]]
        return top[1]

    def _top(self) -> tuple[float, K] | None:
        heap = self._heap
        while heap:
            when, key = heap[0]
            if self._when.get(key) == when:
                return heap[0]
            heapq.heappop(heap)
        return None

    def _compact_if_stale(self) -> None:
        if len(self._heap) > 2 * len(self._when) + COMPACT_SLACK:
            self._heap = [(when, key) for key, when in self._when.items()]
            heapq.heapify(self._heap)
