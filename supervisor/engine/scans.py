"""The shared scan of every running tree's members: `ScanCache`.

`status` and the memory budget need each tree's members and their RSS. One
scan (in a worker thread) serves every caller that asks while it runs, and its
result is reused while it is fresh: at most SCAN_CACHE_S old (or
SCAN_COST_SHARE times as old as the last scan took, for many trees) and no
tree was spawned or stopped since, so a burst of `status` calls costs one
scan, not one each.

A tree whose members and figures did not change keeps the very list of the
previous scan, so what was derived from it (a `status` row) stays valid; the
trio-thread parts (the snapshot of what each tree knows, remembering what the
scan found) let other tasks run once a turn has taken STEP_BUDGET_S.
"""

from __future__ import annotations

from collections.abc import Mapping

import time

import structlog
import trio

from supervisor.engine.instances import Instances
from supervisor.engine.stalls import TurnClock
from supervisor.procs import process
from supervisor.procs.tree import InstanceTree, scan_trees

# A scan is reused for this long (unless a tree was spawned or stopped since):
# under load, scans stay a few per second however many requests ask.
SCAN_CACHE_S = 0.25

# A scan of many trees (a third of a second for 10,000 in a worker thread) is
# reused for this many times its own duration, so that scans take at most
# about a fifth of a core however often `status` is asked.
SCAN_COST_SHARE = 4.0

# Trees snapshotted or remembered between two looks at the clock (a turn
# lets other tasks run once it has taken STEP_BUDGET_S): a few hundred
# microseconds of trees past the budget.
SCAN_ROWS_PER_LOOK = 64

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
        # How long the last scan took, from snapshot to remembered.
        self._scan_s = 0.0
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
        fresh_for = max(SCAN_CACHE_S, SCAN_COST_SHARE * self._scan_s)
        return self._scanned_generation == self._instances.generation and age <= fresh_for

    async def _refresh(self, done: trio.Event) -> None:
        generation = self._instances.generation
        began = time.perf_counter()
        try:
            snapshots = await snapshot_in_turns(self._instances, list(self._instances.running))
            previous = self._members
            try:
                members = await trio.to_thread.run_sync(scan_keeping, snapshots, previous)
            except OSError as exc:
                # Out of fds or memory: answer with the last scan's members for
                # as long as a fresh one would be kept, rather than not at all
                # (or scanning again at once, in a loop).
                log.warning("scan.failed", error=str(exc))
                members = self._members
            else:
                await remember_in_turns(self._instances, members, snapshots, previous)
            self._members = members
            self._scan_s = time.perf_counter() - began
            self._scanned_at = trio.current_time()
            self._scanned_generation = generation
        finally:
            self._in_flight = None
            done.set()


def scan_keeping(snapshots: Snapshots, previous: Members) -> Members:
    """Blocking, for a worker thread: `scan_trees`, where each tree whose
    members and figures equal those of `previous` (a scan's result, which
    nobody changes) gets the previous list itself. Raises OSError as
    `scan_trees` does."""
    members = scan_trees(snapshots)
    for instance_id, stats in members.items():
        before = previous.get(instance_id)
        if before is not None and before == stats:
            members[instance_id] = before
    return members


async def snapshot_in_turns(instances: Instances, instance_ids: list[str]) -> Snapshots:
    """`snapshot`, in turns of STEP_BUDGET_S (`TurnClock`); trees stopped
    meanwhile are left out. Cancellation: raises Cancelled."""
    running = instances.running
    snapshots: Snapshots = {}
    clock = TurnClock()
    for start in range(0, len(instance_ids), SCAN_ROWS_PER_LOOK):
        await clock.tick()
        for instance_id in instance_ids[start:start + SCAN_ROWS_PER_LOOK]:
            tree = running.get(instance_id)
            if tree is not None:
                snapshots[instance_id] = (tree.tree, frozenset(tree.tree.known))
    return snapshots


async def remember_in_turns(instances: Instances, members: Members, snapshots: Snapshots, previous: Members) -> None:
    """`remember`, in turns of STEP_BUDGET_S (`TurnClock`), passing over the
    trees whose list is the previous scan's (nothing new was learned of
    them). Cancellation: raises Cancelled, having remembered part."""
    changed = [i for i, stats in members.items() if previous.get(i) is not stats]
    clock = TurnClock()
    for start in range(0, len(changed), SCAN_ROWS_PER_LOOK):
        await clock.tick()
        remember(instances, {i: members[i] for i in changed[start:start + SCAN_ROWS_PER_LOOK]}, snapshots)


def snapshot(instances: Instances, instance_ids: list[str]) -> Snapshots:
    """Immutable views of the named running trees, for a scan in a worker thread."""
    running = instances.running
    return {i: (running[i].tree, frozenset(running[i].tree.known)) for i in instance_ids}


def remember(instances: Instances, members: Mapping[str, list[process.ProcStat]], snapshots: Snapshots) -> None:
    """Fold a scan's results into the trees still running: members learned
    (in process-table mode the record is rewritten if any tree's members
    changed: after a crash they are what proves an escapee is ours; a
    cgroup proves it in cgroup mode), and each tree's RSS."""
    changed = False
    for instance_id, stats in members.items():
        running = instances.running.get(instance_id)
        if running is not None:
            changed |= running.tree.remember(stats, snapshots[instance_id][1])
            instances.set_rss(running, sum(s.rss_bytes for s in stats))
    if changed and instances.cgroups is None:
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
