"""The orphan sweep: finding processes the daemon started that no live instance
accounts for, reaping them, and reporting it (`Sweeper`, at the end).

Finding is blocking (it reads /proc and cgroup files) and runs in a worker
thread: `scan` takes immutable snapshots and returns data. Reaping runs on the
trio thread. What counts as proof that a process is ours (a pid alone never is): it is in
one of our instance cgroups; or it carries our daemon's tag; or it descends
from the daemon (a child subreaper, which only ever spawns adapters); or it is a
(pid, start time) from the durable record of a previous run. A process with none
of these is never touched, whatever its command line.

Cost: a periodic sweep in cgroup mode reads only the instance cgroups and the
stat of their members, so it does not grow with unrelated processes on the host.
In process-table mode a periodic sweep refreshes the daemon's process table
(`procs/proctable.py`: one listing of /proc, and the stat of new pids only)
and then works on the tracked trees alone (`scan_table`). Any `deep` sweep
reads every /proc entry (and the environment of every process).
"""

from __future__ import annotations

import errno
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial

import msgspec
import structlog
import trio

from supervisor.core.config import Config
from supervisor.core.registry import Action, Reason, Registry, State
from supervisor.engine import metrics, reports, scans
from supervisor.engine.diskwrite import write_bounded
from supervisor.engine.instances import Instances
from supervisor.engine.reports import Orphan
from supervisor.procs import process, proctable
from supervisor.procs.cgroup import CgroupManager
from supervisor.procs.proctable import ProcessTable, TableScanner
from supervisor.procs.sparecgroups import SpareCgroups
from supervisor.procs.subreaper import ChildReaper
from supervisor.procs.tree import KILL_GRACE_S, InstanceTree, daemon_tags, signal_member, wait_gone

log = structlog.get_logger()

# Longest grace a sweep gives an orphan between SIGTERM and SIGKILL. An orphan
# of a known adapter gets that adapter's stop_timeout if it is shorter.
ORPHAN_GRACE_S = 5.0


class Candidate(msgspec.Struct, frozen=True):
    """A process the sweep proved is ours and that no live instance accounts for."""

    stat: process.ProcStat
    cmdline: list[str]
    instance: str | None
    job: str | None
    adapter: str | None
    # "cgroup" | "tag" | "descendant" | "record"
    proof: str
    # The uid owning it, if the daemon may not read its environment (and so
    # cannot tell which instance's it is, if any).
    hidden_uid: int | None = None


class ScanResult(msgspec.Struct):
    scanned: int = 0
    members: dict[str, list[process.ProcStat]] = msgspec.field(default_factory=dict)
    candidates: list[Candidate] = msgspec.field(default_factory=list)
    # Instance cgroups of no live instance (removed once empty).
    stale_cgroups: list[str] = msgspec.field(default_factory=list)
    # The process table refreshed by `scan_table`.
    table: ProcessTable | None = None
    # The live members the table found of each tree whose known members
    # they are not (`scan_table`), to be remembered.
    learned: dict[str, frozenset[process.ProcessId]] = msgspec.field(default_factory=dict)


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
        if (stat is not None and stat.start_time == member.start_time and stat.pid not in seen
                and stat.state not in process.EXITED_STATES):
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


def scan_table(
    previous: ProcessTable,
    *,
    anchors: frozenset[process.ProcessId],
    live: frozenset[str],
    measured: dict[str, tuple[InstanceTree, frozenset[process.ProcessId]]],
    tracked: Mapping[str, tuple[process.ProcessId, frozenset[process.ProcessId]]],
    learned_from: frozenset[int] | None = None,
    daemon_pid: int,
) -> ScanResult:
    """Blocking: a periodic sweep's scan in process-table mode, from the
    daemon's table refreshed (`proctable.refresh`). `anchors` are the roots
    and known members of every tree, `live` every instance the daemon still
    owns; `measured` the trees whose members (with fresh figures) are wanted;
    `tracked` the root and known members of every running tree: where the
    live members found differ from those known, they are returned in
    `learned` (looked for only when the processes of ours are not
    `learned_from`, those of the last scan whose `learned` was taken in).
    A process of ours is accounted for if it is an anchor, carries the tag
    of a live instance, or descends from either; the rest of ours are the
    candidates, each read again so that a zombie or a reused pid is none.
    Costs the tracked processes and the new ones, not the host. Changes
    nothing; raises OSError if /proc cannot be listed."""
    reread = [m.pid for tree, known in measured.values() for m in (tree.root, *known)]
    table = proctable.refresh(previous, daemon_pid=daemon_pid, anchors=anchors, reread=reread)
    result = ScanResult(scanned=len(table.stats), table=table)
    stats = table.stats
    accounted = {a.pid for a in anchors if a.pid in stats and stats[a.pid].start_time == a.start_time}
    for instance_id in live:
        accounted.update(table.by_tag.get(instance_id, ()))
    frontier = list(accounted)
    while frontier:
        for child in table.children.get(frontier.pop(), ()):
            if child not in accounted:
                accounted.add(child)
                frontier.append(child)
    for pid in table.ours - accounted:
        stat = process.read_stat(pid)
        if stat is None or stat.start_time != stats[pid].start_time or stat.state in process.EXITED_STATES:
            continue
        result.candidates.append(_candidate(stat, "descendant"))
    for instance_id, (tree, known) in measured.items():
        result.members[instance_id] = table.members(tree.root, known, instance_id)
    # A tree's members change only as processes of ours come and go: while
    # ours are those of the last scan that learned, there is nothing to learn.
    for instance_id, (root, known) in tracked.items() if table.ours != learned_from else ():
        found = frozenset(
            process.ProcessId(s.pid, s.start_time)
            for s in table.members(root, known, instance_id)
            if s.state not in process.EXITED_STATES and s.pid != root.pid
        )
        if found != known - {root}:
            result.learned[instance_id] = found
    return result


def _candidate(stat: process.ProcStat, proof: str, instance: str | None = None) -> Candidate:
    """A candidate with what its environment says of it; proven by its
    cgroup, it is that cgroup's instance whatever its environment claims (a
    process may set any tag, and the instance is what gets killed)."""
    env = process.read_supervisor_env(stat.pid)
    return Candidate(
        stat=stat,
        cmdline=process.read_cmdline(stat.pid),
        instance=instance if proof == "cgroup" else env.get(process.INSTANCE_ENV, instance),
        job=env.get(process.JOB_ENV),
        adapter=env.get(process.ADAPTER_ENV),
        proof=proof,
        hidden_uid=None if env or proof == "cgroup" else process.hidden_environ_owner(stat.pid),
    )


def age_seconds(start_time_ticks: int) -> float:
    """Seconds since a process started, from its /proc start time."""
    return max(0.0, (process.uptime_ticks() - start_time_ticks) / process.CLOCK_TICKS)


async def reap_candidates(
    candidates: list[Candidate],
    *,
    our_pid: int,
    grace: float,
    reap: Callable[[Iterable[int]], None],
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


# -- the sweep as the daemon runs it ----------------------------------------------


class Sweeper:
    """Runs sweeps (one at a time) and files their reports.

    A sweep reaps zombies re-parented to the daemon, releases what the
    registry's deadlines say must go (`tick`), scans in a worker thread, then,
    shielded, enforces memory limits, reaps the orphans found, removes stale
    cgroups and files the report (log, history, reports.jsonl, metrics)."""

    def __init__(
        self,
        *,
        config: Config,
        registry: Registry,
        instances: Instances,
        reaper: ChildReaper,
        cgroups: CgroupManager | None,
        spares: SpareCgroups | None,
        store: reports.ReportStore,
        metrics: metrics.Metrics,
        daemon_key: str,
        tick: Callable[[], None],
        execute: Callable[[Iterable[Action]], None],
        table: TableScanner | None = None,
    ) -> None:
        """`table`: the daemon's process table, in process-table mode."""
        self.config = config
        self._registry = registry
        self._instances = instances
        self._reaper = reaper
        self._cgroups = cgroups
        self._spares = spares
        self._store = store
        self._metrics = metrics
        self._daemon_key = daemon_key
        self._tick = tick
        self._execute = execute
        self._table = table
        self._lock = trio.Lock()
        # sweep.tags_unreadable is logged once, not at every sweep.
        self._warned_hidden = False
        # The processes of ours when a process-table sweep last learned the
        # trees' members (`scan_table`).
        self._learned_from: frozenset[int] | None = None
        # Expired leases (the registry's tick) not yet in a report.
        self._expired: list[str] = []
        # Trees the limit watch stopped for their memory_limit, not yet in a report.
        self._over_memory: list[str] = []

    @property
    def busy(self) -> bool:
        """Whether a sweep is under way."""
        return self._lock.locked()

    def leases_expired(self, tokens: list[str]) -> None:
        """Leases the registry expired: the next report lists them."""
        self._expired += tokens

    def over_memory_stopped(self, instance_id: str) -> None:
        """A tree the limit watch stopped for its memory_limit: the next
        report lists it in `over_memory`, as if the sweep had found it."""
        self._over_memory.append(instance_id)

    async def run_periodically(self) -> None:
        """Sweep every `sweep_interval` until cancelled."""
        while True:
            await trio.sleep(self.config.daemon.sweep_interval)
            try:
                await self.sweep("periodic")
            except OSError as exc:
                # A resource ran out (fds, memory) somewhere no narrower
                # handler covers: this sweep is lost, the daemon is not.
                log.error("sweep.failed", error=str(exc), errno=errno.errorcode.get(exc.errno or 0))

    async def sweep(
        self,
        kind: str,
        *,
        deep: bool = False,
        recorded: Iterable[process.ProcessId] = (),
        adopted: Iterable[str] = (),
    ) -> reports.SweepReport:
        """Find and reap orphans, enforce memory limits, settle state that
        disagrees with reality; report it all. `recorded` are (pid, start
        time) pairs of a previous run, proof that they are ours; `adopted`
        the instances taken over from it (for the report). A process proven
        ours by its tag that names a running instance is a member of that
        tree, not an orphan. Cancellation:
        may be cancelled while scanning (nothing is changed); shielded once
        reaping starts, so a report is always written."""
        async with self._lock:
            started_at = time.time()
            started = trio.current_time()
            errors: list[str] = []
            self._reaper.take_adopted()  # reaped on SIGCHLD already: not orphans
            self._reaper.reap()
            zombies = self._reaper.take_adopted()
            self._tick()
            running = self._instances.running
            # A periodic sweep reads only the trees it must measure (adapters
            # with a memory_limit): orphans show up as instance cgroups of no
            # live instance, found by one listing, or in process-table mode
            # as processes of ours that no tree accounts for.
            incremental = not deep and (self._cgroups is not None or self._table is not None)
            wanted = [i for i, r in running.items() if not incremental or r.adapter.memory_limit is not None]
            snapshots = scans.snapshot(self._instances, wanted)
            live = self._owned_cgroups()
            recorded = list(recorded)
            try:
                born_before = process.uptime_ticks()
            except OSError as exc:
                # (Out of fds, most likely.) Nothing is reaped this time: a
                # candidate is only killed if it was born before the scan.
                log.error("sweep.scan_failed", error=str(exc))
                errors.append(f"scan failed: {exc}")
                born_before = 0
            table = self._table
            tracked: dict[str, tuple[process.ProcessId, frozenset[process.ProcessId]]] = {}
            try:
                if table is not None and incremental:
                    base = table.table
                    tracked = {i: (r.tree.root, frozenset(r.tree.known)) for i, r in running.items()}
                    result = await trio.to_thread.run_sync(partial(
                        scan_table, base, anchors=self._instances.anchors(), live=live, measured=snapshots,
                        tracked=tracked, learned_from=self._learned_from, daemon_pid=self._instances.pid,
                    ))
                    assert result.table is not None
                    table.offer(result.table, base)
                else:
                    result = await trio.to_thread.run_sync(lambda: scan(
                        trees=snapshots, live=live, cgroups=self._cgroups, daemon_pid=self._instances.pid,
                        daemon_key=self._daemon_key, deep=deep, recorded=recorded,
                    ))
            except OSError as exc:
                log.error("sweep.scan_failed", error=str(exc))
                errors.append(f"scan failed: {exc}")
                result = ScanResult()
            with trio.CancelScope(shield=True):
                scans.remember(self._instances, result.members, snapshots)
                scans.learn(self._instances, result.learned, tracked)
                if result.table is not None:
                    self._learned_from = result.table.ours
                over_memory, self._over_memory = self._over_memory, []
                over_memory += self._enforce_memory_limits(result.members)
                if deep:
                    # Every sweep's reap() above already routes a root that
                    # exited unnoticed; this also catches one reaped elsewhere.
                    self._instances.settle_vanished_roots()
                self._claim_members(result.candidates)
                candidates = self._still_orphaned(result.candidates, born_before)
                orphans = await reap_candidates(
                    candidates,
                    our_pid=self._instances.pid,
                    grace=self._orphan_grace(candidates),
                    reap=self._reaper.reap_children,
                    child_exited=self._reaper.child_exited,
                    kill_cgroup=self._cgroups.kill if self._cgroups is not None else None,
                )
                orphans += [zombie_orphan(pid, self._instances.pid) for pid, _ in zombies]
                owned = self._owned_cgroups()
                for name in result.stale_cgroups:
                    if name not in owned:
                        self._instances.remove_cgroup(name)
                errors += [f"pid {o.pid} survived SIGKILL" for o in orphans if o.result == "failed"]
                expired, self._expired = self._expired, []
                # Bounded before it goes anywhere (log, history, file, reply).
                report = reports.bounded(reports.SweepReport(
                    id=secrets.token_hex(6),
                    kind=kind,
                    started_at=started_at,
                    duration_ms=round((trio.current_time() - started) * 1000, 3),
                    scanned=result.scanned,
                    orphans=orphans,
                    expired_leases=[token[:8] for token in expired],
                    over_memory=over_memory,
                    reclaimed_rss_bytes=sum(o.rss_bytes for o in orphans if o.result == "gone"),
                    errors=errors,
                    adopted=list(adopted),
                ))
                await self._file(report)
            return report

    def _owned_cgroups(self) -> frozenset[str]:
        """Instance cgroups that are not stale: of a tree not yet gone, of an
        instance in the registry (one being spawned has no tree yet), or spare."""
        spares = self._spares.names() if self._spares is not None else frozenset()
        return frozenset(self._instances.running).union(self._registry.instances, spares)

    def _claim_members(self, candidates: list[Candidate]) -> None:
        """Candidates that name a running instance by their tag are members it
        did not know of (an escapee of an adopted tree, re-parented away from
        the previous incarnation): its tree learns them, and the record with
        it (once untagged, only the record proves them ours after a crash)."""
        running = self._instances.running
        learned = False
        for candidate in candidates:
            tree_of = running.get(candidate.instance) if candidate.instance else None
            if tree_of is not None and candidate.proof == "tag" and candidate.stat.process_id not in tree_of.tree.known:
                tree_of.tree.known.add(candidate.stat.process_id)
                learned = True
        if learned:
            self._instances.record.mark_dirty()

    def _still_orphaned(self, candidates: list[Candidate], born_before: int) -> list[Candidate]:
        """Drop candidates that became accounted for while the scan ran in its
        thread: members of instances spawned meanwhile, of any instance the
        registry still knows (a spawn may still be in its worker thread, its
        root not yet registered), and anything born after the snapshot (judged
        by the next sweep, never killed on a stale view)."""
        running = self._instances.running
        known = set().union(*(r.tree.known for r in running.values()))
        still = [
            c for c in candidates
            if c.instance not in running
            and c.instance not in self._registry.instances
            and c.stat.process_id not in known
            and c.stat.start_time < born_before
            and c.stat.pid not in self._reaper.others
        ]
        hidden = [c for c in still if c.hidden_uid is not None]
        if not hidden:
            return still
        # A process of another user whose tag the daemon may not read (no
        # CAP_SYS_PTRACE) may be an escapee of a live tree running as that
        # user: it is left alone until no running tree runs as its uid.
        spared = {c.stat.pid for c in hidden if c.hidden_uid in self._running_uids()}
        if spared and not self._warned_hidden:
            self._warned_hidden = True
            log.warning("sweep.tags_unreadable", pids=sorted(spared),
                        advice="the daemon may not read the environment of other users' processes; "
                               "give it CAP_SYS_PTRACE so that escapees of trees with a `user` are told apart")
        return [c for c in still if c.stat.pid not in spared]

    def _running_uids(self) -> set[int]:
        """The uids the running trees with a `user` (or "@peer") run as."""
        uids = set()
        for instance_id, running in self._instances.running.items():
            adapter = running.adapter
            if adapter.credentials is not None:
                uids.add(adapter.credentials.uid)
            elif adapter.runs_as_peer:
                instance = self._registry.instances.get(instance_id)
                if instance is not None and instance.uid is not None:
                    uids.add(instance.uid)
        return uids

    def _enforce_memory_limits(self, measured: Iterable[str]) -> list[str]:
        """Terminate the measured instances whose tree is over its memory_limit."""
        over = []
        for instance_id in measured:
            running = self._instances.running.get(instance_id)
            if running is None:
                continue
            limit = running.adapter.memory_limit
            if limit is None or running.rss_bytes <= limit:
                continue
            instance = self._registry.instances.get(instance_id)
            if instance is None or instance.state not in (State.RUNNING, State.LINGERING):
                continue
            over.append(instance_id)
            log.warning("adapter.over_memory", instance=instance_id, rss_bytes=running.rss_bytes, memory_limit=limit)
            self._execute(self._registry.terminate(instance_id, reason=Reason.MEMORY_LIMIT))
        return over

    def _orphan_grace(self, candidates: list[Candidate]) -> float:
        adapters = self.config.adapters
        timeouts = [adapters[c.adapter].stop_timeout for c in candidates if c.adapter in adapters]
        return min([ORPHAN_GRACE_S, *timeouts])

    async def _file(self, report: reports.SweepReport) -> None:
        self._store.remember(report)
        # A quiet periodic sweep is the normal case, every sweep_interval:
        # logged at info it would bury what happened.
        quiet = report.kind == "periodic" and reports.found_nothing(report)
        (log.debug if quiet else log.info)("sweep.report", **reports.to_builtins(report))
        self._metrics.sweep_duration.observe(report.kind, report.duration_ms / 1000)
        for orphan in report.orphans:
            self._metrics.orphans.inc(orphan.action)
        await write_bounded("sweep.report_not_saved", self._store.append_to_file, report)
        textfile = self.config.daemon.metrics_textfile
        if textfile is not None:
            await write_bounded("metrics.textfile_failed", metrics.write_textfile, textfile, self._metrics.exposition())
