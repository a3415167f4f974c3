"""The supervisor service: carries out what the registry decides.

`Supervisor` owns the registry, the spawned roots and every task that touches a
process: spawning, watching roots, stopping trees, sweeping orphans, expiring
leases, keeping the durable record. All of it runs on the trio thread; blocking
scans go to worker threads with immutable snapshots and only return data. The
request handlers (`supervisor.api`) call the public methods here and never
touch the registry themselves.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import structlog
import trio

from supervisor import afterreply
from supervisor.procs import clonespawn
from supervisor.engine import metrics
from supervisor.procs import process
from supervisor.engine import reports
from supervisor.engine import staterecord
from supervisor.procs import subreaper
from supervisor.engine import sweep
from supervisor.engine.diskwrite import write_bounded
from supervisor.procs.cgroup import CgroupManager
from supervisor.core.config import AdapterConfig, Config
from supervisor.core.errors import (
    InvalidParams,
    LimitReached,
    SpawnFailed,
    SupervisorError,
    UnknownAdapter,
)
from supervisor.core.registry import (
    Action,
    InstanceSettled,
    NotifyExited,
    Reason,
    Registry,
    Spawn,
    State,
    StopTree,
    new_instance_id,
)
from supervisor.procs.sparecgroups import SpareCgroups
from supervisor.procs.spawner import (
    RootProcess,
    adapter_environment,
    capture_stderr,
    spawn_root,
)
from supervisor.procs.subreaper import ChildReaper
from supervisor.procs.tree import (
    InstanceTree,
    StopOutcome,
    scan_trees,
    signal_member,
    stop_tree,
)

log = structlog.get_logger()

# The stderr tails of this many finished instances stay readable through `logs`
# after their tree is gone: enough to debug a crash, bounded for a long-lived
# daemon.
FINISHED_LOGS_KEPT = 64

# Longest grace a sweep gives an orphan between SIGTERM and SIGKILL. An orphan
# of a known adapter gets that adapter's stop_timeout if it is shorter.
ORPHAN_GRACE_S = 5.0

# A stop is bounded by the adapter's stop_timeout plus this: the SIGKILL grace,
# waiting for the root's status, and slack for a busy host.
STOP_MARGIN_S = 5.0

# `status` and budget checks reuse a tree scan this fresh (unless a tree was
# spawned or stopped since): under load, scans stay a few per second however
# many requests ask.
SCAN_CACHE_S = 0.25


class Peer(Protocol):
    """What the service needs of a client connection."""

    id: int
    uid: int

    def notify(self, method: str, params: object) -> None: ...


@dataclass
class RunningInstance:
    """The shell's side of one spawned instance, until its tree is gone."""

    adapter: AdapterConfig
    root: RootProcess
    tree: InstanceTree
    root_reaped: trio.Event = field(default_factory=trio.Event)
    returncode: int | None = None
    stopped: trio.Event = field(default_factory=trio.Event)
    rss_bytes: int = 0


@dataclass
class PendingSpawn:
    """Acquires parked on a STARTING instance wait for this."""

    settled: trio.Event = field(default_factory=trio.Event)
    error: SupervisorError | None = None


class Supervisor:
    """Leases, instances and process trees; one per daemon."""

    def __init__(self, config: Config, *, cgroups: CgroupManager | None = None) -> None:
        self.config = config
        self.cgroups = cgroups
        self.registry = Registry(new_instance_id=self._new_instance_id)
        self.spares = SpareCgroups(cgroups, new_instance_id) if cgroups is not None else None
        self.reaper = ChildReaper()
        self.run_id = secrets.token_hex(8)
        self.pid = os.getpid()
        self.started_at = time.time()
        self.state_dir = config.daemon.state_dir
        self.daemon_key = staterecord.daemon_key(self.state_dir)
        # Every root's environment starts from this copy of the daemon's: a
        # copy of os.environ costs more than the rest of a spawn's set-up.
        self.environ = dict(os.environ)
        # Adapter name -> its environment prepared for clone3 spawns
        # (`adapter_environment`); emptied when a reload replaces the adapters.
        self._environments: dict[str, clonespawn.Environment] = {}
        self.reports = reports.ReportStore(self.state_dir, max_file_bytes=config.daemon.reports_max_bytes)
        self.peers: dict[int, Peer] = {}
        self.running: dict[str, RunningInstance] = {}
        # The stderr tails of instances stopped lately: the deques themselves,
        # which their readers may still be filling with the last lines.
        self.finished_logs: collections.OrderedDict[str, collections.deque[bytes]] = collections.OrderedDict()
        self.shutting_down = False
        self._pending: dict[str, PendingSpawn] = {}
        # Spawns in flight (a worker thread is forking): shutdown waits for them.
        self._spawning: dict[str, trio.Event] = {}
        self._expired_unreported: list[str] = []
        self._sweep_lock = trio.Lock()
        self._deadline_changed = trio.Event()
        self.record = staterecord.RecordKeeper(self.state_dir, self._record_snapshot)
        # The shared tree scan (see `tree_members`).
        self._scan_cache: dict[str, list[process.ProcStat]] = {}
        self._scanned_at = float("-inf")
        self._generation = 0
        self._scanned_generation = -1
        self._scan_in_flight: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._clock_offset = 0.0
        # clone3 was refused once (seccomp, old kernel): subprocess from then on.
        self._clone3_refused = False
        # Last: registering the live-state collector reads the fields above.
        self.metrics = metrics.Metrics(self._live_state)

    # -- clock ---------------------------------------------------------------

    def now(self) -> float:
        """Wall-clock seconds, advanced by trio's clock (so MockClock drives it in tests)."""
        return trio.current_time() + self._clock_offset

    # -- running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap what a previous run left (a `startup` sweep), then serve until
        cancelled. Owns every process task; the caller should call `shutdown`
        before cancelling, or trees are left for the next start's sweep."""
        self._clock_offset = time.time() - trio.current_time()
        for report in await trio.to_thread.run_sync(self.reports.read_history):
            self.reports.remember(report)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.reaper.run)
            previous = await trio.to_thread.run_sync(staterecord.read_record, self.state_dir)
            await self.sweep("startup", deep=True, recorded=staterecord.recorded_processes(previous))
            self.record.mark_dirty()
            if self.spares is not None:
                nursery.start_soon(self.spares.run)
            nursery.start_soon(self._expire_deadlines)
            nursery.start_soon(self._sweep_periodically)
            nursery.start_soon(self.record.run)
            task_status.started()

    async def _expire_deadlines(self) -> None:
        """Release expired detached leases and end lingering instances on time.
        Wakes at the registry's next deadline, or when deadlines may have moved."""
        while True:
            deadline = self.registry.next_deadline()
            changed = self._deadline_changed
            if deadline is None:
                await changed.wait()
                continue
            with trio.move_on_at(deadline - self._clock_offset):
                await changed.wait()
                continue
            self._tick()

    def _tick(self) -> None:
        ticked = self.registry.tick(self.now())
        for token in ticked.expired_leases:
            log.info("lease.expired", lease=token[:8])
        if ticked.expired_leases:
            self.metrics.releases.labels("expired").inc(len(ticked.expired_leases))
        self._expired_unreported += ticked.expired_leases
        self.execute(ticked.actions)

    def _deadlines_may_have_changed(self) -> None:
        self._deadline_changed.set()
        self._deadline_changed = trio.Event()

    async def _sweep_periodically(self) -> None:
        while True:
            await trio.sleep(self.config.daemon.sweep_interval)
            await self.sweep("periodic")

    def _record_snapshot(self) -> staterecord.StateRecord:
        instances = []
        for instance_id, running in self.running.items():
            instance = self.registry.instances.get(instance_id)
            members = {running.root.id, *running.tree.known}
            instances.append(staterecord.RecordedInstance(
                instance=instance_id,
                job=instance.job if instance else "",
                adapter=running.adapter.name,
                processes=[staterecord.RecordedProcess(m.pid, m.start_time) for m in members],
            ))
        return staterecord.StateRecord(daemon_pid=self.pid, daemon_key=self.daemon_key, instances=instances)

    # -- carrying out actions ------------------------------------------------

    def execute(self, actions: Iterable[Action]) -> None:
        """Carry out registry actions. Synchronous: a spawn with the clone3
        spawner happens right here (it costs what an exec costs), so the
        acquire that asked for it is answered without waiting for another
        task; other spawns and every stop are started as tasks (they report
        back to the registry themselves); notifications are queued, parked
        acquires are woken."""
        queue = collections.deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Spawn):
                if self.uses_clone3:
                    queue.extend(self._spawn_now(action.instance_id))
                else:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._spawn, action.instance_id)
            elif isinstance(action, StopTree):
                assert self._nursery is not None
                self._nursery.start_soon(self._stop, action.instance_id, action.reason)
            elif isinstance(action, NotifyExited):
                self._notify_exited(action)
            elif isinstance(action, InstanceSettled):
                if not action.running and action.instance_id not in self.running:
                    self._forget_unspawned(action.instance_id)
                pending = self._pending.pop(action.instance_id, None)
                if pending is not None:
                    pending.settled.set()
        self._deadlines_may_have_changed()

    @property
    def uses_clone3(self) -> bool:
        """Whether roots are started by the clone3 spawner (daemon.spawner)."""
        return self.config.daemon.spawner == "auto" and not self._clone3_refused and clonespawn.load() is not None

    def _spawn_now(self, instance_id: str) -> list[Action]:
        """Start an instance's root with the clone3 spawner, on this thread, and
        register it. If clone3 is refused, subprocess takes over from now on,
        starting with this root, also right here: a spawn that `execute`
        begins with clone3 always settles inside it, which is what lets an
        acquire be answered without waiting. (That once, a fork, and in cgroup
        mode a join's RCU wait, cost the event loop a few ms.)"""
        try:
            return self._spawn_here(instance_id, clone3=True)
        except clonespawn.Unsupported as exc:
            self._clone3_refused = True
            log.warning("spawner.clone3_refused", error=exc.strerror, using="subprocess")
            return self._spawn_here(instance_id, clone3=False)

    def _spawn_here(self, instance_id: str, *, clone3: bool) -> list[Action]:
        """Start an instance's root on this thread and register it. Raises
        clonespawn.Unsupported (no child created) if clone3 is refused."""
        target = self._spawn_target(instance_id, clone3=clone3)
        if isinstance(target, list):
            return target
        adapter, spawn = target
        spawned_after = trio.current_time()
        try:
            root = spawn()
        except clonespawn.Unsupported:
            raise
        except (SpawnFailed, InvalidParams, OSError) as exc:
            return self._spawn_failed(instance_id, exc)
        return self._root_started(instance_id, adapter, root, spawned_after)

    async def _spawn(self, instance_id: str) -> None:
        """Start an instance's root with subprocess in a worker thread (a fork
        of the daemon, and in cgroup mode the join's RCU wait, take milliseconds
        the event loop should not spend), then report to the registry on the
        trio thread. Cancellation: the thread always runs to completion and its
        root is always registered, so it is never lost."""
        done = self._spawning[instance_id] = trio.Event()
        self.reaper.spawns_in_flight += 1
        try:
            self.execute(await self._spawn_in_thread(instance_id))
        finally:
            self.reaper.spawn_settled()
            del self._spawning[instance_id]
            done.set()

    async def _spawn_in_thread(self, instance_id: str) -> list[Action]:
        target = self._spawn_target(instance_id, clone3=False)
        if isinstance(target, list):
            return target
        adapter, spawn = target
        spawned_after = trio.current_time()
        try:
            root = await trio.to_thread.run_sync(spawn)
        except (SpawnFailed, InvalidParams, OSError) as exc:
            return self._spawn_failed(instance_id, exc)
        return self._root_started(instance_id, adapter, root, spawned_after)

    def _spawn_target(self, instance_id: str, *, clone3: bool) -> tuple[AdapterConfig, partial[RootProcess]] | list[Action]:
        """The instance's adapter and its spawn, ready to call; or the
        registry's answer to a spawn that cannot be tried. A spare cgroup's
        open directory goes to a clone3 spawn; subprocess joins by path, so
        the fd is closed here, on the trio thread."""
        instance = self.registry.instances[instance_id]
        adapter = self.config.adapters.get(instance.adapter)
        if adapter is None:
            # Removed by a reload while this instance waited for its predecessor.
            pending = self._pending.setdefault(instance_id, PendingSpawn())
            pending.error = UnknownAdapter(f"adapter {instance.adapter!r} is no longer configured")
            return self.registry.spawn_failed(instance_id)
        spawn = partial(
            _spawn_in_cgroup, self.cgroups, adapter, instance_id=instance_id, job=instance.job,
            params=dict(instance.params), daemon_key=self.daemon_key, base_env=self.environ,
            clone3=clone3, open_cgroup=self._claim_spare(instance_id) if clone3 else None,
            environment=self._environment(adapter) if clone3 else None,
        )
        if not clone3:
            self._close_spare(instance_id)
        return adapter, spawn

    def _environment(self, adapter: AdapterConfig) -> clonespawn.Environment:
        """The adapter's environment prepared for clone3 spawns."""
        prepared = self._environments.get(adapter.name)
        if prepared is None:
            prepared = self._environments[adapter.name] = adapter_environment(
                adapter, daemon_key=self.daemon_key, base=self.environ
            )
        return prepared

    def _spawn_failed(self, instance_id: str, exc: SpawnFailed | InvalidParams | OSError) -> list[Action]:
        instance = self.registry.instances[instance_id]
        if isinstance(exc, OSError):
            exc = SpawnFailed(f"could not prepare the cgroup of instance {instance_id}: {exc}")
        pending = self._pending.setdefault(instance_id, PendingSpawn())
        pending.error = exc if isinstance(exc, SpawnFailed) else SpawnFailed(exc.message)
        log.warning("adapter.spawn_failed", instance=instance_id, job=instance.job,
                    adapter=instance.adapter, error=pending.error.message)
        self.metrics.spawn_failures.labels(instance.adapter).inc()
        self._remove_cgroup(instance_id)
        return self.registry.spawn_failed(instance_id)

    def _root_started(
        self, instance_id: str, adapter: AdapterConfig, root: RootProcess, spawned_after: float
    ) -> list[Action]:
        """Register a root that was just spawned. Nothing here waits: the root is
        registered, and watched for by the reaper, before any other task can
        run. Its stderr reader and watcher tasks and its metric are left for
        after the reply (`afterreply.defer`); the log line and the state record
        for `_settle_spawn`, a turn later: a cold acquire's reply goes out first."""
        tree = InstanceTree(instance_id=instance_id, root=root.id, cgroup=self.cgroups, daemon_pid=self.pid)
        tree.known.add(root.id)
        running = RunningInstance(adapter=adapter, root=root, tree=tree)
        self.running[instance_id] = running
        self.reaper.watch_root(
            root.pid, lambda returncode: self._root_reaped(running, returncode), spawned_after=spawned_after
        )
        self._trees_changed()
        afterreply.defer(self._start_root_tasks, instance_id, running)
        return self.registry.spawned(instance_id, pid=root.pid, now=self.now())

    def _start_root_tasks(self, instance_id: str, running: RunningInstance) -> None:
        """The tasks of a root just registered (they get the object, not the id:
        the instance may be stopped and forgotten before they first run), and
        its metric. The stderr reader owns the pipe's read end, so this always
        runs, whatever became of the request."""
        assert self._nursery is not None
        self._nursery.start_soon(
            capture_stderr, running.root, partial(self._stderr_line, instance_id),
            partial(self._stderr_dropped, instance_id),
        )
        self._nursery.start_soon(self._settle_spawn, instance_id, running)
        self.metrics.spawns.labels(running.adapter.name).inc()

    async def _settle_spawn(self, instance_id: str, running: RunningInstance) -> None:
        instance = self.registry.instances.get(instance_id)
        log.info("adapter.spawned", instance=instance_id, job=instance.job if instance else None,
                 adapter=running.adapter.name, pid=running.root.pid)
        self.record.mark_dirty()
        await self._watch_root(instance_id, running)

    @staticmethod
    def _root_reaped(running: RunningInstance, returncode: int) -> None:
        running.returncode = returncode
        # Tell subprocess the child is gone, so it never waits for it itself.
        running.root.reaped(returncode)
        running.root_reaped.set()

    async def _watch_root(self, instance_id: str, running: RunningInstance) -> None:
        # A root that died before the SIGCHLD receiver ran is caught here too.
        self.reaper.reap()
        await running.root_reaped.wait()
        returncode = running.returncode if running.returncode is not None else -1
        log.info("adapter.root_exited", instance=instance_id, pid=running.root.pid, returncode=returncode)
        self.execute(self.registry.root_exited(instance_id, returncode=returncode, now=self.now()))

    @staticmethod
    def _stderr_line(instance_id: str, line: str) -> None:
        log.info("adapter.stderr", instance=instance_id, line=line)

    @staticmethod
    def _stderr_dropped(instance_id: str, lines: int) -> None:
        log.warning("adapter.stderr_dropped", instance=instance_id, lines=lines,
                    reason="over the stderr log budget; only the last lines are kept, for `logs`")

    async def _stop(self, instance_id: str, reason: Reason) -> None:
        running = self.running.get(instance_id)
        outcome = StopOutcome()
        if running is not None:
            adapter = running.adapter
            # Bounded and shielded: a stop that was begun is always finished,
            # even while the daemon shuts down.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(adapter.stop_timeout + STOP_MARGIN_S) as bound:
                    try:
                        outcome = await stop_tree(
                            running.tree,
                            stop_signal=int(adapter.stop_signal),
                            stop_timeout=adapter.stop_timeout,
                            reap=self.reaper.reap,
                            child_exited=self.reaper.child_exited,
                        )
                    except OSError as exc:
                        log.error("tree.stop_failed", instance=instance_id, error=str(exc))
                        outcome = self._kill_now(instance_id, running)
                    if not running.root_reaped.is_set():
                        with trio.move_on_after(1):
                            await running.root_reaped.wait()
                if bound.cancelled_caught:
                    # The stop overran its bound (a starved worker thread, a
                    # process stuck in the kernel): never forget a tree alive.
                    outcome = self._kill_now(instance_id, running)
            running.root.close_stdio()
            if not running.root_reaped.is_set():
                # The root outlived its stop (the report says so). subprocess must
                # never poll it on its own: the reaper still owns its status.
                running.root.reaped(-signal.SIGKILL)
            self._remove_cgroup(instance_id)
            self.finished_logs[instance_id] = running.root.stderr_tail
            while len(self.finished_logs) > FINISHED_LOGS_KEPT:
                self.finished_logs.popitem(last=False)
            del self.running[instance_id]
            running.stopped.set()
            self.record.mark_dirty()
            self._trees_changed()
            self.metrics.reaps.labels(adapter.name, reason.value).inc()
        log.info(
            "tree.reaped" if outcome.clean else "tree.reap_incomplete",
            instance=instance_id,
            reason=reason.value,
            signalled=len(outcome.signalled),
            killed=len(outcome.killed),
            survivors=[m.pid for m in outcome.survivors],
        )
        self.execute(self.registry.tree_gone(instance_id, now=self.now()))

    def _forget_unspawned(self, instance_id: str) -> None:
        """An instance that will never have a root (its spawn failed, or it was
        released or the daemon stopped while it waited for its predecessor):
        the spare cgroup it may have been named after goes too."""
        self._close_spare(instance_id)
        self._remove_cgroup(instance_id)

    def _claim_spare(self, instance_id: str) -> int | None:
        """The open directory of the spare cgroup `instance_id` is named after, if any."""
        return self.spares.claim(instance_id) if self.spares is not None else None

    def _close_spare(self, instance_id: str) -> None:
        fd = self._claim_spare(instance_id)
        if fd is not None:
            os.close(fd)

    def _remove_cgroup(self, instance_id: str) -> None:
        if self.cgroups is not None:
            try:
                self.cgroups.remove(instance_id)
            except OSError as exc:
                log.warning("cgroup.remove_failed", instance=instance_id, error=str(exc))

    def _notify_exited(self, action: NotifyExited) -> None:
        if action.reason is Reason.SHUTDOWN:
            # Every client was already sent `shutting_down`, which says it all.
            return
        params = {
            "instance": action.instance_id,
            "job": action.job,
            "adapter": action.adapter,
            "pid": action.pid,
            "returncode": action.returncode,
            "reason": action.reason.value,
        }
        for connection in action.connections:
            peer = self.peers.get(connection)
            if peer is not None:
                peer.notify("adapter_exited", params)

    # -- operations for the request handlers ---------------------------------

    def connected(self, peer: Peer) -> None:
        self.peers[peer.id] = peer

    def disconnected(self, peer: Peer) -> None:
        """Release every lease bound to the connection. Synchronous, so it is safe in `finally`."""
        self.peers.pop(peer.id, None)
        before = len(self.registry.leases)
        self.execute(self.registry.connection_closed(peer.id, now=self.now()))
        if len(self.registry.leases) < before:
            self.metrics.releases.labels("disconnect").inc(before - len(self.registry.leases))

    def pending_spawn(self, instance_id: str) -> PendingSpawn:
        """What acquires parked on a STARTING instance wait for."""
        return self._pending.setdefault(instance_id, PendingSpawn())

    async def check_memory_budget(self, adapter: str) -> None:
        """Raise LimitReached if the trees' total RSS is over `daemon.memory_budget`.
        Cancellation: may be cancelled while scanning; changes nothing."""
        budget = self.config.daemon.memory_budget
        if budget is None:
            return
        members = await self.tree_members()
        total = sum(sum(s.rss_bytes for s in stats) for stats in members.values())
        if total > budget:
            raise LimitReached(
                f"the adapter trees use {_mib(total)} of RSS, over the memory_budget of {_mib(budget)}; "
                f"no new instance of {adapter!r} starts until some are released"
            )

    async def tree_members(self) -> dict[str, list[process.ProcStat]]:
        """The members of every running tree, from a scan at most SCAN_CACHE_S
        old and newer than the last spawn or stop. One scan (in a worker thread)
        serves every caller that asks meanwhile, so a burst of `status` calls
        costs one scan, not one each. Cancellation: the scan goes on for the
        other callers."""
        while not self._scan_is_fresh():
            if self._scan_in_flight is None:
                self._scan_in_flight = trio.Event()
                assert self._nursery is not None
                self._nursery.start_soon(self._refresh_scan, self._scan_in_flight)
            await self._scan_in_flight.wait()
        return self._scan_cache

    def fresh_tree_members(self) -> dict[str, list[process.ProcStat]] | None:
        """What `tree_members` would return at once, or None if it would wait
        for a scan."""
        return self._scan_cache if self._scan_is_fresh() else None

    def _scan_is_fresh(self) -> bool:
        age = trio.current_time() - self._scanned_at
        return self._scanned_generation == self._generation and age <= SCAN_CACHE_S

    async def _refresh_scan(self, done: trio.Event) -> None:
        generation = self._generation
        try:
            ids = list(self.running)
            snapshots = {i: (self.running[i].tree, frozenset(self.running[i].tree.known)) for i in ids}
            members = await trio.to_thread.run_sync(scan_trees, snapshots)
            self._remember(members, snapshots)
            self._scan_cache = members
            self._scanned_at = trio.current_time()
            self._scanned_generation = generation
        finally:
            self._scan_in_flight = None
            done.set()

    def _trees_changed(self) -> None:
        """A tree was spawned or stopped: cached scans are out of date."""
        self._generation += 1

    def _remember(
        self,
        members: dict[str, list[process.ProcStat]],
        snapshots: dict[str, tuple[InstanceTree, frozenset[process.ProcessId]]],
    ) -> None:
        for instance_id, stats in members.items():
            running = self.running.get(instance_id)
            if running is not None:
                running.tree.remember(stats, snapshots[instance_id][1])
                running.rss_bytes = sum(s.rss_bytes for s in stats)

    # -- the sweep -------------------------------------------------------------

    async def sweep(
        self, kind: str, *, deep: bool = False, recorded: Iterable[process.ProcessId] = ()
    ) -> reports.SweepReport:
        """Find and reap orphans, enforce memory limits, settle state that
        disagrees with reality; report it all. One sweep at a time.
        Cancellation: shielded once reaping starts, so a report is always written."""
        async with self._sweep_lock:
            started_at = time.time()
            started = trio.current_time()
            errors: list[str] = []
            self.reaper.take_adopted()  # reaped on SIGCHLD already: not orphans
            self.reaper.reap()
            zombies = self.reaper.take_adopted()
            self._tick()
            # In cgroup mode a periodic sweep reads only the trees it must
            # measure (adapters with a memory_limit): orphans show up as
            # instance cgroups of no live instance, found by one listing.
            wanted = {
                i: r for i, r in self.running.items()
                if deep or self.cgroups is None or r.adapter.memory_limit is not None
            }
            snapshots = {i: (r.tree, frozenset(r.tree.known)) for i, r in wanted.items()}
            live = self._owned_cgroups()
            recorded = list(recorded)
            born_before = process.uptime_ticks()
            try:
                result = await trio.to_thread.run_sync(lambda: sweep.scan(
                    trees=snapshots, live=live, cgroups=self.cgroups, daemon_pid=self.pid,
                    daemon_key=self.daemon_key, deep=deep, recorded=recorded,
                ))
            except OSError as exc:
                log.error("sweep.scan_failed", error=str(exc))
                errors.append(f"scan failed: {exc}")
                result = sweep.ScanResult()
            with trio.CancelScope(shield=True):
                self._remember(result.members, snapshots)
                over_memory = self._enforce_memory_limits(result.members)
                if deep:
                    # Every sweep's reap() above already routes a root that
                    # exited unnoticed; this also catches one reaped elsewhere.
                    self._settle_vanished_roots()
                candidates = self._still_orphaned(result.candidates, born_before)
                orphans = await sweep.reap_candidates(
                    candidates,
                    our_pid=self.pid,
                    grace=self._orphan_grace(candidates),
                    reap=self.reaper.reap,
                    child_exited=self.reaper.child_exited,
                    kill_cgroup=self.cgroups.kill if self.cgroups is not None else None,
                )
                orphans += [sweep.zombie_orphan(pid, self.pid) for pid, _ in zombies]
                owned = self._owned_cgroups()
                for name in result.stale_cgroups:
                    if name not in owned:
                        self._remove_cgroup(name)
                errors += [f"pid {o.pid} survived SIGKILL" for o in orphans if o.result == "failed"]
                expired, self._expired_unreported = self._expired_unreported, []
                report = reports.SweepReport(
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
                )
                await self._file_report(report)
            return report

    def _owned_cgroups(self) -> frozenset[str]:
        """Instance cgroups that are not stale: of a tree not yet gone, of an
        instance in the registry (one being spawned has no tree yet), or spare."""
        spares = self.spares.names() if self.spares is not None else frozenset()
        return frozenset(self.running).union(self.registry.instances, spares)

    def _new_instance_id(self) -> str:
        """For the registry: a spare cgroup's name when one is ready (its root
        spawns faster), else a fresh id."""
        spare = self.spares.take() if self.spares is not None else None
        return spare if spare is not None else new_instance_id()

    def _still_orphaned(self, candidates: list[sweep.Candidate], born_before: int) -> list[sweep.Candidate]:
        """Drop candidates that became accounted for while the scan ran in its
        thread: members of instances spawned meanwhile, of any instance the
        registry still knows (a subprocess spawn may still be in its worker
        thread, its root not yet registered), and anything born after the
        snapshot (judged by the next sweep, never killed on a stale view)."""
        known = set().union(*(r.tree.known for r in self.running.values()))
        return [
            c for c in candidates
            if c.instance not in self.running
            and c.instance not in self.registry.instances
            and c.stat.process_id not in known
            and c.stat.start_time < born_before
        ]

    def _enforce_memory_limits(self, measured: Iterable[str]) -> list[str]:
        """Terminate the measured instances whose tree is over its memory_limit."""
        over = []
        for instance_id in measured:
            running = self.running.get(instance_id)
            if running is None:
                continue
            limit = running.adapter.memory_limit
            if limit is None or running.rss_bytes <= limit:
                continue
            instance = self.registry.instances.get(instance_id)
            if instance is None or instance.state not in (State.RUNNING, State.LINGERING):
                continue
            over.append(instance_id)
            log.warning("adapter.over_memory", instance=instance_id, rss_bytes=running.rss_bytes, memory_limit=limit)
            self.execute(self.registry.terminate(instance_id, reason=Reason.MEMORY_LIMIT))
        return over

    def _settle_vanished_roots(self) -> None:
        """State that disagrees with reality: a root that has exited although its
        watcher never heard of it. The reaper normally sees every root's exit;
        this double check (one WNOWAIT peek per root) runs in deep sweeps."""
        for instance_id, running in list(self.running.items()):
            if running.root_reaped.is_set() or not subreaper.child_has_exited(running.root.pid):
                continue
            self.reaper.reap()
            if not running.root_reaped.is_set():
                log.warning("adapter.root_vanished", instance=instance_id, pid=running.root.pid)
                self._root_reaped(running, -1)

    def _orphan_grace(self, candidates: list[sweep.Candidate]) -> float:
        timeouts = [
            self.config.adapters[c.adapter].stop_timeout
            for c in candidates
            if c.adapter in self.config.adapters
        ]
        return min([ORPHAN_GRACE_S, *timeouts])

    async def _file_report(self, report: reports.SweepReport) -> None:
        self.reports.remember(report)
        log.info("sweep.report", **reports.to_builtins(report))
        self.metrics.sweep_duration.labels(report.kind).observe(report.duration_ms / 1000)
        for orphan in report.orphans:
            self.metrics.orphans.labels(orphan.action).inc()
        await write_bounded("sweep.report_not_saved", self.reports.append_to_file, report)
        textfile = self.config.daemon.metrics_textfile
        if textfile is not None:
            await write_bounded("metrics.textfile_failed", metrics.write_textfile, textfile, self.metrics.exposition())

    def _live_state(self) -> metrics.LiveState:
        instances: collections.Counter[str] = collections.Counter()
        leases: collections.Counter[str] = collections.Counter()
        rss: collections.Counter[str] = collections.Counter()
        for instance in self.registry.instances.values():
            if not instance.tree_gone:
                instances[instance.adapter] += 1
            leases[instance.adapter] += instance.refcount
        for running in self.running.values():
            rss[running.adapter.name] += running.rss_bytes
        return metrics.LiveState(instances=instances, leases=leases, rss_bytes=rss)

    # -- reload and shutdown ---------------------------------------------------

    def reload(self, config: Config) -> None:
        """Adopt a new config: changed adapters apply to new instances only."""
        self.config = config
        self._environments.clear()

    def _kill_now(self, instance_id: str, running: RunningInstance) -> StopOutcome:
        """SIGKILL a tree at once, synchronously; the members still there are survivors."""
        if self.cgroups is not None:
            try:
                self.cgroups.kill(instance_id)
            except OSError as exc:
                log.error("cgroup.kill_failed", instance=instance_id, error=str(exc))
        members = {running.root.id, *running.tree.known}
        killed = [m for m in members if signal_member(m, signal.SIGKILL)]
        return StopOutcome(killed=killed, survivors=[m for m in members if not _surely_gone(m, self.pid)])

    def kill_everything_now(self) -> None:
        """Last resort when the daemon is dying of a bug: SIGKILL every tracked
        tree at once, synchronously, so that no adapter outlives its owner."""
        for instance_id, running in self.running.items():
            self._kill_now(instance_id, running)

    async def shutdown(self) -> None:
        """Stop every tree (SPEC rule 2 each) and wait for them, bounded by the
        largest stop_timeout plus a margin. Cancellation: shielded; returns when done."""
        self.shutting_down = True
        for peer in list(self.peers.values()):
            peer.notify("shutting_down", {})
        self.execute(self.registry.shutdown())
        timeouts = [a.stop_timeout for a in self.config.adapters.values()] or [0.0]
        with trio.CancelScope(shield=True):
            with trio.move_on_after(max(timeouts) + STOP_MARGIN_S + 1):
                # A root still being spawned is ended by the registry when it
                # reports in; wait for that, then for every stop.
                for spawning in list(self._spawning.values()):
                    await spawning.wait()
                for running in list(self.running.values()):
                    await running.stopped.wait()
            await self.record.write_now()
        if self.spares is not None:
            self.spares.close()
        if self.cgroups is not None and not self.running:
            self.cgroups.remove_base()
        log.info("daemon.trees_stopped", left=len(self.running))


def _spawn_in_cgroup(
    cgroups: CgroupManager | None,
    adapter: AdapterConfig,
    *,
    instance_id: str,
    clone3: bool,
    open_cgroup: int | None = None,
    **spawn: object,
) -> RootProcess:
    """Blocking: create the instance's cgroup (if any) and spawn the root into
    it. `open_cgroup` is the cgroup's directory already open (a spare's), which
    this closes in any case (only clone3 takes one). Touches no daemon state,
    so it may run in a worker thread. Raises SpawnFailed, InvalidParams, clonespawn.Unsupported, or
    OSError for the cgroup."""
    cgroup_fd = open_cgroup
    try:
        if cgroups is not None and clone3:
            if cgroup_fd is None:
                cgroup_fd = cgroups.open_dir(instance_id)
        elif cgroups is not None:
            cgroups.create(instance_id)
            cgroup_fd = cgroups.join_fd(instance_id)
        return spawn_root(adapter, instance_id=instance_id, cgroup_fd=cgroup_fd, clone3=clone3, **spawn)  # type: ignore[arg-type]
    finally:
        if cgroup_fd is not None:
            os.close(cgroup_fd)


def _surely_gone(member: process.ProcessId, our_pid: int) -> bool:
    """`process.is_gone`, where a process that cannot be looked at (EMFILE) counts
    as still there: a sweep will look again."""
    try:
        return process.is_gone(member, our_pid=our_pid)
    except OSError:
        return False


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"
