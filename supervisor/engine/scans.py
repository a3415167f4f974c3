"""The shared scan of every running tree's members: `ScanCache`.

`status` and the memory budget need each tree's members and their RSS. One
scan (in a worker thread) serves every caller that asks while it runs, and its
result is reused while it is at most SCAN_CACHE_S old and no tree was spawned
or stopped since, so a burst of `status` calls costs one scan, not one each.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
import trio

from supervisor.engine.instances import Instances
from supervisor.procs import process
from supervisor.procs.tree import InstanceTree, scan_trees

# A scan is reused for this long (unless a tree was spawned or stopped since):
# under load, scans stay a few per second however many requests ask.
SCAN_CACHE_S = 0.25

Members = dict[str, list[process.ProcStat]]
Snapshots = dict[str, tuple[InstanceTree, frozenset[process.ProcessId]]]


log = structlog.get_logger()


class ScanCache:
    """The latest members of every running tree."""

    def __init__(self, instances: Instances) -> None:
        self._instances = instances
        self._members: Members = {}
        self._scanned_at = float("-inf")
        self._scanned_generation = -1
        self._in_flight: trio.Event | None = None
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Where scans run: a nursery that outlives every caller."""
        self._nursery = nursery

    def fresh(self) -> Members | None:
        """What `members` would return at once, or None if it would wait for a scan."""
        return self._members if self._is_fresh() else None

    def latest(self) -> Members:
        """The latest scan's members, fresh or not: for a caller that has just
        seen `fresh()` answer, in the same turn."""
        return self._members

    async def members(self) -> Members:
        """The members of every running tree, from a fresh enough scan.
        Cancellation: the caller stops waiting; the scan goes on for others."""
        while not self._is_fresh():
            if self._in_flight is None:
                self._in_flight = trio.Event()
                assert self._nursery is not None, "attach() first"
                self._nursery.start_soon(self._refresh, self._in_flight)
            await self._in_flight.wait()
        return self._members

    def _is_fresh(self) -> bool:
        age = trio.current_time() - self._scanned_at
        return self._scanned_generation == self._instances.generation and age <= SCAN_CACHE_S

    async def _refresh(self, done: trio.Event) -> None:
        generation = self._instances.generation
        try:
            snapshots = snapshot(self._instances, list(self._instances.running))
            try:
                members = await trio.to_thread.run_sync(scan_trees, snapshots)
            except OSError as exc:
                # Out of fds or memory: answer with the last scan's members for
                # as long as a fresh one would be kept, rather than not at all
                # (or scanning again at once, in a loop).
                log.warning("scan.failed", error=str(exc))
                members = self._members
            else:
                remember(self._instances, members, snapshots)
            self._members = members
            self._scanned_at = trio.current_time()
            self._scanned_generation = generation
        finally:
            self._in_flight = None
            done.set()


def snapshot(instances: Instances, instance_ids: list[str]) -> Snapshots:
    """Immutable views of the named running trees, for a scan in a worker thread."""
    running = instances.running
    return {i: (running[i].tree, frozenset(running[i].tree.known)) for i in instance_ids}


def remember(instances: Instances, members: Mapping[str, list[process.ProcStat]], snapshots: Snapshots) -> None:
    """Fold a scan's results into the trees still running: members learned
    (the record is rewritten if any tree's members changed: after a crash
    they are what proves an escapee is ours), and each tree's RSS."""
    changed = False
    for instance_id, stats in members.items():
        running = instances.running.get(instance_id)
        if running is not None:
            changed |= running.tree.remember(stats, snapshots[instance_id][1])
            running.rss_bytes = sum(s.rss_bytes for s in stats)
    if changed:
        instances.record.mark_dirty()



def learn(
    instances: Instances,
    learned: Mapping[str, frozenset[process.ProcessId]],
    snapshots: Mapping[str, tuple[process.ProcessId, frozenset[process.ProcessId]]],
) -> None:
    """Fold the live members a table scan found (`learned`, made from
    `snapshots` of the known members) into the trees still running, as
    `InstanceTree.remember_ids` does, and rewrite the record if any tree's
    members changed: once a member drops its tag or leaves its parents, only
    the record proves it ours after a crash."""
    changed = False
    for instance_id, members in learned.items():
        running = instances.running.get(instance_id)
        if running is not None:
            root, known = snapshots[instance_id]
            changed |= running.tree.remember_ids(members, known - {root})
    if changed:
        instances.record.mark_dirty()
