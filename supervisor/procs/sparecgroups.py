"""Instance cgroups made ahead of time.

A child cloned into a cgroup made moments before waits inside clone3, longer
than the rest of its spawn takes; into one made earlier it costs nothing extra.
So the daemon keeps a few empty instance cgroups ready, each named by the id
of an instance not yet acquired, and hands those names out as new instance
ids: a cold acquire then pays neither the mkdir nor the wait.

cgroup v2 refuses to rename cgroups, which is why the id is chosen when the
cgroup is made, not when the instance is. Each spare also comes with its
directory open, the fd clone3 needs, so that the spawn does not open it:
`claim` hands it over when the spawn comes. Runs only on the trio thread. A
spare left by a crash is an empty instance cgroup of no live instance, which
the next start's sweep removes like any other.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

import structlog
import trio

from supervisor.procs.cgroup import CgroupManager

log = structlog.get_logger()

# Spares kept ready: enough for a small burst of cold acquires.
SPARES = 4

# Directory fds of taken spares kept for `claim`. An instance whose spawn never
# comes (released while it waited for its predecessor) never claims its fd; past
# this many the oldest is closed, and a late spawn opens the directory itself.
CLAIMABLE = 16


class SpareCgroups:
    """Empty instance cgroups, oldest first, and the task that keeps them topped up."""

    def __init__(self, cgroups: CgroupManager, new_id: Callable[[], str], *, spares: int = SPARES) -> None:
        self._cgroups = cgroups
        self._new_id = new_id
        self._spares = spares
        # Name -> the spare's open directory fd.
        self._ready: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._claimable: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._wanted = trio.Event()
        self._closed = False

    def take(self) -> str | None:
        """The id of the oldest spare, now the caller's (its cgroup exists), or
        None when none is ready. Never blocks."""
        if not self._ready:
            return None
        self._wanted.set()
        name, fd = self._ready.popitem(last=False)
        self._claimable[name] = fd
        while len(self._claimable) > CLAIMABLE:
            os.close(self._claimable.popitem(last=False)[1])
        return name

    def claim(self, name: str) -> int | None:
        """The open directory fd of the spare `name` took (now the caller's to
        close), or None: not a spare, claimed already, or closed meanwhile."""
        return self._claimable.pop(name, None)

    def names(self) -> frozenset[str]:
        """Spare cgroups: instance cgroups of no instance that are not stale."""
        return frozenset(self._ready)

    async def run(self) -> None:
        """Make spares until there are `spares`, then wait for one to be taken;
        runs until `close` or cancellation. One mkdir at a time on this thread,
        with a checkpoint between two. A cgroup that cannot be made is logged and
        tried again on the next take; nothing is raised for it.

        Cancellation: raises Cancelled between two mkdirs or while waiting; the
        spares made so far stay ready for `take` and are removed by `close`."""
        while not self._closed:
            while len(self._ready) < self._spares and not self._closed:
                name = self._new_id()
                try:
                    fd = self._cgroups.open_dir(name)
                except OSError as exc:
                    log.warning("cgroup.spare_failed", error=str(exc))
                    break
                self._ready[name] = fd
                await trio.lowlevel.checkpoint()
            self._wanted = trio.Event()
            await self._wanted.wait()

    def drain(self) -> None:
        """Remove every spare now (before an in-place upgrade: the next image
        makes its own); more are made on the next turn of `run`."""
        while self._claimable:
            os.close(self._claimable.popitem()[1])
        while self._ready:
            name, fd = self._ready.popitem()
            os.close(fd)
            try:
                self._cgroups.remove(name)
            except OSError as exc:
                log.warning("cgroup.remove_failed", instance=name, error=str(exc))
        self._wanted.set()

    def close(self) -> None:
        """Remove every spare and make no more (at shutdown)."""
        self._closed = True
        self.drain()

