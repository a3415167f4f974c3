"""Finding and stopping the whole process tree of an instance.

A tree is the root and every descendant, including descendants that called
`setsid()` or double-forked: the daemon is a child subreaper, so such escapees
re-parent to it and stay its descendants. Membership comes from the instance's
cgroup when the daemon runs in cgroup mode, else from the process table:
descendants of the root, plus descendants of the daemon that carry the
instance's tag. Every process is held as (pid, start time), and every signal is
sent through a pidfd after checking that identity, so pid reuse never reaches a
stranger.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set

import msgspec
import structlog
import trio

from supervisor.procs import process
from supervisor.procs.cgroup import CgroupManager
from supervisor.procs.proctable import TableScanner

log = structlog.get_logger()

# How long to wait between liveness checks while a tree dies. Starts small so a
# tree that exits on SIGTERM at once is seen gone within a millisecond or two,
# and backs off so a slow tree costs little.
FIRST_POLL_S = 0.001
MAX_POLL_S = 0.025

# How long SIGKILLed processes may take to vanish (and be reaped) before the
# stop is reported as failed. A stop promises no process left within
# stop_timeout + 1 s in all.
KILL_GRACE_S = 0.9

# In fallback mode a rescan reads the stat of every process on the host, work
# that grows with the host, not with the tree; do it at most this often while
# waiting for a tree to die.
FALLBACK_RESCAN_S = 0.1


class InstanceTree(msgspec.Struct):
    """The processes of one instance, as far as the daemon can prove them."""

    instance_id: str
    root: process.ProcessId
    cgroup: CgroupManager | None = None
    daemon_pid: int = msgspec.field(default_factory=os.getpid)
    # In process-table mode, the daemon's shared table: `members` asks it
    # instead of scanning the whole host for this tree alone.
    table: TableScanner | None = None
    # Every member ever seen: a process that later clears its environment or
    # is re-parented is still recognised by its (pid, start time).
    known: set[process.ProcessId] = msgspec.field(default_factory=set)

    def scan(self, known: frozenset[process.ProcessId] = frozenset()) -> list[process.ProcStat]:
        """Blocking: the live members now (zombies included).

        Safe in a worker thread: it reads only immutable fields and the `known`
        snapshot it is given, and returns data. The caller, on the trio thread,
        passes the result to `remember`. Raises OSError if the instance's cgroup
        or /proc cannot be read.
        """
        if self.cgroup is not None:
            listed = self.cgroup.pids(self.instance_id)
            stats = [s for s in map(process.read_stat, listed) if s]
            # A pid listed, then freed and reused by a stranger before its stat
            # was read, is not in the cgroup any more: keep only pids still listed.
            still = set(self.cgroup.pids(self.instance_id)) if stats else set()
            return [s for s in stats if s.pid in still]
        return self.members_in(process.scan_processes(), known)

    def members_in(
        self,
        table: list[process.ProcStat],
        known: frozenset[process.ProcessId],
        tags: Mapping[int, str | None] | None = None,
    ) -> list[process.ProcStat]:
        """Blocking (may read environments): the members found in a scanned
        `table`: the root and its descendants (while the root's pid is still
        the root's), descendants of the daemon
        carrying the instance tag, and known members still alive. `tags` (from
        `daemon_tags`) may be passed when scanning many trees in one table."""
        by_pid = {s.pid: s for s in table}
        members: dict[int, process.ProcStat] = {}
        root = by_pid.get(self.root.pid)
        # Descent counts only from the root itself: once it is reaped its pid
        # may belong to a stranger, whose children are no members.
        if root is not None and root.start_time == self.root.start_time:
            members = {s.pid: s for s in process.descendants(self.root.pid, table)}
            members[root.pid] = root
        if tags is None:
            tags = daemon_tags(self.daemon_pid, table)
        for pid, tag in tags.items():
            if tag == self.instance_id and pid not in members and pid in by_pid:
                members[pid] = by_pid[pid]
        for member in known:
            stat = by_pid.get(member.pid)
            if stat is not None and stat.start_time == member.start_time:
                members[stat.pid] = stat
        return list(members.values())

    def remember(self, stats: list[process.ProcStat], snapshot: frozenset[process.ProcessId] = frozenset()) -> bool:
        """Record members seen by a scan made from `snapshot`. Members of the
        snapshot the scan no longer found are gone and forgotten, so `known`
        tracks the live tree instead of growing for weeks. Returns whether
        `known` changed (the durable record then needs rewriting). Trio
        thread only."""
        return self.remember_ids({process.ProcessId(s.pid, s.start_time) for s in stats}, snapshot)

    def remember_ids(self, seen: Set[process.ProcessId], snapshot: frozenset[process.ProcessId]) -> bool:
        """`remember`, given the identities seen."""
        before = len(self.known)
        self.known -= snapshot - seen
        after_forgetting = len(self.known)
        self.known |= seen
        return len(self.known) != after_forgetting or after_forgetting != before

    async def members(self) -> list[process.ProcStat]:
        """The live members now, remembered (see `remember`). A cgroup read is
        cheap enough for the trio thread; in process-table mode the shared
        table is refreshed in a worker thread (one refresh serves every tree
        asking meanwhile), or without one the process table is scanned there.
        Members from the table are as it last read them (zombies included):
        their identities are right, their figures may be old. Raises OSError
        as `scan` does, remembering nothing then.

        Cancellation: in cgroup mode there is no checkpoint, so it always
        completes. In process-table mode Cancelled is raised only before the
        scan starts; a scan once started is finished, remembered and returned,
        and the cancellation takes effect at the caller's next checkpoint."""
        known = frozenset(self.known)
        if self.cgroup is not None:
            stats = self.scan(known)
        elif self.table is not None:
            table = await self.table.refreshed()
            stats = table.members(self.root, known, self.instance_id)
        else:
            stats = await trio.to_thread.run_sync(self.scan, known)
        self.remember(stats, known)
        return stats


def scan_trees(
    snapshots: dict[str, tuple[InstanceTree, frozenset[process.ProcessId]]],
) -> dict[str, list[process.ProcStat]]:
    """Blocking: members of many trees, from (tree, known-members snapshot)
    pairs. For a worker thread: reads only, returns data. In process-table mode
    one scan of /proc serves every tree. Raises OSError as `InstanceTree.scan`
    does."""
    if not snapshots:
        return {}
    first_tree = next(iter(snapshots.values()))[0]
    if first_tree.cgroup is not None:
        return {instance_id: tree.scan(known) for instance_id, (tree, known) in snapshots.items()}
    table = process.scan_processes()
    tags = daemon_tags(first_tree.daemon_pid, table)
    return {instance_id: tree.members_in(table, known, tags) for instance_id, (tree, known) in snapshots.items()}


def signal_member(member: process.ProcessId, sig: int) -> bool:
    """`process.signal_process`, with a refusal (EPERM: an adapter that became
    another user; EMFILE: no fd for the pidfd) logged and counted as not
    delivered, so one such process never aborts a stop or a sweep."""
    try:
        return process.signal_process(member, sig)
    except OSError as exc:
        log.warning("process.signal_failed", pid=member.pid, signal=signal.Signals(sig).name, error=str(exc))
        return False


def daemon_tags(daemon_pid: int, table: list[process.ProcStat]) -> dict[int, str | None]:
    """Blocking: the instance tag of every descendant of the daemon in `table`,
    read once so that many trees can be matched against one scan."""
    return {s.pid: process.read_environ_tag(s.pid) for s in process.descendants(daemon_pid, table)}


class StopOutcome(msgspec.Struct):
    """What stopping a tree did, for logs and sweep reports."""

    signalled: list[process.ProcessId] = msgspec.field(default_factory=list)
    killed: list[process.ProcessId] = msgspec.field(default_factory=list)
    survivors: list[process.ProcessId] = msgspec.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.survivors


async def stop_tree(
    tree: InstanceTree,
    *,
    stop_signal: int,
    stop_timeout: float,
    reap: Callable[[Iterable[int]], None],
    child_exited: Callable[[], Awaitable[None]],
) -> StopOutcome:
    """Stop every process of `tree`: `stop_signal`, `stop_timeout` grace, SIGKILL.

    `reap(pids)` reaps those of the daemon's own children (adopted escapees
    become its children), which were seen to have exited; `child_exited` waits for the next SIGCHLD so dying trees are
    noticed without busy polling. Returns once no member is alive or left a
    zombie, or after `stop_timeout` + `KILL_GRACE_S` with the survivors listed.
    A member that may not be signalled is logged (see `signal_member`) and
    listed among the survivors if it outlives the stop. Raises OSError if the
    instance's cgroup (or /proc) cannot be read or the cgroup cannot be killed,
    and what `reap` or `child_exited` raise; the tree may then be left
    half-stopped.

    Cancellation: the caller is expected to shield this; if cancelled anyway the
    tree may be left half-stopped and the next sweep finishes the job.
    """
    outcome = StopOutcome()
    tracked: set[process.ProcessId] = set()

    async def rescan(sig: int) -> None:
        stats = await tree.members()
        for stat in stats:
            member = process.ProcessId(stat.pid, stat.start_time)
            if member in tracked:
                continue
            tracked.add(member)
            if signal_member(member, sig):
                (outcome.killed if sig == signal.SIGKILL else outcome.signalled).append(member)

    rescan_interval = 0.0 if tree.cgroup is not None else FALLBACK_RESCAN_S

    async def wait(timeout: float, sig: int) -> bool:
        return await wait_gone(
            tracked, our_pid=tree.daemon_pid, timeout=timeout, reap=reap, child_exited=child_exited,
            rescan=lambda: rescan(sig), rescan_interval=rescan_interval,
        )

    await rescan(stop_signal)
    if not await wait(stop_timeout, stop_signal):
        alive = [m for m in tracked if process.is_running(m)]
        if tree.cgroup is not None:
            tree.cgroup.kill(tree.instance_id)
        for member in alive:
            signal_member(member, signal.SIGKILL)
        outcome.killed.extend(alive)
        await rescan(signal.SIGKILL)
        await wait(KILL_GRACE_S, signal.SIGKILL)
    reap(_exited_children(tracked, tree.daemon_pid))
    outcome.survivors = [m for m in tracked if not process.is_gone(m, our_pid=tree.daemon_pid)]
    return outcome


async def wait_gone(
    tracked: set[process.ProcessId],
    *,
    our_pid: int,
    timeout: float,
    reap: Callable[[Iterable[int]], None],
    child_exited: Callable[[], Awaitable[None]],
    rescan: Callable[[], Awaitable[None]] | None = None,
    rescan_interval: float = 0.0,
) -> bool:
    """Wait up to `timeout` for every process in `tracked` to be gone (a zombie
    child of `our_pid` is not gone until reaped). `rescan`, if given, may add
    newcomers to `tracked`; it runs at most every `rescan_interval` seconds and
    once more when everything looks gone (a member may have forked just before
    dying). Returns whether all are gone; raises what `reap`, `child_exited`
    or `rescan` raise. Cancellation: raises Cancelled; whatever was signalled
    stays signalled and `tracked` keeps what was added to it."""
    poll = FIRST_POLL_S
    last_rescan = trio.current_time()

    def all_gone() -> bool:
        """Whether every member is gone, after reaping the members that are
        exited children of ours (by pid: the daemon's own reaper reaps on
        every SIGCHLD, so a stop rarely has to)."""
        unreaped = []
        for member in tracked:
            stat = process.read_stat(member.pid)
            if stat is None or stat.start_time != member.start_time:
                continue
            if stat.state not in process.EXITED_STATES:
                return False
            if stat.ppid == our_pid:
                unreaped.append(member.pid)
        if not unreaped:
            return True
        reap(unreaped)
        return all(process.is_gone(m, our_pid=our_pid) for m in tracked)

    with trio.move_on_after(timeout):
        while True:
            if all_gone():
                if rescan is None:
                    return True
                await rescan()
                if all_gone():
                    return True
            now = trio.current_time()
            if rescan is not None and now - last_rescan >= rescan_interval:
                last_rescan = now
                await rescan()
            with trio.move_on_after(poll):
                await child_exited()
            poll = min(poll * 2, MAX_POLL_S)
    return False


def _exited_children(members: Iterable[process.ProcessId], our_pid: int) -> list[int]:
    """The pids of `members` that are exited, unreaped children of `our_pid`."""
    pids = []
    for member in members:
        stat = process.read_stat(member.pid)
        if (stat is not None and stat.start_time == member.start_time
                and stat.state in process.EXITED_STATES and stat.ppid == our_pid):
            pids.append(member.pid)
    return pids
