"""The engine: the one facade the server calls.

Each operation (`acquire`, `release`, `renew`, `release_job`, `disconnected`,
`status`, `logs`, `sweep`, ...) asks the registry what must happen and carries
out the resulting actions itself (`execute`). An operation's answer is a
`Reply`: the JSON-ready result, any file descriptors that ride with it, and
the work that must wait until the reply is sent (`after`), which the caller
runs once it has tried to send.

Operations that never wait are plain methods. Those that may (`acquire`, for
a spawn or a predecessor's stop; `status`, for a tree scan; `sweep`) are
coroutines, with a plain `..._now` twin where the answer can often be given at
once and a predicate that says when it can.

The lease operations are `leaseops.py` (a base class of `Engine`); `Peer`
and `Reply` are `operation.py`.

Everything here runs on the trio thread. Blocking scans go to worker threads
with immutable snapshots and only return data.
"""

from __future__ import annotations

import collections
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec
import structlog
import trio

from supervisor import __version__
from supervisor.core import protocol
from supervisor.core.config import Config
from supervisor.core.errors import InvalidParams, PermissionDenied, UnknownLease, UpgradeFailed
from supervisor.core.registry import (
    LIVE_STATES,
    ROOT_UID,
    Action,
    Instance,
    InstanceSettled,
    NotifyExited,
    Reason,
    Registry,
    Spawn,
    StopTree,
    new_instance_id,
)
from supervisor.engine import continuity, handoff, leaseops, metrics, reports, staterecord
from supervisor.engine.handoff import EngineState
from supervisor.engine.instances import AfterReply, Instances
from supervisor.engine.leaseops import LeaseOperations
from supervisor.engine.limitwatch import LimitWatch
from supervisor.engine.operation import Peer, Reply
from supervisor.engine.scans import ScanCache
from supervisor.engine.stalls import StallWatch
from supervisor.engine.statusrows import ROWS_PER_TURN, StatusRows
from supervisor.engine.sweep import Sweeper
from supervisor.engine.stdiostore import StdioStore
from supervisor.procs.cgroup import CgroupManager
from supervisor.procs.sparecgroups import SpareCgroups
from supervisor.procs.proctable import TableScanner
from supervisor.procs.spawner import choose_spawner
from supervisor.procs.stderr import decode_tail
from supervisor.procs.stderrfile import StderrFiles
from supervisor.procs.subreaper import ChildReaper

log = structlog.get_logger()

SERVER_NAME = "adapter-supervisor"

# The directory under state_dir of the adapters' stderr files.
STDERR_DIR = "stderr"

# A shutdown waits for the slowest adapter's stop_timeout plus this.
SHUTDOWN_MARGIN_S = 6.0

# How long a shutdown waits for the roots it killed because they had not
# exec'd within its bound (`Instances.kill_awaiting_exec`).
KILLED_SETTLE_S = 1.0


class Engine(LeaseOperations):
    """Leases, instances and process trees of one daemon."""

    def __init__(
        self,
        config: Config,
        *,
        cgroups: CgroupManager | None = None,
        handed: EngineState | None = None,
        stdio: StdioStore | None = None,
    ) -> None:
        """`handed`: the state the previous image of this process handed over
        in an in-place upgrade (then `run` takes it back instead of adopting
        and sweeping). `stdio`: where the roots' stdin/stdout pipes are kept
        through a crash (systemd's store), with those it passed back. Raises
        ValueError if `handed` is inconsistent."""
        self.config = config
        self.cgroups = cgroups
        self._handed = handed
        self.run_id = handed.run_id if handed is not None else secrets.token_hex(8)
        self.pid = os.getpid()
        self.started_at = handed.started_at if handed is not None else time.time()
        self.state_dir = config.daemon.state_dir
        self.daemon_key = staterecord.daemon_key(self.state_dir)
        # The secret tag the adapters carry (proof of ownership in sweeps).
        self.daemon_tag = staterecord.daemon_tag(self.state_dir)
        self.shutting_down = False
        # This incarnation's number on the state_dir (set by `run`).
        self.generation = 0
        # Set by whoever can re-execute the daemon in place: called with the
        # requesting connection's id and request id; returns only if the
        # upgrade did not happen, with the reason.
        self.upgrade_hook: Callable[[int | None, int | str | None], Awaitable[str]] | None = None
        self.peers: dict[int, Peer] = {}
        # The engine's nursery while it runs (`run`).
        self._nursery: trio.Nursery | None = None
        self.letting_go = 0
        # Times every task step of the trio run `run` is in (installed there).
        self.stalls = StallWatch()
        self.metrics = metrics.Metrics(self._live_state, self.stalls)
        self.spares = SpareCgroups(cgroups, new_instance_id) if cgroups is not None else None
        if handed is not None:
            self.registry = handoff.restore_registry(handed, new_instance_id=self._new_instance_id)
        else:
            self.registry = Registry(new_instance_id=self._new_instance_id)
        self.reaper = ChildReaper()
        self.reports = reports.ReportStore(self.state_dir, max_file_bytes=config.daemon.reports_max_bytes)
        self._record_snapshots = continuity.RecordSnapshots(self.registry, lambda: self.instances)
        self.record = staterecord.RecordKeeper(self.state_dir, self._record_snapshot)
        # Every root's environment starts from this copy of the daemon's,
        # taken once rather than per spawn.
        self._environ = dict(os.environ)
        self.stderr_files = StderrFiles(os.path.join(self.state_dir, STDERR_DIR))
        # Process-table mode: one table of the host's processes, refreshed
        # for every tree and sweep that needs it.
        self.table = TableScanner(self.pid, lambda: self.instances.anchors()) if cgroups is None else None
        self.instances = Instances(
            registry=self.registry,
            adapters=config.adapters,
            spawner=self._choose_spawner(config),
            cgroups=cgroups,
            spares=self.spares,
            reaper=self.reaper,
            stderr_files=self.stderr_files,
            record=self.record,
            metrics=self.metrics,
            now=self.now,
            report=self.execute,
            stdio=stdio,
            table=self.table,
        )
        self.scans = ScanCache(self.instances)
        self.status_rows = StatusRows(self.registry, self._holder_pid)
        self.sweeper = Sweeper(
            config=config, registry=self.registry, instances=self.instances, reaper=self.reaper,
            cgroups=cgroups, spares=self.spares, store=self.reports, metrics=self.metrics,
            daemon_key=self.daemon_tag, tick=self._tick, execute=self.execute, table=self.table,
        )
        self.limits = LimitWatch(
            config=lambda: self.config, registry=self.registry, instances=self.instances, cgroups=cgroups,
            execute=self.execute, stopped_over_memory=self.sweeper.over_memory_stopped,
        )
        self._deadline_changed = trio.Event()
        self._clock_offset = 0.0

    def now(self) -> float:
        """Wall-clock seconds, advanced by trio's clock (so MockClock drives it in tests)."""
        return trio.current_time() + self._clock_offset

    @property
    def spawner_name(self) -> str:
        """The spawner roots are started with now: "clone3" or "subprocess"."""
        return self.instances.spawner.name

    @property
    def helper_processes(self) -> set[int]:
        """Pids of the daemon's own children that are no adapter's, kept
        here by whoever starts and waits for one while it runs: the reaper
        leaves their status to that waiter, and sweeps never take them for
        orphans."""
        return self.reaper.others

    def _choose_spawner(self, config: Config) -> Any:
        return choose_spawner(config.daemon.spawner, self.cgroups, daemon_key=self.daemon_tag, base_env=self._environ)

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Count this incarnation, adopt the trees a previous one left running
        that it can prove are its own, reap the rest (a `startup` sweep), then
        serve until cancelled. Owns every process task; call `shutdown`
        before cancelling, or trees are left for the next start."""
        self._clock_offset = time.time() - trio.current_time()
        self.stalls.install()
        try:
            await self._run(task_status)
        finally:
            # Closed to new tasks: a connection that closes from now on has
            # its leases let go at once (`disconnected`).
            self._nursery = None
            self.stalls.uninstall()
            if self.shutting_down:
                # Stops that outlasted the shutdown's bound (thousands of
                # trees) have finished now: the base may be empty at last.
                self._remove_base()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        for report in await trio.to_thread.run_sync(self.reports.read_history):
            self.reports.remember(report)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.instances.attach(nursery)
            self.scans.attach(nursery)
            if self.table is not None:
                self.table.attach(nursery)
            if self._handed is not None:
                # Before the reaper's first reap: a root that exited during the
                # exec is waitable now, and must reach its watcher.
                self._take_back(self._handed)
            await nursery.start(self.reaper.run)
            await trio.to_thread.run_sync(self.stderr_files.prepare)
            self.generation = await trio.to_thread.run_sync(staterecord.next_generation, self.state_dir)
            if self._handed is None:
                previous = await trio.to_thread.run_sync(staterecord.read_record, self.state_dir)
                adopted = self._adopt(previous)
                self.instances.stdio.close_untaken()
                await self.sweeper.sweep(
                    "startup", deep=True, recorded=staterecord.recorded_processes(previous), adopted=adopted
                )
            # Before any spare is made: a file not followed now is a leftover.
            for leftover in self.stderr_files.leftovers():
                self.stderr_files.remove_leftover(leftover)
            await nursery.start(self.stderr_files.run)
            self.record.mark_dirty()
            if self.spares is not None:
                nursery.start_soon(self.spares.run)
            nursery.start_soon(self._expire_deadlines)
            nursery.start_soon(self.sweeper.run_periodically)
            nursery.start_soon(self.limits.run)
            nursery.start_soon(self.record.run)
            task_status.started()

    def _take_back(self, handed: EngineState) -> None:
        """Rebuild what the previous image handed over (see `continuity.take_back`)."""
        continuity.take_back(handed, adapters=self.config.adapters, registry=self.registry, instances=self.instances)
        self.instances.restore_finished_logs(handed.finished_logs)
        self.metrics.add_counters([(c.name, c.labels, c.value) for c in handed.counters])
        self._deadlines_may_have_changed()
        self.record.mark_dirty()
        log.info("daemon.upgraded", instances=len(self.registry.instances), leases=len(self.registry.leases),
                 trees=len(handed.trees))

    def busy(self) -> str | None:
        """Why the engine's state cannot be handed over at this moment (a
        spawn in a worker thread, a sweep or scan under way), or None."""
        if self.sweeper.busy:
            return "a sweep is under way"
        if self.letting_go:
            return "a closed connection's leases are being let go"
        return self.instances.busy()

    def export_state(self) -> tuple[EngineState, list[int]]:
        """Everything the next image needs, and the fds it must keep open.
        Call only when not `busy`, on the trio thread, with no checkpoint
        between this and the exec."""
        if self.spares is not None:
            self.spares.drain()  # the next image makes its own
        instances, leases = handoff.export_registry(self.registry)
        trees, fds = self.instances.export_trees()
        counters = [handoff.HandedCounter(name, labels, value) for name, labels, value in self.metrics.counters()]
        state = EngineState(
            run_id=self.run_id, started_at=self.started_at, registry_closed=self.registry.closed,
            instances=instances, leases=leases, trees=trees, counters=counters,
            finished_logs=self.instances.export_finished_logs(),
            mode=handoff.HandedMode(str(self.cgroups.base) if self.cgroups is not None else None),
        )
        return state, fds

    def _adopt(self, previous: staterecord.StateRecord | None) -> list[str]:
        adopted = continuity.adopt_recorded(
            previous, adapters=self.config.adapters, registry=self.registry, instances=self.instances,
            stderr_files=self.stderr_files, daemon_key=self.daemon_tag, now=self.now(),
            resume_grace=self.config.daemon.resume_grace, execute=self.execute,
        )
        if adopted:
            self.record.mark_dirty()
        return adopted

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
        for token in ticked.unresumed_leases:
            log.info("lease.not_resumed", lease=token[:8], reason="its holder did not resume it within resume_grace")
        if ticked.expired_leases:
            self.metrics.releases.inc("expired", amount=len(ticked.expired_leases))
            self.sweeper.leases_expired(ticked.expired_leases)
        if ticked.unresumed_leases:
            self.metrics.releases.inc("not_resumed", amount=len(ticked.unresumed_leases))
        if ticked.expired_leases or ticked.unresumed_leases:
            self.record.mark_dirty()
        self.execute(ticked.actions)

    def _deadlines_may_have_changed(self) -> None:
        self._deadline_changed.set()
        self._deadline_changed = trio.Event()

    def execute(self, actions: Iterable[Action], after: AfterReply | None = None) -> None:
        """Carry out registry actions, in order. An inline spawn (clone3)
        happens right here and its consequences are carried out too, so an
        acquire that asked for it is answered without waiting for another
        task; work it leaves for after the reply goes to `after` (run at once
        if None). Other spawns and every stop are started as tasks, which
        report back themselves; notifications are queued; parked acquires are
        woken. Raises nothing for any action the registry can produce."""
        queue = collections.deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Spawn):
                queue.extend(self.instances.spawn(action.instance_id, after))
            elif isinstance(action, StopTree):
                self.instances.stop(action.instance_id, action.reason)
            elif isinstance(action, NotifyExited):
                self._notify_exited(action)
            elif isinstance(action, InstanceSettled):
                self.instances.settled(action.instance_id, running=action.running)
        self._deadlines_may_have_changed()
        self.limits.wake()

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

    def _new_instance_id(self) -> str:
        """For the registry: a spare cgroup's name when one is ready (its root
        spawns faster), else a fresh id."""
        spare = self.spares.take() if self.spares is not None else None
        return spare if spare is not None else new_instance_id()

    def _record_snapshot(self) -> Awaitable[staterecord.EncodedRecord]:
        return self._record_snapshots.snapshot(
            daemon_pid=self.pid, daemon_key=self.daemon_key, generation=self.generation
        )

    def _live_state(self) -> metrics.LiveState:
        """The gauges, from counts kept as things change (O(adapters), not O(instances))."""
        return metrics.LiveState(
            instances=collections.Counter(self.registry.instances_by_adapter()),
            leases=collections.Counter(self.registry.leases_by_adapter()),
            rss_bytes=collections.Counter(self.instances.rss_by_adapter),
        )

    # -- connections ---------------------------------------------------------------

    def connected(self, peer: Peer) -> None:
        """A client connected: it may now hold leases and get notifications."""
        self.peers[peer.id] = peer

    def disconnected(self, peer: Peer) -> None:
        """Release every lease bound to the connection; its detached leases
        live on without an owner. Synchronous, so it is safe in `finally`;
        raises nothing. Up to RELEASES_PER_TURN leases are let go at once,
        more over turns by a task of their own (`let_go_in_turns`)."""
        self.peers.pop(peer.id, None)
        leases = self.registry.connection_gone(peer.id)
        if len(leases) > leaseops.RELEASES_PER_TURN and self._nursery is not None:
            self.letting_go += 1
            self._nursery.start_soon(self.let_go_in_turns, peer.id, leases)
            return
        before = len(self.registry.leases)
        now = self.now()
        for lease in leases:
            self.execute(self.registry.let_go(lease, peer.id, now=now))
        self._let_go(before)

    # -- the operations ------------------------------------------------------------

    def hello(self, peer: Peer, params: protocol.HelloParams) -> Reply:
        """Who answers: server, version, protocol, pid, this run's id."""
        return Reply({
            "server": SERVER_NAME,
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "pid": self.pid,
            "instance_id": self.run_id,
            "generation": self.generation,
        })

    async def upgrade(self, peer: Peer, params: protocol.UpgradeParams, request_id: int | str) -> Reply:
        """Replace the daemon's code in place (same pid, everything kept); the next image
        answers the request. Returns only if that did not happen: raises
        PermissionDenied (only root and the daemon's own uid may upgrade it)
        or UpgradeFailed with the reason. Cancellation: as the hook's."""
        if peer.uid not in (0, os.geteuid()):
            raise PermissionDenied(f"uid {peer.uid} may not upgrade the daemon; only root and its own uid may")
        if self.upgrade_hook is None:
            raise UpgradeFailed("this daemon cannot re-execute itself (it was not started by `serve`)")
        if self.shutting_down:
            raise UpgradeFailed("the daemon is shutting down")
        reason = await self.upgrade_hook(peer.id, request_id)
        raise UpgradeFailed(f"the daemon was not upgraded and serves on: {reason}")

    def status_answers_now(self, params: protocol.StatusParams) -> bool:
        """Whether `status_now` can answer: the tree scan it shows is fresh,
        and there are few enough instances to show in one turn."""
        return self.scans.fresh() is not None and len(self.registry.instances) <= ROWS_PER_TURN

    def status_now(self, peer: Peer, params: protocol.StatusParams) -> Reply:
        """The status answer, from the latest scan: call it only in the turn
        in which `status_answers_now()` said yes (else `status` waits for a
        fresh scan)."""
        members = self.scans.latest()
        wanted = _status_filter(params)
        instances = self.registry.instances.values()
        rows, total_rss = self.status_rows.rows(
            instances if wanted is None else filter(wanted, instances), members, peer.uid
        )
        return self._status_reply(rows, total_rss)

    async def status(self, peer: Peer, params: protocol.StatusParams) -> Reply:
        """The status answer, after a fresh scan of the trees if need be; the
        rows of many instances are made over several turns, as of one moment
        (`StatusRows.rows_in_turns`). Cancellation: raises Cancelled; the scan
        goes on for other callers."""
        members = await self.scans.members()
        rows, total_rss = await self.status_rows.rows_in_turns(_status_filter(params), members, peer.uid)
        return self._status_reply(rows, total_rss)

    def _status_reply(self, rows: list[msgspec.Raw], total_rss: int) -> Reply:
        daemon = self.config.daemon
        return Reply({
            "daemon": {
                "pid": self.pid,
                "version": __version__,
                "instance_id": self.run_id,
                "generation": self.generation,
                "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 3),
                "instances": len(self.registry.instances),
                "leases": len(self.registry.leases),
                "connections": len(self.peers),
                "cgroup_mode": self.cgroups is not None,
                "cgroup_base": None if self.cgroups is None else str(self.cgroups.base),
                "spawner": self.spawner_name,
                "shutting_down": self.shutting_down,
                "rss_bytes": total_rss,
                "memory_budget": daemon.memory_budget,
                "sweep_interval": daemon.sweep_interval,
            },
            "instances": rows,
        })

    def _holder_pid(self, connection: int) -> int | None:
        """The pid of the process behind a connection, if it is still connected."""
        holder = self.peers.get(connection)
        return holder.pid if holder is not None else None

    def status_line(self) -> str:
        """One line for systemd's STATUS=: live instances and leases."""
        return f"live instances: {self.registry.count_live()}, leases: {len(self.registry.leases)}"

    def logs(self, peer: Peer, params: protocol.LogsParams) -> Reply:
        """The tail of an instance's stderr, by instance or lease: to the uid
        that spawned it and root. Raises UnknownLease, InvalidParams (no such
        instance, running or lately), PermissionDenied."""
        instance_id = params.instance
        if params.lease is not None:
            lease = self.registry.lease(params.lease)
            if lease is None:
                raise UnknownLease("no such lease: it was never issued, was already released, or expired")
            instance_id = lease.instance_id
        assert instance_id is not None
        live = self.registry.instances.get(instance_id)
        owner = live.uid if live is not None else self.instances.finished_owners.get(instance_id)
        if owner is not None and peer.uid not in (ROOT_UID, owner):
            raise PermissionDenied(f"instance {instance_id} belongs to uid {owner}; only that uid or root may read its logs")
        tail = self.instances.stderr_tail(instance_id)
        if tail is None:
            if instance_id in self.registry.instances:
                return Reply({"lines": []})  # not spawned yet
            raise InvalidParams(f"no instance {instance_id!r} is running or finished recently")
        return Reply({"lines": decode_tail(tail, params.lines)})

    async def sweep(self, peer: Peer, params: protocol.SweepParams) -> Reply:
        """Run a manual sweep now (after any sweep under way) and answer its
        report. Cancellation: see `Sweeper.sweep`."""
        report = await self.sweeper.sweep("manual", deep=params.deep)
        return Reply(reports.to_builtins(report))

    def recent_reports(self, peer: Peer, params: protocol.ReportsParams) -> Reply:
        """The latest sweep reports, newest first."""
        return Reply({"reports": [reports.to_builtins(r) for r in self.reports.latest(params.limit)]})

    def metrics_text(self, peer: Peer, params: protocol.MetricsParams) -> Reply:
        """Every metric in the Prometheus text format."""
        return Reply({"text": self.metrics.exposition()})

    def adapters(self, peer: Peer, params: protocol.AdaptersParams) -> Reply:
        """The configured adapters, by name, each with its number of live
        instances (starting, running or lingering)."""
        live = collections.Counter(
            [instance.adapter for instance in self.registry.instances.values() if instance.state in LIVE_STATES]
        )
        return Reply({"adapters": [
            {
                "name": adapter.name,
                "command": list(adapter.command),
                "params": list(adapter.params),
                "stdio": adapter.stdio,
                # As configured: a name, a uid, "@peer", or null (the daemon's own).
                "user": adapter.user,
                "max_instances": adapter.max_instances,
                "memory_limit": adapter.memory_limit,
                "live": live[adapter.name],
            }
            for adapter in sorted(self.config.adapters.values(), key=lambda adapter: adapter.name)
        ]})

    def count_error(self, code: int) -> None:
        """A request was answered with this error code (for the metrics)."""
        self.metrics.protocol_errors.inc(str(code))

    # -- reload and shutdown -------------------------------------------------------

    def reload(self, config: Config) -> None:
        """Adopt a new config: changed adapters apply to new instances only."""
        spawner_changed = config.daemon.spawner != self.config.daemon.spawner
        self.config = config
        self.sweeper.config = config
        self.instances.adapters = config.adapters
        if spawner_changed:
            self.instances.spawner = self._choose_spawner(config)
        else:
            self.instances.spawner.forget_environments()
        self.limits.reloaded()

    def kill_everything_now(self) -> None:
        """Last resort when the daemon is dying of a bug: SIGKILL every tracked
        tree at once, synchronously, so that no adapter outlives its owner."""
        self.instances.kill_everything_now()

    async def shutdown(self) -> None:
        """Tell every client, stop every tree (as a release would) and wait for
        them, bounded by the largest stop_timeout plus a margin.
        Cancellation: shielded; returns when done."""
        self.shutting_down = True
        for peer in list(self.peers.values()):
            peer.notify("shutting_down", {})
        self.execute(self.registry.shutdown())
        timeouts = [a.stop_timeout for a in self.config.adapters.values()] or [0.0]
        with trio.CancelScope(shield=True):
            with trio.move_on_after(max(timeouts) + SHUTDOWN_MARGIN_S):
                # A root still being spawned is ended by the registry when it
                # reports in; wait for that, then for every stop.
                await self.instances.wait_all_stopped()
            if self.instances.kill_awaiting_exec():
                # Roots that never exec'd in all that time (a frozen cgroup, a
                # stopped child): killed, they settle and stop at once (one in
                # an uninterruptible sleep, on a hung file system, only when
                # that ends, and the engine's run waits for it).
                with trio.move_on_after(KILLED_SETTLE_S):
                    await self.instances.wait_all_stopped()
            await self.record.write_now()
        if self.spares is not None:
            self.spares.close()
        self.stderr_files.close()
        self._remove_base()
        log.info("daemon.trees_stopped", left=len(self.instances.running))

    def _remove_base(self) -> None:
        """Remove the daemon's base cgroup once no tree is left in it."""
        if self.cgroups is None or self.instances.running:
            return
        try:
            self.cgroups.remove_base()
        except OSError as exc:
            log.warning("cgroup.remove_failed", cgroup=str(self.cgroups.base), error=str(exc))


def _status_filter(params: protocol.StatusParams) -> Callable[[Instance], bool] | None:
    """Which instances a `status` shows: those matching every filter given
    (job, adapter, state, uid); None when none is given."""
    job, adapter, state, uid = params.job, params.adapter, params.state, params.uid
    if job is None and adapter is None and state is None and uid is None:
        return None
    return lambda i: (
        (job is None or i.job == job) and (adapter is None or i.adapter == adapter)
        and (state is None or i.state.value == state) and (uid is None or i.uid == uid)
    )
