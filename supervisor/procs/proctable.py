"""The process table of process-table mode, kept between looks: `ProcessTable`.

Without cgroups the daemon finds its processes in /proc. Reading the stat of
every process at every look costs what the host runs, not what the daemon
tracks. A `ProcessTable` remembers what earlier looks read, and `refresh`
reads only what is new. A process is new, or a pid reused, only once the
kernel's pid counter (`/proc/sys/kernel/ns_last_pid`) has handed its pid
out since the last look, so a look reads the stat of the pids handed out
since (most of them gone already: a failed open each), and of the pids the
caller wants measured (`reread`); every other known pid is still the
process that was seen. Every LIST_EVERY looks, or when more pids were handed
out than the table holds, or when the counter wrapped or cannot be read, a
look lists /proc instead: it forgets the pids gone from the listing, and
reads those it does not know and those the counter may have passed (all of
them, without a counter). Until such a look, a process that exited stays in
the table (a reread, or `process.signal_process`'s own check, finds it
gone). The one case this misses is the counter wrapping all the way round
between two looks: `pid_max` processes started in one interval.

Whether a process is *ours* (a descendant of the daemon, or of a process the
caller names as ours: the roots and known members of its trees) is decided
when it is first seen, from its parent then; a process re-parented later
stays what it was. The instance tag of each of ours is read once.

What the table holds is not proof enough to signal a process: an entry is
a (pid, start time) seen once, and every signal still goes through
`process.signal_process`, which checks that identity again.

`refresh` is blocking and pure in the sense the daemon needs: it reads an
immutable table and returns a new one, so it runs in a worker thread while
the trio thread keeps the latest (`TableScanner`, which also lets one
refresh serve every caller waiting at once: a sweep, and every stop of a
shutdown).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import msgspec
import trio

from supervisor.procs import process

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
PID_MAX = "/proc/sys/kernel/pid_max"
# The kernel's PID_MAX_LIMIT on 64-bit hosts.
PID_MAX_LIMIT = 4194304

# One look in this many lists /proc (whose cost grows with the host: about
# half a microsecond per process in the kernel), the others probe only the
# pids handed out since the look before; the listing forgets what exited.
LIST_EVERY = 8

# The parent pid of init and kthreadd, which have none.
NO_PARENT = 0


class ProcessTable(msgspec.Struct, frozen=True):
    """One look at /proc and what earlier looks learned. Never changed once
    made (a refresh makes a new one), so a worker thread may read it."""

    # Every process listed, by pid, as last read: the stat of a process that
    # is neither ours nor asked for is the one read when it was first seen.
    stats: Mapping[int, process.ProcStat] = msgspec.field(default_factory=dict)
    # Pids of our processes (never the daemon itself).
    ours: frozenset[int] = frozenset()
    # Our processes by parent (the parent when first seen).
    children: Mapping[int, tuple[int, ...]] = msgspec.field(default_factory=dict)
    # The instance tag of each of ours that has one, and ours by tag.
    tags: Mapping[int, str] = msgspec.field(default_factory=dict)
    by_tag: Mapping[str, tuple[int, ...]] = msgspec.field(default_factory=dict)
    # The pid counter at the look; None if it could not be read.
    last_pid: int | None = None
    # Looks since /proc was last listed (0: this one listed it).
    unlisted_looks: int = 0
    # The anchors this look was given.
    anchors: frozenset[process.ProcessId] = frozenset()
    # Pids whose stat this look read (the rest are as earlier looks read them).
    read: frozenset[int] = frozenset()

    def members(self, root: process.ProcessId, known: Iterable[process.ProcessId], instance_id: str) -> list[process.ProcStat]:
        """The members of one tree in this table: the root and what the
        tree knows (while their start times match), every descendant of
        those among ours, and ours tagged with `instance_id`."""
        stats = self.stats
        found: dict[int, process.ProcStat] = {}
        frontier = []
        for member in (root, *known):
            stat = stats.get(member.pid)
            if stat is not None and stat.start_time == member.start_time and member.pid not in found:
                found[member.pid] = stat
                frontier.append(member.pid)
        for pid in self.by_tag.get(instance_id, ()):
            if pid not in found and pid in stats:
                found[pid] = stats[pid]
                frontier.append(pid)
        while frontier:
            pid = frontier.pop()
            for child in self.children.get(pid, ()):
                if child not in found and child in stats:
                    found[child] = stats[child]
                    frontier.append(child)
        return list(found.values())


def read_pid_max() -> int:
    """The value past which the kernel's pid counter wraps (the kernel's
    largest, 4194304, if it cannot be read)."""
    try:
        with open(PID_MAX, "rb") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return PID_MAX_LIMIT


def read_last_pid() -> int | None:
    """The last pid the kernel handed out in this pid namespace, or None."""
    try:
        with open(NS_LAST_PID, "rb") as counter:
            return int(counter.read())
    except (OSError, ValueError):
        return None


def _maybe_reused(previous: ProcessTable, last_pid: int | None) -> Iterable[int]:
    """Known pids the kernel may have handed out again since `previous`: those
    the counter passed since then (all of them if it cannot be read). Costs
    the smaller of the pids handed out and the pids known."""
    before = previous.last_pid
    known = previous.stats
    if before is None or last_pid is None:
        return known.keys()
    if last_pid >= before:
        if last_pid - before < len(known):
            return [pid for pid in range(before + 1, last_pid + 1) if pid in known]
        return [pid for pid in known if before < pid <= last_pid]
    # The counter wrapped: everything above where it was, and below where it is.
    return [pid for pid in known if pid > before or pid <= last_pid]


def _handed_out(previous: ProcessTable, last_pid: int | None) -> range | None:
    """The pids handed out since `previous`, if probing them is the look to
    make now; None if /proc is to be listed instead."""
    before = previous.last_pid
    if before is None or last_pid is None or last_pid < before or previous.unlisted_looks + 1 >= LIST_EVERY:
        return None
    if last_pid - before > len(previous.stats):
        return None
    return range(before + 1, last_pid + 1)


def refresh(
    previous: ProcessTable,
    *,
    daemon_pid: int,
    anchors: frozenset[process.ProcessId] = frozenset(),
    reread: Iterable[int] = (),
) -> ProcessTable:
    """Blocking: the table now. Reads the stat of new pids, of known pids that
    may have been reused, and of `reread` (for fresh figures); classifies new
    processes as ours (descendants of the daemon or of an `anchor`, or an
    anchor itself) and reads their tags. Reads no other file (but /proc's
    listing, one look in LIST_EVERY). Raises OSError if /proc cannot be
    listed."""
    last_pid = read_last_pid()
    stats = dict(previous.stats)
    handed_out = _handed_out(previous, last_pid)
    if handed_out is None:
        listed = set(map(int, filter(str.isdigit, os.listdir("/proc"))))
        for pid in stats.keys() - listed:
            del stats[pid]
        wanted = (listed - previous.stats.keys()) | (listed.intersection(_maybe_reused(previous, last_pid)))
        wanted |= listed.intersection(reread)
        unlisted_looks = 0
    else:
        wanted = set(handed_out).union(reread)
        unlisted_looks = previous.unlisted_looks + 1
    wanted.discard(daemon_pid)
    changed: set[int] = set()
    for pid in wanted:
        stat = process.read_stat(pid)
        if stat is None:
            stats.pop(pid, None)
            continue
        old = stats.get(pid)
        if old is None or old.start_time != stat.start_time:
            changed.add(pid)
        stats[pid] = stat
    ours = {pid for pid in previous.ours if pid in stats and pid not in changed}
    # A process not seen before is ours if it is an anchor or its parent is
    # the daemon or ours: follow parents to children among the new ones.
    new_by_parent: dict[int, list[int]] = {}
    for pid in changed:
        new_by_parent.setdefault(stats[pid].ppid, []).append(pid)
    frontier = [pid for pid in changed if stats[pid].process_id in anchors]
    frontier += [ppid for ppid in new_by_parent if ppid == daemon_pid or ppid in ours]
    if anchors != previous.anchors:  # else every anchor was judged by the look before
        for anchor in anchors:
            stat = stats.get(anchor.pid)
            if anchor.pid not in ours and stat is not None and stat.start_time == anchor.start_time:
                frontier.append(anchor.pid)
    newly_ours: list[int] = []
    while frontier:
        pid = frontier.pop()
        if pid != daemon_pid and pid not in ours:
            ours.add(pid)
            newly_ours.append(pid)
        for child in new_by_parent.pop(pid, ()):
            frontier.append(child)
    # A new process whose parent was gone before it could be read: read it
    # again (re-parented by now); if its parent is still unknown, leave it
    # out, to be read as new by the next listing rather than judged on a guess.
    for ppid, orphans in new_by_parent.items():
        if ppid in stats or ppid == NO_PARENT:
            continue
        for pid in orphans:
            stat = process.read_stat(pid)
            if stat is None or stat.start_time != stats[pid].start_time:
                del stats[pid]
            elif stat.ppid == daemon_pid or stat.ppid in ours:
                stats[pid] = stat
                ours.add(pid)
                newly_ours.append(pid)
            elif stat.ppid in stats or stat.ppid == NO_PARENT:
                stats[pid] = stat  # a child of a stranger
            else:
                del stats[pid]
    if not newly_ours and len(ours) == len(previous.ours):
        # Nothing of ours came or went (the usual look): the indexes stand.
        return msgspec.structs.replace(
            previous, stats=stats, ours=previous.ours, last_pid=last_pid, read=frozenset(wanted),
            unlisted_looks=unlisted_looks, anchors=anchors,
        )
    tags = {pid: tag for pid, tag in previous.tags.items() if pid in ours}
    for pid in newly_ours:
        tag = process.read_environ_tag(pid)
        if tag is not None:
            tags[pid] = tag
    children: dict[int, list[int]] = {}
    for pid in ours:
        children.setdefault(stats[pid].ppid, []).append(pid)
    by_tag: dict[str, list[int]] = {}
    for pid, tag in tags.items():
        by_tag.setdefault(tag, []).append(pid)
    return ProcessTable(
        stats=stats, ours=frozenset(ours), children={p: tuple(c) for p, c in children.items()},
        tags=tags, by_tag={t: tuple(p) for t, p in by_tag.items()}, last_pid=last_pid, read=frozenset(wanted),
        unlisted_looks=unlisted_looks, anchors=anchors,
    )


class TableScanner:
    """The latest `ProcessTable` of a daemon in process-table mode, refreshed
    in a worker thread on demand. Callers that ask while a refresh is under
    way wait for the next one, which serves them all: a shutdown's thousand
    stops cost a few refreshes, not a thousand. Trio thread only."""

    def __init__(self, daemon_pid: int, anchors: Callable[[], frozenset[process.ProcessId]]) -> None:
        """`anchors()`: the roots and known members of every tree, on the trio thread."""
        self.daemon_pid = daemon_pid
        self.table = ProcessTable()
        self._anchors = anchors
        self._reread: set[int] = set()
        self._next = _Refresh()
        self._wanted = False
        self._running = False
        self._nursery: trio.Nursery | None = None

    def attach(self, nursery: trio.Nursery) -> None:
        """Where refreshes run: a nursery that outlives every caller."""
        self._nursery = nursery

    async def refreshed(self, reread: Iterable[int] = ()) -> ProcessTable:
        """A table from a refresh that began after this call, with fresh
        stats of `reread`. Raises OSError if /proc cannot be listed.
        Cancellation: the caller stops waiting; the refresh goes on."""
        self._reread.update(reread)
        self._wanted = True
        waiting = self._next
        if not self._running:
            assert self._nursery is not None, "attach() first"
            self._running = True
            self._nursery.start_soon(self._run)
        await waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        assert waiting.table is not None
        return waiting.table

    def offer(self, table: ProcessTable, base: ProcessTable) -> None:
        """A table refreshed elsewhere from `base` (a sweep's): kept if
        nothing newer was installed since `base`."""
        if self.table is base:
            self.table = table

    async def _run(self) -> None:
        try:
            while self._wanted:
                self._wanted = False
                current, self._next = self._next, _Refresh()
                reread, self._reread = self._reread, set()
                base = self.table
                try:
                    current.table = await trio.to_thread.run_sync(partial(
                        refresh, base, daemon_pid=self.daemon_pid, anchors=self._anchors(), reread=reread,
                    ))
                except OSError as exc:
                    current.error = exc
                else:
                    self.offer(current.table, base)
                current.done.set()
        finally:
            self._running = False


class _Refresh(msgspec.Struct):
    """One refresh and the callers waiting for it."""

    done: trio.Event = msgspec.field(default_factory=trio.Event)
    table: ProcessTable | None = None
    error: OSError | None = None
