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

Everything here runs on the trio thread. Blocking scans go to worker threads
with immutable snapshots and only return data.
"""

from __future__ import annotations

import collections
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import msgspec
import structlog
import trio

from supervisor import __version__
from supervisor.core import protocol
from supervisor.core.config import AdapterConfig, Config
from supervisor.core.errors import (
    Conflict,
    InvalidParams,
    LimitReached,
    PermissionDenied,
    UnknownAdapter,
    UnknownLease,
    UpgradeFailed,
)
from supervisor.core.registry import (
    LIVE_STATES,
    ROOT_UID,
    Acquired,
    Action,
    Instance,
    InstanceSettled,
    NotifyExited,
    Reason,
    Registry,
    Spawn,
    State,
    StopTree,
    new_instance_id,
)
from supervisor.engine import continuity, handoff, metrics, reports, staterecord
from supervisor.engine.handoff import EngineState
from supervisor.engine.instances import AfterReply, Instances, PendingSpawn, run_after
from supervisor.engine.limitwatch import LimitWatch
from supervisor.engine.scans import ScanCache
from supervisor.engine.stalls import STEP_BUDGET_S, StallWatch
from supervisor.engine.statusrows import ROWS_PER_TURN, StatusRows, encode_rows
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

# A release_job of at most this many leases is answered in one turn (in the
# hub); a larger one over turns of STEP_BUDGET_S. The registry releases a
# lease in a few microseconds: 250 stay well under the 5 ms a request may
# hold the trio thread.
RELEASES_PER_TURN = 250


class Peer(Protocol):
    """What the engine needs of a client connection."""

    id: int
    # The peer's process, user and group, from SO_PEERCRED when it connected.
    pid: int
    uid: int
    gid: int

    def notify(self, method: str, params: object) -> None: ...


class Reply(msgspec.Struct):
    """An operation's answer. `fds` ride on the reply's line (SCM_RIGHTS) and
    belong to the reply: whoever sends it closes them once sent (or not).
    `after` is work for once the reply has been handed to the socket (or has
    failed to be); it changes nothing the reply says."""

    result: Any
    fds: tuple[int, ...] = ()
    # () unless the operation left work: then a list of its own.
    after: AfterReply | tuple[()] = ()


class Engine:
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
            self.stalls.uninstall()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        for report in await trio.to_thread.run_sync(self.reports.read_history):
            self.reports.remember(report)
        async with trio.open_nursery() as nursery:
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

    def _record_snapshot(self) -> Awaitable[staterecord.StateRecord]:
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
        """Release every lease bound to the connection. Synchronous, so it is
        safe in `finally`; raises nothing."""
        self.peers.pop(peer.id, None)
        before = len(self.registry.leases)
        self.execute(self.registry.connection_closed(peer.id, now=self.now()))
        if len(self.registry.leases) < before:
            self.metrics.releases.inc("disconnect", amount=before - len(self.registry.leases))
            self.record.mark_dirty()

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

    def acquire_answers_now(self, params: protocol.AcquireParams) -> bool:
        """Whether `acquire_now` can answer: the instance is running, or the
        inline spawner starts it with no predecessor still stopping and no
        memory budget to measure first."""
        if self.registry.acquire_waits(params.job, params.adapter):
            return False
        if self.registry.live_instance(params.job, params.adapter) is not None:
            return True
        return self.instances.spawner.inline and self.config.daemon.memory_budget is None

    def acquire_now(self, peer: Peer, params: protocol.AcquireParams) -> Reply:
        """An acquire that `acquire_answers_now`. Raises SupervisorError for
        the client's mistakes (having changed nothing)."""
        adapter = self._checked_adapter(peer, params)
        after: AfterReply = []
        acquired, refcount, pending = self._commit_acquire(peer, params, adapter, after)
        if pending is not None and not pending.settled.is_set():
            raise RuntimeError(f"the spawn of instance {acquired.instance.id} did not settle inside execute()")
        return self._acquire_reply(params, acquired, refcount, pending, after)

    async def acquire(self, peer: Peer, params: protocol.AcquireParams, started: Callable[[], None]) -> Reply:
        """Take a lease, spawning the instance if none is live (concurrent
        acquires of one pair spawn one instance),
        and wait for its spawn to settle. Calls `started()` once the lease is
        taken, before any wait for the spawn, so that pipelined requests
        change state in arrival order. Raises SupervisorError: the client's
        mistakes (nothing changed), LimitReached, SpawnFailed, UnknownLease
        (released before its adapter started). Cancellation: raises Cancelled;
        a lease already taken stands, as if it had been answered."""
        adapter = self._checked_adapter(peer, params)
        if self.registry.live_instance(params.job, params.adapter) is None:
            await self._check_memory_budget(params.adapter)
        after: AfterReply = []
        acquired, refcount, pending = self._commit_acquire(peer, params, adapter, after)
        started()
        if pending is not None and not pending.settled.is_set():
            # An inline spawn has settled already, inside execute: answering
            # without a checkpoint sends the reply before other tasks run.
            await pending.settled.wait()
        return self._acquire_reply(params, acquired, refcount, pending, after)

    def _checked_adapter(self, peer: Peer, params: protocol.AcquireParams) -> AdapterConfig:
        """The acquire's adapter, once its params are known to be usable
        and `peer` may run it. Checked before any state changes, so that bad
        params leave nothing behind."""
        adapter = self.config.adapters.get(params.adapter)
        if adapter is None:
            known = ", ".join(sorted(self.config.adapters)) or "none"
            raise UnknownAdapter(f"no adapter named {params.adapter!r} is configured (known: {known})")
        daemon_uid = os.geteuid()
        if adapter.runs_as_peer and daemon_uid != ROOT_UID and peer.uid != daemon_uid:
            raise PermissionDenied(
                f'adapter {adapter.name!r} runs as the acquiring user (user = "@peer"), and this daemon runs as'
                f" uid {daemon_uid}, not root: it can run adapters only as itself, not as uid {peer.uid}"
                f" (acquire as uid {daemon_uid}, or run the daemon as root)"
            )
        if params.fds and adapter.stdio != "pipe":
            raise Conflict(f'adapter {adapter.name!r} has stdio = "{adapter.stdio}"; fds need stdio = "pipe"')
        adapter.render_argv(params.job, params.params)  # InvalidParams
        if params.fds:
            live = self.registry.live_instance(params.job, params.adapter)
            running = self.instances.running.get(live.id) if live is not None else None
            if running is not None and running.root.stdin_fd is None:
                raise self._no_pipes(live.id, adopted=running.adopted)
        return adapter

    @staticmethod
    def _no_pipes(instance_id: str, *, adopted: bool) -> Conflict:
        if adopted:
            return Conflict(
                f"instance {instance_id} was adopted after a crash of the daemon: its stdin and stdout "
                "pipes were lost with the previous incarnation (no file-descriptor store kept them: "
                "see FileDescriptorStoreMax= in the systemd unit); release it and acquire a new one"
            )
        return Conflict(f"instance {instance_id} has no pipes to pass (it is stopping)")

    def _commit_acquire(
        self, peer: Peer, params: protocol.AcquireParams, adapter: AdapterConfig, after: AfterReply
    ) -> tuple[Acquired, int, PendingSpawn | None]:
        """Take the lease and carry out what that starts. Returns the registry's
        answer, the refcount this acquire made (not whatever it is once a spawn is
        awaited), and the spawn to wait for, if the instance is still starting."""
        acquired = self.registry.acquire(
            job=params.job,
            adapter=params.adapter,
            connection=peer.id,
            uid=peer.uid,
            now=self.now(),
            params=params.params,
            detach=params.detach,
            ttl=params.ttl,
            linger=adapter.linger,
            max_instances=adapter.max_instances,
        )
        refcount = acquired.instance.refcount
        if acquired.spawned and adapter.runs_as_peer:
            self.instances.spawn_as_peer(acquired.instance.id, uid=peer.uid, gid=peer.gid)
        starting = acquired.instance.state is State.STARTING
        pending = self.instances.pending(acquired.instance.id) if starting else None
        self.execute(acquired.actions, after)
        self.record.mark_dirty()
        return acquired, refcount, pending

    def _acquire_reply(
        self,
        params: protocol.AcquireParams,
        acquired: Acquired,
        refcount: int,
        pending: PendingSpawn | None,
        after: AfterReply,
    ) -> Reply:
        """The acquire's answer once its instance's spawn has settled."""
        lease = acquired.lease
        if self.registry.lease(lease.token) is None:
            run_after(after)
            if pending is not None and pending.error is not None:
                raise pending.error
            raise UnknownLease("the lease was released (release_job or disconnect) before its adapter started")
        instance = self.registry.instances[lease.instance_id]
        result: dict[str, Any] = {
            "lease": lease.token,
            "instance": instance.id,
            "job": instance.job,
            "adapter": instance.adapter,
            "pid": instance.pid,
            "refcount": refcount,
            "spawned": acquired.spawned,
            "started_at": instance.started_at,
        }
        if lease.expires_at is not None:
            result["expires_at"] = lease.expires_at
        fds: tuple[int, ...] = ()
        if params.fds:
            pipes = self.instances.stdio_duplicates(instance.id)
            if pipes is None:
                # The lease was taken (its instance lost its pipes since, or
                # while it started): give it back, so the error changes nothing.
                run_after(after)
                released = self.registry.release(lease.token, connection=lease.owner or 0, uid=0, now=self.now())
                self.execute(released.actions)
                raise self._no_pipes(instance.id, adopted=instance.adopted)
            fds = pipes
        after.append(lambda: log.info(
            "lease.acquired", lease=lease.token[:8], instance=instance.id, job=instance.job,
            adapter=instance.adapter, refcount=refcount, detached=lease.detached,
        ))
        return Reply(result, fds, after)

    async def _check_memory_budget(self, adapter: str) -> None:
        """Raise LimitReached if the trees' total RSS is over `daemon.memory_budget`.
        Cancellation: may be cancelled while scanning; changes nothing."""
        budget = self.config.daemon.memory_budget
        if budget is None:
            return
        members = await self.scans.members()
        total = sum(sum(s.rss_bytes for s in stats) for stats in members.values())
        if total > budget:
            raise LimitReached(
                f"the adapter trees use {_mib(total)} of RSS, over the memory_budget of {_mib(budget)}; "
                f"no new instance of {adapter!r} starts until some are released"
            )

    def release(self, peer: Peer, params: protocol.ReleaseParams) -> Reply:
        """Give a lease back; at refcount zero the tree is stopped (after its
        linger). Raises UnknownLease, PermissionDenied."""
        lease = self.registry.lease(params.lease)
        released = self.registry.release(params.lease, connection=peer.id, uid=peer.uid, now=self.now())
        self.execute(released.actions)
        self.record.mark_dirty()
        self.metrics.releases.inc("release")
        if lease is not None:
            log.info("lease.released", lease=params.lease[:8], instance=lease.instance_id, refcount=released.refcount)
        return Reply({"refcount": released.refcount, "stopping": released.stopping})

    def renew(self, peer: Peer, params: protocol.RenewParams) -> Reply:
        """Extend a detached lease. Raises UnknownLease, PermissionDenied, InvalidParams."""
        expires_at = self.registry.renew(params.lease, uid=peer.uid, now=self.now(), ttl=params.ttl)
        self._deadlines_may_have_changed()
        self.record.mark_dirty()
        return Reply({"expires_at": expires_at})

    def release_job_answers_now(self, params: protocol.ReleaseJobParams) -> bool:
        """Whether `release_job_now` can answer: the job has few enough
        leases to release in one turn."""
        return len(self.registry.leases_of_job(params.job)) <= RELEASES_PER_TURN

    def release_job_now(self, peer: Peer, params: protocol.ReleaseJobParams) -> Reply:
        """Release every lease of a job, whoever holds it (the one call for a
        job's terminal transition), in one turn: call it only when
        `release_job_answers_now`. Raises PermissionDenied (nothing released)."""
        released = self.registry.release_job(params.job, connection=peer.id, uid=peer.uid, now=self.now())
        self.execute(released.actions)
        return self._job_released(params.job, released.released, released.instances)

    async def release_job(self, peer: Peer, params: protocol.ReleaseJobParams) -> Reply:
        """`release_job_now` for a job of any size: the leases it holds when
        called are released over turns that end once they have taken
        STEP_BUDGET_S (a lease released meanwhile by someone else is not
        counted; one taken meanwhile is not released). All or nothing: if any
        of them belongs to another uid and the peer is not root,
        PermissionDenied is raised and nothing is released. Cancellation:
        shielded, the release is finished (its work is bounded)."""
        leases = self.registry.leases_of_job(params.job)
        for lease in leases:
            if peer.uid not in (ROOT_UID, lease.uid):
                # The registry's rule for release_job, checked for every lease first.
                raise PermissionDenied(
                    f"a lease of job {params.job!r} is held by uid {lease.uid}; only that uid or root may release it"
                )
        released = 0
        instances: dict[str, None] = {}
        with trio.CancelScope(shield=True):
            turn_began = time.perf_counter()
            actions: list[Action] = []
            for lease in leases:
                if time.perf_counter() - turn_began > STEP_BUDGET_S:
                    self.execute(actions)
                    actions = []
                    await trio.lowlevel.checkpoint()
                    turn_began = time.perf_counter()
                if self.registry.lease(lease.token) is not lease:
                    continue  # released (or expired) between two turns
                actions += self.registry.release(lease.token, connection=peer.id, uid=peer.uid, now=self.now()).actions
                released += 1
                instances[lease.instance_id] = None
            self.execute(actions)
        return self._job_released(params.job, released, list(instances))

    def _job_released(self, job: str, released: int, instances: list[str]) -> Reply:
        self.record.mark_dirty()
        self.metrics.releases.inc("release_job", amount=released)
        log.info("job.released", job=job, released=released, instances=instances)
        return Reply({"released": released, "instances": instances})

    def resume(self, peer: Peer, params: protocol.ResumeParams) -> Reply:
        """Take back, bound to this connection, leases of a previous
        incarnation that wait for their holder after a crash: those of the
        peer's uid (any, for root). Answers which were resumed. Raises nothing."""
        resumed = self.registry.resume(params.leases, connection=peer.id, uid=peer.uid)
        if resumed.resumed:
            self.record.mark_dirty()
            self._deadlines_may_have_changed()
        log.info("leases.resumed", connection=peer.id, resumed=len(resumed.resumed), not_resumed=len(resumed.not_resumed))
        return Reply({"resumed": resumed.resumed, "not_resumed": resumed.not_resumed})

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

    def _status_reply(self, rows: list[bytes], total_rss: int) -> Reply:
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
            "instances": encode_rows(rows),
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
            await self.record.write_now()
        if self.spares is not None:
            self.spares.close()
        self.stderr_files.close()
        if self.cgroups is not None and not self.instances.running:
            self.cgroups.remove_base()
        log.info("daemon.trees_stopped", left=len(self.instances.running))


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


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"
