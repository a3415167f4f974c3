"""Instance cgroups made ahead of time.

A child cloned into a cgroup made in the last few tens of milliseconds waits
inside clone3 (about 0.6 ms on the development host, twice what the whole
spawn costs otherwise); into one made earlier it costs nothing extra. So the
daemon keeps a few empty instance cgroups ready, each named by the id of an
instance not yet acquired, and hands those names out as new instance ids:
a cold acquire then pays neither the mkdir nor the wait.

cgroup v2 refuses to rename cgroups, which is why the id is chosen when the
cgroup is made, not when the instance is. Runs only on the trio thread. A
spare left by a crash is an empty instance cgroup of no live instance, which
the next start's sweep removes like any other.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import structlog
import trio

from supervisor.cgroup import CgroupManager

log = structlog.get_logger()

# Spares kept ready: enough for a small burst of cold acquires.
SPARES = 4


class SpareCgroups:
    """Empty instance cgroups, oldest first, and the task that keeps them topped up."""

    def __init__(self, cgroups: CgroupManager, new_id: Callable[[], str], *, spares: int = SPARES) -> None:
        self._cgroups = cgroups
        self._new_id = new_id
        self._spares = spares
        self._ready: collections.deque[str] = collections.deque()
        self._wanted = trio.Event()
        self._closed = False

    def take(self) -> str | None:
        """The id of the oldest spare, now the caller's (its cgroup exists), or
        None when none is ready. Never blocks."""
        if not self._ready:
            return None
        self._wanted.set()
        return self._ready.popleft()

    def names(self) -> frozenset[str]:
        """Spare cgroups: instance cgroups of no instance that are not stale."""
        return frozenset(self._ready)

    async def run(self) -> None:
        """Make spares until there are `spares`, then wait for one to be taken.
        One mkdir at a time on this thread (tens of microseconds). A cgroup that
        cannot be made is logged and tried again on the next take."""
        while not self._closed:
            while len(self._ready) < self._spares and not self._closed:
                name = self._new_id()
                try:
                    self._cgroups.create(name)
                except OSError as exc:
                    log.warning("cgroup.spare_failed", error=str(exc))
                    break
                self._ready.append(name)
                await trio.lowlevel.checkpoint()
            self._wanted = trio.Event()
            await self._wanted.wait()

    def close(self) -> None:
        """Remove every spare and make no more (at shutdown)."""
        self._closed = True
        self._wanted.set()
        while self._ready:
            name = self._ready.popleft()
            try:
                self._cgroups.remove(name)
            except OSError as exc:
                log.warning("cgroup.remove_failed", instance=name, error=str(exc))
