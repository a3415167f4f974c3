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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio

from supervisor import procs
from supervisor.cgroup import CgroupManager

log = structlog.get_logger()

# How long to wait between liveness checks while a tree dies. Starts small so a
# tree that exits on SIGTERM at once is seen gone within a millisecond or two,
# and backs off so a slow tree costs little.
FIRST_POLL_S = 0.001
MAX_POLL_S = 0.025

# How long SIGKILLed processes may take to vanish (and be reaped) before the
# stop is reported as failed. SPEC rule 2 allows stop_timeout + 1 s in all.
KILL_GRACE_S = 0.9

# In fallback mode a rescan of the whole process table costs milliseconds on a
# busy host; do it at most this often while waiting for a tree to die.
FALLBACK_RESCAN_S = 0.1


@dataclass
class InstanceTree:
    """The processes of one instance, as far as the daemon can prove them."""

    instance_id: str
    root: procs.ProcessId
    cgroup: CgroupManager | None = None
    daemon_pid: int = field(default_factory=os.getpid)
    # Every member ever seen: a process that later clears its environment or
    # is re-parented is still recognised by its (pid, start time).
    known: set[procs.ProcessId] = field(default_factory=set)

    def scan(self, known: frozenset[procs.ProcessId] = frozenset()) -> list[procs.ProcStat]:
        """Blocking: the live members now (zombies included).

        Safe in a worker thread: it reads only immutable fields and the `known`
        snapshot it is given, and returns data. The caller, on the trio thread,
        passes the result to `remember`.
        """
        if self.cgroup is not None:
            return [s for s in map(procs.read_stat, self.cgroup.pids(self.instance_id)) if s]
        table = procs.scan_processes()
        by_pid = {s.pid: s for s in table}
        members = {s.pid: s for s in procs.descendants(self.root.pid, table)}
        root = by_pid.get(self.root.pid)
        if root is not None and root.start_time == self.root.start_time:
            members[root.pid] = root
        for stat in procs.descendants(self.daemon_pid, table):
            if stat.pid not in members and procs.read_environ_tag(stat.pid) == self.instance_id:
                members[stat.pid] = stat
        for member in known:
            stat = by_pid.get(member.pid)
            if stat is not None and stat.start_time == member.start_time:
                members[stat.pid] = stat
        return list(members.values())

    def remember(self, stats: list[procs.ProcStat]) -> None:
        """Record members seen by a scan. Trio thread only."""
        self.known.update(procs.ProcessId(s.pid, s.start_time) for s in stats)

    async def members(self) -> list[procs.ProcStat]:
        """The live members now. A cgroup read is cheap enough for the trio
        thread; a process-table scan runs in a worker thread."""
        known = frozenset(self.known)
        if self.cgroup is not None:
            stats = self.scan(known)
        else:
            stats = await trio.to_thread.run_sync(self.scan, known)
        self.remember(stats)
        return stats


@dataclass
class StopOutcome:
    """What stopping a tree did, for logs and sweep reports."""

    signalled: list[procs.ProcessId] = field(default_factory=list)
    killed: list[procs.ProcessId] = field(default_factory=list)
    survivors: list[procs.ProcessId] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.survivors


async def stop_tree(
    tree: InstanceTree,
    *,
    stop_signal: int,
    stop_timeout: float,
    reap: Callable[[], None],
    child_exited: Callable[[], Awaitable[None]],
) -> StopOutcome:
    """Stop every process of `tree`: `stop_signal`, `stop_timeout` grace, SIGKILL.

    `reap` reaps the daemon's own exited children (adopted escapees become its
    children); `child_exited` waits for the next SIGCHLD so dying trees are
    noticed without busy polling. Returns once no member is alive or left a
    zombie, or after `stop_timeout` + `KILL_GRACE_S` with the survivors listed.

    Cancellation: the caller is expected to shield this; if cancelled anyway the
    tree may be left half-stopped and the next sweep finishes the job.
    """
    outcome = StopOutcome()
    tracked: set[procs.ProcessId] = set()

    async def rescan(sig: int) -> None:
        stats = await tree.members()
        for stat in stats:
            member = procs.ProcessId(stat.pid, stat.start_time)
            if member in tracked:
                continue
            tracked.add(member)
            if procs.signal_process(member, sig):
                (outcome.killed if sig == signal.SIGKILL else outcome.signalled).append(member)

    await rescan(stop_signal)
    if not await _wait_gone(tree, tracked, stop_timeout, reap, child_exited, rescan, stop_signal):
        alive = [m for m in tracked if procs.is_running(m)]
        if tree.cgroup is not None:
            tree.cgroup.kill(tree.instance_id)
        for member in alive:
            procs.signal_process(member, signal.SIGKILL)
        outcome.killed.extend(alive)
        await rescan(signal.SIGKILL)
        await _wait_gone(tree, tracked, KILL_GRACE_S, reap, child_exited, rescan, signal.SIGKILL)
    reap()
    outcome.survivors = [m for m in tracked if not procs.is_gone(m, our_pid=tree.daemon_pid)]
    return outcome


async def _wait_gone(
    tree: InstanceTree,
    tracked: set[procs.ProcessId],
    timeout: float,
    reap: Callable[[], None],
    child_exited: Callable[[], Awaitable[None]],
    rescan: Callable[[int], Awaitable[None]],
    sig: int,
) -> bool:
    """Wait up to `timeout` for every tracked member (and any newcomer) to be gone."""
    poll = FIRST_POLL_S
    last_rescan = trio.current_time()
    with trio.move_on_after(timeout):
        while True:
            reap()
            if all(procs.is_gone(m, our_pid=tree.daemon_pid) for m in tracked):
                # A member may have forked just before dying: look once more.
                await rescan(sig)
                if all(procs.is_gone(m, our_pid=tree.daemon_pid) for m in tracked):
                    return True
            now = trio.current_time()
            if tree.cgroup is not None or now - last_rescan >= FALLBACK_RESCAN_S:
                last_rescan = now
                await rescan(sig)
            with trio.move_on_after(poll):
                await child_exited()
            poll = min(poll * 2, MAX_POLL_S)
    return False
