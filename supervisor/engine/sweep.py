"""The orphan sweep: finding processes the daemon started that no live instance
accounts for, and reaping them.

Finding is blocking (it reads /proc and cgroup files) and runs in a worker
thread: `scan` takes immutable snapshots and returns data. Reaping runs on the
trio thread. What counts as proof that a process is ours (SPEC rule 7): it is in
one of our instance cgroups; or it carries our daemon's tag; or it descends
from the daemon (a child subreaper, which only ever spawns adapters); or it is a
(pid, start time) from the durable record of a previous run. A process with none
of these is never touched, whatever its command line.

Cost: a periodic sweep in cgroup mode reads only the instance cgroups and the
stat of their members, so it does not grow with unrelated processes on the host.
The process-table fallback, and any `deep` sweep, read every /proc entry once
(environments only of the daemon's descendants, or of every process when deep).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from supervisor.procs import process
from supervisor.procs.cgroup import CgroupManager
from supervisor.engine.reports import Orphan
from supervisor.procs.tree import KILL_GRACE_S, InstanceTree, daemon_tags, signal_member, wait_gone



@dataclass(frozen=True)
class Candidate:
    """A process the sweep proved is ours and that no live instance accounts for."""

    stat: process.ProcStat
    cmdline: list[str]
    instance: str | None
    job: str | None
    adapter: str | None
    # "cgroup" | "tag" | "descendant" | "record"
    proof: str


@dataclass
class ScanResult:
    scanned: int = 0
    members: dict[str, list[process.ProcStat]] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    # Instance cgroups of no live instance (removed once empty).
    stale_cgroups: list[str] = field(default_factory=list)


def scan(
    *,
    trees: dict[str, tuple[InstanceTree, frozenset[process.ProcessId]]],
    live: frozenset[str],
    cgroups: CgroupManager | None,
    daemon_pid: int,
    daemon_key: str,
    deep: bool,
    recorded: Iterable[process.ProcessId] = (),
) -> ScanResult:
    """Blocking: members of every tracked tree and the orphans around them.

    `live` names every instance the daemon still owns (running or stopping);
    `trees` maps those whose members are wanted (all of them in process-table
    mode, where members are what accounts for the daemon's descendants) to the
    tree and a snapshot of its known members. Changes nothing.
    """
    result = ScanResult()
    accounted: set[int] = set()
    if cgroups is not None:
        for instance_id, (tree, known) in trees.items():
            stats = tree.scan(known)
            result.members[instance_id] = stats
            accounted.update(s.pid for s in stats)
            result.scanned += len(stats)
        for name in cgroups.instances():
            if name in live:
                continue
            result.stale_cgroups.append(name)
            for stat in filter(None, map(process.read_stat, cgroups.pids(name))):
                result.scanned += 1
                accounted.add(stat.pid)
                result.candidates.append(_candidate(stat, "cgroup", instance=name))
        if not deep:
            return result
    table = process.scan_processes()
    result.scanned = max(result.scanned, len(table))
    ours = process.descendants(daemon_pid, table)
    if cgroups is None:
        tags = daemon_tags(daemon_pid, table)
        for instance_id, (tree, known) in trees.items():
            stats = tree.members_in(table, known, tags)
            result.members[instance_id] = stats
            accounted.update(s.pid for s in stats)
    seen = set(accounted)
    for stat in ours:
        if stat.pid not in seen and stat.state not in process.EXITED_STATES:
            seen.add(stat.pid)
            result.candidates.append(_candidate(stat, "descendant"))
    by_pid = {s.pid: s for s in table}
    for member in recorded:
        stat = by_pid.get(member.pid)
        if stat is not None and stat.start_time == member.start_time and stat.pid not in seen:
            seen.add(stat.pid)
            result.candidates.append(_candidate(stat, "record"))
    if deep:
        for stat in table:
            if stat.pid in seen or stat.pid == daemon_pid or stat.state in process.EXITED_STATES:
                continue
            if process.read_supervisor_env(stat.pid).get(process.DAEMON_ENV) == daemon_key:
                seen.add(stat.pid)
                result.candidates.append(_candidate(stat, "tag"))
    return result


def _candidate(stat: process.ProcStat, proof: str, instance: str | None = None) -> Candidate:
    env = process.read_supervisor_env(stat.pid)
    return Candidate(
        stat=stat,
        cmdline=process.read_cmdline(stat.pid),
        instance=env.get(process.INSTANCE_ENV, instance),
        job=env.get(process.JOB_ENV),
        adapter=env.get(process.ADAPTER_ENV),
        proof=proof,
    )


def age_seconds(start_time_ticks: int) -> float:
    """Seconds since a process started, from its /proc start time."""
    return max(0.0, (process.uptime_ticks() - start_time_ticks) / process.CLOCK_TICKS)


async def reap_candidates(
    candidates: list[Candidate],
    *,
    our_pid: int,
    grace: float,
    reap: Callable[[], None],
    child_exited: Callable[[], Awaitable[None]],
    kill_cgroup: Callable[[str], None] | None = None,
) -> list[Orphan]:
    """SIGTERM every candidate, wait `grace`, SIGKILL survivors; report each.

    `kill_cgroup(name)` is called for candidates proven by their cgroup, so that
    anything they fork meanwhile dies too. Cancellation: raises; candidates may be
    left signalled but not yet reaped, for the next sweep.
    """
    tracked = {c.stat.process_id for c in candidates}
    for candidate in candidates:
        signal_member(candidate.stat.process_id, signal.SIGTERM)
    gone = await wait_gone(tracked, our_pid=our_pid, timeout=grace, reap=reap, child_exited=child_exited)
    killed: set[process.ProcessId] = set()
    if not gone:
        for candidate in candidates:
            member = candidate.stat.process_id
            if process.is_running(member):
                killed.add(member)
                if kill_cgroup is not None and candidate.proof == "cgroup" and candidate.instance:
                    kill_cgroup(candidate.instance)
                signal_member(member, signal.SIGKILL)
        await wait_gone(tracked, our_pid=our_pid, timeout=KILL_GRACE_S, reap=reap, child_exited=child_exited)
    now_ages = {c.stat.pid: age_seconds(c.stat.start_time) for c in candidates}
    return [
        Orphan(
            pid=c.stat.pid,
            ppid=c.stat.ppid,
            cmdline=c.cmdline,
            instance=c.instance,
            job=c.job,
            adapter=c.adapter,
            age_s=round(now_ages[c.stat.pid], 3),
            rss_bytes=c.stat.rss_bytes,
            action="killed" if c.stat.process_id in killed else "terminated",
            result="gone" if process.is_gone(c.stat.process_id, our_pid=our_pid) else "failed",
        )
        for c in candidates
    ]


def zombie_orphan(pid: int, our_pid: int) -> Orphan:
    """Report line for a zombie child the sweep reaped (its details died with it)."""
    return Orphan(
        pid=pid, ppid=our_pid, cmdline=[], instance=None, job=None, adapter=None,
        age_s=0.0, rss_bytes=0, action="reaped_zombie", result="gone",
    )
