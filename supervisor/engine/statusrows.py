"""The `instances` of a `status` answer, encoded once per change.

At 10,000 instances, building every row as a dict and encoding it on each
`status` held the trio thread for tens of milliseconds. Here each instance's
row is kept encoded (JSON, as a `msgspec.Raw`), with the registry revision of
the instance and the scan figures it was made from; a row is made again only
when one of them changed, and the answer's encoder copies the rows into the
answer's line as they are (one copy of the megabytes of rows: no join).

A row depends on who asks: a lease token is shown whole only to the lease's
uid and to root (`LEASE_PREFIX_CHARS` otherwise). So two variants are kept,
every token whole and every token cut; a viewer who holds some leases of an
instance but not all of them gets that row made for them, uncached.

Consistency: `rows_in_turns` lets other tasks run between turns of rows, and
keeps the answer a snapshot of one moment by starting again if the registry's
version moved meanwhile (then nearly every row is still cached); after
`MAX_PASSES` it makes the rest in one go. The scan figures are those of one
scan, taken once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import time

import msgspec
import trio

from supervisor.core.registry import ROOT_UID, Instance, Registry, State
from supervisor.engine.stalls import STEP_BUDGET_S
from supervisor.procs import process

# What `status` shows of another uid's lease token (as much as the logs show of
# any): enough to tell leases apart, far too little to use one.
LEASE_PREFIX_CHARS = 8

# A `status` of at most this many rows is made in one turn (in the hub): a
# cached row costs well under a microsecond, a row made again 5-10 on a slow
# host; 250 of those stay well under the 5 ms a request may hold the thread.
ROWS_PER_TURN = 250

# Rows made between two looks at the clock in `rows_in_turns` (which lets
# other tasks run once a turn has taken STEP_BUDGET_S): at most a few hundred
# microseconds of rows made again past the budget.
ROWS_PER_LOOK = 32

# Passes of `rows_in_turns` that may be overtaken by a change in the registry
# before the last one is made without letting others run.
MAX_PASSES = 3

# A cached row of an instance that is gone is dropped once the cache holds
# this many more rows than there are instances (twice the instances, plus this).
PRUNE_SLACK = 256

_ENCODER = msgspec.json.Encoder()

NO_STATS: Sequence[process.ProcStat] = ()


class _Row(msgspec.Struct):
    revision: int
    # The scan's list of the instance's members (compared by identity).
    stats: Sequence[process.ProcStat]
    rss_bytes: int
    lease_uids: frozenset[int]
    whole: msgspec.Raw | None = None
    cut: msgspec.Raw | None = None


class StatusRows:
    """Encoded `status` rows of one registry. Trio thread only."""

    def __init__(self, registry: Registry, holder_pid: Callable[[int], int | None]) -> None:
        """`holder_pid(connection)`: the pid of the process behind a
        connection, None if it is not known (any more)."""
        self._registry = registry
        self._holder_pid = holder_pid
        self._rows: dict[str, _Row] = {}

    def rows(
        self, instances: Iterable[Instance], members: Mapping[str, Sequence[process.ProcStat]], viewer_uid: int
    ) -> tuple[list[msgspec.Raw], int]:
        """The rows of `instances` as `viewer_uid` may see them, from the scan
        `members`, and their total RSS. Runs without letting others run."""
        rows: list[msgspec.Raw] = []
        total = 0
        row_of = self._row
        for instance in instances:
            row, rss = row_of(instance, members.get(instance.id, NO_STATS), viewer_uid)
            rows.append(row)
            total += rss
        self._prune()
        return rows, total

    async def rows_in_turns(
        self,
        wanted: Callable[[Instance], bool] | None,
        members: Mapping[str, Sequence[process.ProcStat]],
        viewer_uid: int,
    ) -> tuple[list[msgspec.Raw], int]:
        """As `rows`, for the registry's instances that `wanted` accepts (all
        if None), letting other tasks run whenever a turn has taken
        STEP_BUDGET_S; the answer is of one moment (see the module).
        Cancellation: raises Cancelled, having changed nothing but the cache."""
        registry = self._registry
        row_of = self._row
        for _ in range(MAX_PASSES):
            version = registry.version
            instances = list(registry.instances.values())
            rows: list[msgspec.Raw] = []
            total = 0
            turn_began = time.perf_counter()
            for start in range(0, len(instances), ROWS_PER_LOOK):
                if start and time.perf_counter() - turn_began > STEP_BUDGET_S:
                    await trio.lowlevel.checkpoint()
                    turn_began = time.perf_counter()
                for instance in instances[start:start + ROWS_PER_LOOK]:
                    if wanted is None or wanted(instance):
                        row, rss = row_of(instance, members.get(instance.id, NO_STATS), viewer_uid)
                        rows.append(row)
                        total += rss
            if registry.version == version:
                self._prune()
                return rows, total
            await trio.lowlevel.checkpoint()
        chosen = registry.instances.values() if wanted is None else filter(wanted, registry.instances.values())
        return self.rows(chosen, members, viewer_uid)

    def _row(self, instance: Instance, stats: Sequence[process.ProcStat], viewer_uid: int) -> tuple[msgspec.Raw, int]:
        cached = self._rows.get(instance.id)
        if cached is None or cached.revision != instance.revision or cached.stats is not stats:
            cached = _Row(
                revision=instance.revision, stats=stats, rss_bytes=sum([s.rss_bytes for s in stats]),
                lease_uids=frozenset([self._registry.leases[token].uid for token in instance.leases]),
            )
            self._rows[instance.id] = cached
        uids = cached.lease_uids
        if viewer_uid == ROOT_UID or not uids or uids == {viewer_uid}:
            if cached.whole is None:
                cached.whole = msgspec.Raw(_ENCODER.encode(self._make(instance, stats, cached.rss_bytes, ROOT_UID)))
            return cached.whole, cached.rss_bytes
        if viewer_uid not in uids:
            if cached.cut is None:
                cached.cut = msgspec.Raw(_ENCODER.encode(self._make(instance, stats, cached.rss_bytes, None)))
            return cached.cut, cached.rss_bytes
        return msgspec.Raw(_ENCODER.encode(self._make(instance, stats, cached.rss_bytes, viewer_uid))), cached.rss_bytes

    def _make(
        self, instance: Instance, stats: Sequence[process.ProcStat], rss_bytes: int, viewer_uid: int | None
    ) -> dict[str, Any]:
        """The row as `viewer_uid` sees it (None: a uid that holds none of its leases)."""
        row: dict[str, Any] = {
            "instance": instance.id,
            "job": instance.job,
            "adapter": instance.adapter,
            "state": instance.state.value,
            "pid": instance.pid,
            "pids": sorted([s.pid for s in stats]),
            "refcount": instance.refcount,
            "started_at": instance.started_at,
            "rss_bytes": rss_bytes,
            "adopted": instance.adopted,
            "uid": instance.uid,
            "leases": [self._lease(token, viewer_uid) for token in sorted(instance.leases)],
        }
        if instance.state is State.EXITED:
            row["returncode"] = instance.returncode
            row["reason"] = instance.stop_reason.value if instance.stop_reason is not None else None
        return row

    def _lease(self, token: str, viewer_uid: int | None) -> dict[str, Any]:
        """One lease as a row shows it: the whole token only to the lease's
        own uid and to root (a token is all it takes to release a lease);
        `pid` is the holding connection's process, None while no connection
        holds it."""
        lease = self._registry.leases[token]
        return {
            "lease": token if viewer_uid in (ROOT_UID, lease.uid) else token[:LEASE_PREFIX_CHARS],
            "detached": lease.detached,
            "expires_at": lease.expires_at,
            "uid": lease.uid,
            "pid": self._holder_pid(lease.owner) if lease.owner is not None else None,
        }

    def _prune(self) -> None:
        instances = self._registry.instances
        if len(self._rows) > 2 * len(instances) + PRUNE_SLACK:
            self._rows = {i: row for i, row in self._rows.items() if i in instances}
