"""The supervisor service: carries out what the registry decides.

`Supervisor` owns the registry, the spawned roots and every task that touches a
process: spawning, watching roots, stopping trees, reaping adopted children,
expiring leases. All of it runs on the trio thread; blocking scans go to worker
threads and only return data. The socket server (`supervisor.server`) turns
requests into calls of the `handle_*` methods and never touches the registry
itself.
"""

from __future__ import annotations

import collections
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
import trio

from supervisor import __version__, procs, protocol, subreaper
from supervisor.cgroup import CgroupManager
from supervisor.config import AdapterConfig, Config
from supervisor.errors import (
    Conflict,
    InvalidParams,
    MethodNotFound,
    ShuttingDown,
    SpawnFailed,
    SupervisorError,
    UnknownAdapter,
    UnknownLease,
)
from supervisor.registry import (
    Action,
    InstanceSettled,
    NotifyExited,
    Reason,
    Registry,
    Spawn,
    State,
    StopTree,
)
from supervisor.spawner import STDERR_LINE_BYTES, RootProcess, spawn_root
from supervisor.tree import InstanceTree, StopOutcome, stop_tree

log = structlog.get_logger()

SERVER_NAME = "adapter-supervisor"

# The stderr tails of this many finished instances stay readable through `logs`
# after their tree is gone: enough to debug a crash, bounded for a long-lived
# daemon.
FINISHED_LOGS_KEPT = 64


class Peer(Protocol):
    """What the service needs of a client connection."""

    id: int
    uid: int

    def notify(self, method: str, params: object) -> None: ...


@dataclass
class RunningInstance:
    """The shell's side of one spawned instance."""

    adapter: AdapterConfig
    root: RootProcess
    tree: InstanceTree
    root_reaped: trio.Event = field(default_factory=trio.Event)
    returncode: int | None = None
    stopped: trio.Event = field(default_factory=trio.Event)


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
        self.registry = Registry()
        self.run_id = secrets.token_hex(8)
        self.pid = os.getpid()
        self.started_at = time.time()
        self.peers: dict[int, Peer] = {}
        self.running: dict[str, RunningInstance] = {}
        self.finished_logs: collections.OrderedDict[str, list[str]] = collections.OrderedDict()
        self._pending: dict[str, PendingSpawn] = {}
        self._roots: dict[int, str] = {}  # root pid -> instance id, until reaped
        self._child_exited = trio.Event()
        self._deadline_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._clock_offset = 0.0
        self.shutting_down = False

    # -- clock ---------------------------------------------------------------

    def now(self) -> float:
        """Wall-clock seconds, advanced by trio's clock (so MockClock drives it in tests)."""
        return trio.current_time() + self._clock_offset

    # -- running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Owns every process task; on cancellation the
        caller should have called `shutdown` first, or trees are left to the next
        start's sweep."""
        self._clock_offset = time.time() - trio.current_time()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._reap_children)
            nursery.start_soon(self._expire_deadlines)
            task_status.started()

    async def _reap_children(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
            self.reap_children()
            task_status.started()
            async for _ in sigchld:
                self.reap_children()

    def reap_children(self) -> None:
        """Reap every waitable child by pid; route roots' statuses to their instance."""
        reaped = False
        while True:
            waitable = subreaper.waitable_children()
            if not waitable:
                break
            for pid in waitable:
                returncode = subreaper.reap_pid(pid)
                if returncode is None:
                    continue
                reaped = True
                instance_id = self._roots.pop(pid, None)
                if instance_id is None:
                    log.debug("child.reaped", pid=pid, returncode=returncode)
                    continue
                running = self.running.get(instance_id)
                if running is not None:
                    running.returncode = returncode
                    # Tell subprocess the child is gone, so it never waits for it.
                    running.root.popen.returncode = returncode
                    running.root_reaped.set()
        if reaped:
            self._child_exited.set()
            self._child_exited = trio.Event()

    async def _wait_child_exited(self) -> None:
        await self._child_exited.wait()

    async def _expire_deadlines(self) -> None:
        """Release expired detached leases and end lingering instances on time."""
        while True:
            deadline = self.registry.next_deadline()
            changed = self._deadline_changed
            if deadline is None:
                await changed.wait()
            else:
                with trio.move_on_at(deadline - self._clock_offset):
                    await changed.wait()
            ticked = self.registry.tick(self.now())
            for token in ticked.expired_leases:
                log.info("lease.expired", lease=token[:8])
            self.execute(ticked.actions)

    def _deadlines_may_have_changed(self) -> None:
        self._deadline_changed.set()
        self._deadline_changed = trio.Event()

    # -- carrying out actions ------------------------------------------------

    def execute(self, actions: Iterable[Action]) -> None:
        """Carry out registry actions. Synchronous: spawns happen now, stops and
        notifications are started as tasks. Feedback may yield more actions,
        which are carried out in turn."""
        queue = collections.deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Spawn):
                queue.extend(self._spawn(action.instance_id))
            elif isinstance(action, StopTree):
                self._start_stop(action.instance_id, action.reason)
            elif isinstance(action, NotifyExited):
                self._notify_exited(action)
            elif isinstance(action, InstanceSettled):
                pending = self._pending.pop(action.instance_id, None)
                if pending is not None:
                    pending.settled.set()
        self._deadlines_may_have_changed()

    def _spawn(self, instance_id: str) -> list[Action]:
        instance = self.registry.instances[instance_id]
        adapter = self.config.adapters.get(instance.adapter)
        pending = self._pending.setdefault(instance_id, PendingSpawn())
        if adapter is None:
            # Removed by a reload while this instance waited for its predecessor.
            pending.error = UnknownAdapter(f"adapter {instance.adapter!r} is no longer configured")
            return self.registry.spawn_failed(instance_id)
        cgroup_fd = None
        try:
            if self.cgroups is not None:
                self.cgroups.create(instance_id)
                cgroup_fd = self.cgroups.join_fd(instance_id)
            root = spawn_root(
                adapter, instance_id=instance_id, job=instance.job, params=dict(instance.params), cgroup_fd=cgroup_fd
            )
        except (SpawnFailed, InvalidParams) as exc:
            pending.error = exc if isinstance(exc, SpawnFailed) else SpawnFailed(exc.message)
            log.warning("adapter.spawn_failed", instance=instance_id, job=instance.job, adapter=instance.adapter, error=exc.message)
            self._remove_cgroup(instance_id)
            return self.registry.spawn_failed(instance_id)
        except OSError as exc:
            pending.error = SpawnFailed(f"could not prepare the cgroup of instance {instance_id}: {exc}")
            log.error("adapter.spawn_failed", instance=instance_id, error=str(exc))
            self._remove_cgroup(instance_id)
            return self.registry.spawn_failed(instance_id)
        finally:
            if cgroup_fd is not None:
                os.close(cgroup_fd)
        tree = InstanceTree(instance_id=instance_id, root=root.id, cgroup=self.cgroups, daemon_pid=self.pid)
        tree.known.add(root.id)
        running = RunningInstance(adapter=adapter, root=root, tree=tree)
        self.running[instance_id] = running
        self._roots[root.pid] = instance_id
        assert self._nursery is not None
        # The tasks get the object, not the id: the instance may be stopped and
        # forgotten before they first run.
        self._nursery.start_soon(self._watch_root, instance_id, running)
        self._nursery.start_soon(self._capture_stderr, instance_id, running)
        log.info(
            "adapter.spawned", instance=instance_id, job=instance.job, adapter=instance.adapter, pid=root.pid
        )
        return self.registry.spawned(instance_id, pid=root.pid, now=self.now())

    async def _watch_root(self, instance_id: str, running: RunningInstance) -> None:
        # The reaper may have missed nothing, but a root that died before the
        # SIGCHLD receiver ran is caught here too.
        self.reap_children()
        await running.root_reaped.wait()
        returncode = running.returncode if running.returncode is not None else -1
        log.info("adapter.root_exited", instance=instance_id, pid=running.root.pid, returncode=returncode)
        self.execute(self.registry.root_exited(instance_id, returncode=returncode, now=self.now()))

    async def _capture_stderr(self, instance_id: str, running: RunningInstance) -> None:
        stream = trio.lowlevel.FdStream(running.root.stderr_fd)
        buffer = b""
        async with stream:
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > STDERR_LINE_BYTES:
                    lines.append(buffer)
                    buffer = b""
                for raw in lines:
                    self._stderr_line(instance_id, running, raw)
            if buffer:
                self._stderr_line(instance_id, running, buffer)

    @staticmethod
    def _stderr_line(instance_id: str, running: RunningInstance, raw: bytes) -> None:
        line = raw[:STDERR_LINE_BYTES].decode("utf-8", "replace").rstrip("\r")
        running.root.stderr_tail.append(line)
        log.info("adapter.stderr", instance=instance_id, line=line)

    def _start_stop(self, instance_id: str, reason: Reason) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._stop, instance_id, reason)

    async def _stop(self, instance_id: str, reason: Reason) -> None:
        running = self.running.get(instance_id)
        outcome = StopOutcome()
        if running is not None:
            adapter = running.adapter
            # Bounded and shielded: a stop that was begun is always finished,
            # even while the daemon shuts down.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(adapter.stop_timeout + 5):
                    outcome = await stop_tree(
                        running.tree,
                        stop_signal=int(adapter.stop_signal),
                        stop_timeout=adapter.stop_timeout,
                        reap=self.reap_children,
                        child_exited=self._wait_child_exited,
                    )
                    if not running.root_reaped.is_set():
                        with trio.move_on_after(1):
                            await running.root_reaped.wait()
            running.root.close_stdio()
            self._remove_cgroup(instance_id)
            self.finished_logs[instance_id] = list(running.root.stderr_tail)
            while len(self.finished_logs) > FINISHED_LOGS_KEPT:
                self.finished_logs.popitem(last=False)
            del self.running[instance_id]
            running.stopped.set()
        event = "tree.reaped" if outcome.clean else "tree.reap_incomplete"
        log.info(
            event,
            instance=instance_id,
            reason=reason.value,
            signalled=len(outcome.signalled),
            killed=len(outcome.killed),
            survivors=[m.pid for m in outcome.survivors],
        )
        self.execute(self.registry.tree_gone(instance_id, now=self.now()))

    def _remove_cgroup(self, instance_id: str) -> None:
        if self.cgroups is not None:
            self.cgroups.remove(instance_id)

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

    # -- connections ---------------------------------------------------------

    def connected(self, peer: Peer) -> None:
        self.peers[peer.id] = peer

    def disconnected(self, peer: Peer) -> None:
        """Release every lease bound to the connection. Synchronous, so it is safe in `finally`."""
        self.peers.pop(peer.id, None)
        self.execute(self.registry.connection_closed(peer.id, now=self.now()))

    # -- request handlers ----------------------------------------------------

    async def handle(self, peer: Peer, request: protocol.Request, started: Callable[[], None]) -> object:
        """Run one request. Calls `started()` once every state change the request
        makes is done (so pipelined requests change state in arrival order), then
        may wait (for a spawn) before returning the result. Raises SupervisorError."""
        handler = getattr(self, f"_handle_{request.method}", None)
        if handler is None:
            raise MethodNotFound(f"method {request.method!r} is not served by this daemon version")
        if self.shutting_down and request.method not in ("hello", "status", "logs", "release", "release_job"):
            raise ShuttingDown("the daemon is shutting down; retry against its next run")
        return await handler(peer, request.params, started)

    async def _handle_hello(self, peer: Peer, params: protocol.HelloParams, started: Callable[[], None]) -> object:
        return {
            "server": SERVER_NAME,
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "pid": self.pid,
            "instance_id": self.run_id,
        }

    async def _handle_acquire(self, peer: Peer, params: protocol.AcquireParams, started: Callable[[], None]) -> object:
        adapter = self.config.adapters.get(params.adapter)
        if adapter is None:
            known = ", ".join(sorted(self.config.adapters)) or "none"
            raise UnknownAdapter(f"no adapter named {params.adapter!r} is configured (known: {known})")
        if params.fds and adapter.stdio != "pipe":
            raise Conflict(f"adapter {adapter.name!r} has stdio = {adapter.stdio!r}; fds need stdio = \"pipe\"")
        # Validate params before any state changes (render raises InvalidParams).
        adapter.render_argv(params.job, params.params)
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
        lease = acquired.lease
        if acquired.instance.state is State.STARTING:
            self._pending.setdefault(acquired.instance.id, PendingSpawn())
        self.execute(acquired.actions)
        started()
        pending = self._pending.get(acquired.instance.id)
        if pending is not None:
            await pending.settled.wait()
        if self.registry.lease(lease.token) is None:
            if pending is not None and pending.error is not None:
                raise pending.error
            raise UnknownLease("the lease was released (release_job or disconnect) before its adapter started")
        instance = self.registry.instances[lease.instance_id]
        log.info(
            "lease.acquired", lease=lease.token[:8], instance=instance.id, job=instance.job,
            adapter=instance.adapter, refcount=instance.refcount, detached=lease.detached,
        )
        result: dict[str, Any] = {
            "lease": lease.token,
            "instance": instance.id,
            "job": instance.job,
            "adapter": instance.adapter,
            "pid": instance.pid,
            "refcount": instance.refcount,
            "spawned": acquired.spawned,
            "started_at": instance.started_at,
        }
        if lease.expires_at is not None:
            result["expires_at"] = lease.expires_at
        if params.fds:
            running = self.running.get(instance.id)
            if running is None or running.root.stdin_fd is None or running.root.stdout_fd is None:
                raise Conflict(f"instance {instance.id} has no pipes to pass (it is stopping)")
            return FdsResult(result, (running.root.stdin_fd, running.root.stdout_fd))
        return result

    async def _handle_release(self, peer: Peer, params: protocol.ReleaseParams, started: Callable[[], None]) -> object:
        lease = self.registry.lease(params.lease)
        released = self.registry.release(params.lease, connection=peer.id, uid=peer.uid, now=self.now())
        self.execute(released.actions)
        if lease is not None:
            log.info("lease.released", lease=params.lease[:8], instance=lease.instance_id, refcount=released.refcount)
        return {"refcount": released.refcount, "stopping": released.stopping}

    async def _handle_renew(self, peer: Peer, params: protocol.RenewParams, started: Callable[[], None]) -> object:
        expires_at = self.registry.renew(params.lease, uid=peer.uid, now=self.now(), ttl=params.ttl)
        self._deadlines_may_have_changed()
        return {"expires_at": expires_at}

    async def _handle_release_job(self, peer: Peer, params: protocol.ReleaseJobParams, started: Callable[[], None]) -> object:
        released = self.registry.release_job(params.job, connection=peer.id, uid=peer.uid, now=self.now())
        self.execute(released.actions)
        log.info("job.released", job=params.job, released=released.released, instances=released.instances)
        return {"released": released.released, "instances": released.instances}

    async def _handle_status(self, peer: Peer, params: protocol.StatusParams, started: Callable[[], None]) -> object:
        started()
        instances = [i for i in self.registry.instances.values() if params.job is None or i.job == params.job]
        trees = {i.id: self.running[i.id].tree for i in instances if i.id in self.running}
        snapshots = {instance_id: (tree, frozenset(tree.known)) for instance_id, tree in trees.items()}
        members = await trio.to_thread.run_sync(_scan_trees, snapshots)
        for instance_id, stats in members.items():
            trees[instance_id].remember(stats)
        rows = []
        for instance in instances:
            stats = members.get(instance.id, [])
            rows.append({
                "instance": instance.id,
                "job": instance.job,
                "adapter": instance.adapter,
                "state": instance.state.value,
                "pid": instance.pid,
                "pids": sorted(s.pid for s in stats),
                "refcount": instance.refcount,
                "started_at": instance.started_at,
                "rss_bytes": sum(s.rss_bytes for s in stats),
            })
        return {
            "daemon": {
                "pid": self.pid,
                "version": __version__,
                "instance_id": self.run_id,
                "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 3),
                "instances": len(self.registry.instances),
                "leases": len(self.registry.leases),
                "connections": len(self.peers),
                "cgroup_mode": self.cgroups is not None,
                "shutting_down": self.shutting_down,
                "rss_bytes": sum(r["rss_bytes"] for r in rows),
            },
            "instances": rows,
        }

    async def _handle_logs(self, peer: Peer, params: protocol.LogsParams, started: Callable[[], None]) -> object:
        instance_id = params.instance
        if params.lease is not None:
            lease = self.registry.lease(params.lease)
            if lease is None:
                raise UnknownLease("no such lease: it was never issued, was already released, or expired")
            instance_id = lease.instance_id
        assert instance_id is not None
        running = self.running.get(instance_id)
        if running is not None:
            lines = list(running.root.stderr_tail)
        elif instance_id in self.finished_logs:
            lines = self.finished_logs[instance_id]
        elif instance_id in self.registry.instances:
            lines = []
        else:
            raise InvalidParams(f"no instance {instance_id!r} is running or finished recently")
        return {"lines": lines[-params.lines:]}

    # -- reload and shutdown ---------------------------------------------------

    def reload(self, config: Config) -> None:
        """Adopt a new config: changed adapters apply to new instances only."""
        self.config = config

    def kill_everything_now(self) -> None:
        """Last resort when the daemon is dying of a bug: SIGKILL every tracked
        tree at once, synchronously, so that no adapter outlives its owner."""
        for instance_id, running in self.running.items():
            if self.cgroups is not None:
                self.cgroups.kill(instance_id)
            for member in running.tree.known:
                procs.signal_process(member, signal.SIGKILL)

    async def shutdown(self) -> None:
        """Stop every tree (SPEC rule 2 each) and wait for them, bounded by the
        largest stop_timeout plus a margin. Cancellation: shielded; returns when done."""
        self.shutting_down = True
        for peer in list(self.peers.values()):
            peer.notify("shutting_down", {})
        self.execute(self.registry.shutdown())
        timeouts = [r.adapter.stop_timeout for r in self.running.values()] or [0.0]
        with trio.CancelScope(shield=True):
            with trio.move_on_after(max(timeouts) + 6):
                for running in list(self.running.values()):
                    await running.stopped.wait()
        log.info("daemon.trees_stopped", left=len(self.running))


@dataclass(frozen=True)
class FdsResult:
    """A result whose response line carries file descriptors (SCM_RIGHTS)."""

    result: dict[str, Any]
    fds: tuple[int, ...]


def _scan_trees(
    snapshots: dict[str, tuple[InstanceTree, frozenset[procs.ProcessId]]],
) -> dict[str, list[procs.ProcStat]]:
    """Blocking: members of each tree. Runs in a worker thread; returns data only."""
    return {instance_id: tree.scan(known) for instance_id, (tree, known) in snapshots.items()}
