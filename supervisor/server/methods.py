"""The control methods: validated requests in, results out.

One function per method of SPEC section 5. Each takes the service, the peer
and the typed params, makes its state changes synchronously, and returns a
JSON-ready result. Errors are raised as `SupervisorError`s; the server turns
them into wire errors.

Most methods never wait, and are plain functions: the server's hub answers
them with `answer_now`, for every ready connection in one task. Three may
wait: `status` for a tree scan when its cached one is stale, `acquire` for a
spawn or a predecessor's stop, `sweep` for its scan. `answer_now` raises
`WouldWait` for those cases before it changes anything, and the connection's
own task serves the request with `handle`, which calls `started()` once the
state changes are made (so pipelined requests change state in arrival
order) and may then wait.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from supervisor import __version__
from supervisor import afterreply
from supervisor.core import protocol
from supervisor.engine import reports
from supervisor.core.config import AdapterConfig
from supervisor.engine.engine import Peer, PendingSpawn, Supervisor
from supervisor.core.errors import (
    Conflict,
    InvalidParams,
    MethodNotFound,
    ShuttingDown,
    UnknownAdapter,
    UnknownLease,
)
from supervisor.procs.process import ProcStat
from supervisor.core.registry import Acquired, State
from supervisor.procs.spawner import decode_tail

log = structlog.get_logger()

SERVER_NAME = "adapter-supervisor"

# Methods still served while the daemon shuts down: they read state or give
# leases back, and start nothing.
SERVED_WHILE_STOPPING = frozenset({"hello", "status", "logs", "reports", "metrics", "release", "release_job"})

class WouldWait(Exception):
    """`answer_now` cannot answer this request without waiting; nothing was
    changed. The connection's task serves it with `handle`."""


def answers_at_once(service: Supervisor, request: protocol.Request) -> bool:
    """Whether the connection's reader may serve `request` itself: an INLINE
    method, or an acquire that will not wait (its instance is running; or it
    spawns with the clone3 spawner, which settles inside the call, with no
    predecessor still stopping and no memory budget to measure first)."""
    if request.method in INLINE:
        return True
    params = request.params
    if request.method != "acquire" or not isinstance(params, protocol.AcquireParams):
        return False
    return _acquire_settles_at_once(service, params)


@dataclass(frozen=True)
class FdsResult:
    """A result whose response line carries file descriptors (SCM_RIGHTS).
    The fds belong to the result: the server closes them once it is sent."""

    result: dict[str, Any]
    fds: tuple[int, ...]


Started = Callable[[], None]
SyncHandler = Callable[[Supervisor, Peer, Any], object]


def _check_served(service: Supervisor, request: protocol.Request) -> None:
    if request.method not in SYNC_HANDLERS and request.method not in ASYNC_METHODS:
        raise MethodNotFound(f"method {request.method!r} is not served by this daemon version")
    if service.shutting_down and request.method not in SERVED_WHILE_STOPPING:
        raise ShuttingDown("the daemon is shutting down; retry against its next run")


def answer_now(service: Supervisor, peer: Peer, request: protocol.Request) -> object:
    """Run one request without waiting, and return its result. Raises
    SupervisorError for the client's mistakes, and WouldWait, before changing
    anything, when the request needs `handle`: a `sweep`, a `status` whose
    tree scan is stale, an `acquire` that must wait or passes fds."""
    _check_served(service, request)
    method = request.method
    if method == "status":
        members = service.fresh_tree_members()
        if members is None:
            raise WouldWait
        return _status(service, request.params, members)
    if method == "acquire":
        return _acquire_now(service, peer, request.params)
    handler = SYNC_HANDLERS.get(method)
    if handler is None:
        raise WouldWait
    return handler(service, peer, request.params)


async def handle(service: Supervisor, peer: Peer, request: protocol.Request, started: Started) -> object:
    """Run one request, waiting as it needs. Raises SupervisorError.
    Cancellation: raises Cancelled while waiting; state changes already made
    stand (as they would had the answer been sent)."""
    _check_served(service, request)
    method = request.method
    if method == "status":
        return _status(service, request.params, await service.tree_members())
    if method == "acquire":
        return await acquire(service, peer, request.params, started)
    if method == "sweep":
        return await sweep(service, peer, request.params, started)
    return SYNC_HANDLERS[method](service, peer, request.params)


def hello(service: Supervisor, peer: Peer, params: protocol.HelloParams) -> object:
    return {
        "server": SERVER_NAME,
        "version": __version__,
        "protocol": protocol.PROTOCOL_VERSION,
        "pid": service.pid,
        "instance_id": service.run_id,
    }


async def acquire(service: Supervisor, peer: Peer, params: protocol.AcquireParams, started: Started) -> object:
    adapter = _checked_adapter(service, params)
    if service.registry.live_instance(params.job, params.adapter) is None:
        await service.check_memory_budget(params.adapter)
    acquired, refcount, pending = _commit_acquire(service, peer, params, adapter)
    started()
    if pending is not None and not pending.settled.is_set():
        # (A clone3 spawn has settled already, inside execute: answering
        # without a checkpoint sends the reply before other tasks run.)
        await pending.settled.wait()
    return _acquire_result(service, params, acquired, refcount, pending)


def _acquire_now(service: Supervisor, peer: Peer, params: protocol.AcquireParams) -> object:
    """An acquire that `answers_at_once` and passes no fds: of a running
    instance, or one whose root the clone3 spawner starts (and registers)
    inside `execute`. Raises WouldWait, having changed nothing, for any other."""
    if params.fds or not _acquire_settles_at_once(service, params):
        raise WouldWait
    adapter = _checked_adapter(service, params)
    acquired, refcount, pending = _commit_acquire(service, peer, params, adapter)
    if pending is not None and not pending.settled.is_set():
        raise RuntimeError(f"the spawn of instance {acquired.instance.id} did not settle inside execute()")
    return _acquire_result(service, params, acquired, refcount, pending)


def _acquire_settles_at_once(service: Supervisor, params: protocol.AcquireParams) -> bool:
    """Whether an acquire now would have its answer without waiting: its
    instance is running; or the clone3 spawner starts it, with no predecessor
    still stopping and no memory budget to measure first."""
    if service.registry.acquire_waits(params.job, params.adapter):
        return False
    if service.registry.live_instance(params.job, params.adapter) is not None:
        return True
    return service.uses_clone3 and service.config.daemon.memory_budget is None


def _checked_adapter(service: Supervisor, params: protocol.AcquireParams) -> AdapterConfig:
    """The acquire's adapter, once its params are known to be usable. Checked
    before any state changes, so that bad params leave nothing behind."""
    adapter = service.config.adapters.get(params.adapter)
    if adapter is None:
        known = ", ".join(sorted(service.config.adapters)) or "none"
        raise UnknownAdapter(f"no adapter named {params.adapter!r} is configured (known: {known})")
    if params.fds and adapter.stdio != "pipe":
        raise Conflict(f'adapter {adapter.name!r} has stdio = "{adapter.stdio}"; fds need stdio = "pipe"')
    adapter.render_argv(params.job, params.params)  # InvalidParams
    return adapter


def _commit_acquire(
    service: Supervisor, peer: Peer, params: protocol.AcquireParams, adapter: AdapterConfig
) -> tuple[Acquired, int, PendingSpawn | None]:
    """Take the lease and carry out what that starts. Returns the registry's
    answer, the refcount this acquire made (not whatever it is once a spawn is
    awaited), and the spawn to wait for, if the instance is still starting."""
    acquired = service.registry.acquire(
        job=params.job,
        adapter=params.adapter,
        connection=peer.id,
        uid=peer.uid,
        now=service.now(),
        params=params.params,
        detach=params.detach,
        ttl=params.ttl,
        linger=adapter.linger,
        max_instances=adapter.max_instances,
    )
    refcount = acquired.instance.refcount
    pending = service.pending_spawn(acquired.instance.id) if acquired.instance.state is State.STARTING else None
    service.execute(acquired.actions)
    return acquired, refcount, pending


def _acquire_result(
    service: Supervisor, params: protocol.AcquireParams, acquired: Acquired, refcount: int, pending: PendingSpawn | None
) -> object:
    """The acquire's answer once its instance's spawn has settled."""
    lease = acquired.lease
    if service.registry.lease(lease.token) is None:
        if pending is not None and pending.error is not None:
            raise pending.error
        raise UnknownLease("the lease was released (release_job or disconnect) before its adapter started")
    instance = service.registry.instances[lease.instance_id]
    afterreply.defer(
        log.info, "lease.acquired", lease=lease.token[:8], instance=instance.id, job=instance.job,
        adapter=instance.adapter, refcount=refcount, detached=lease.detached,
    )
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
    if params.fds:
        running = service.running.get(instance.id)
        if running is None or running.root.stdin_fd is None or running.root.stdout_fd is None:
            raise Conflict(f"instance {instance.id} has no pipes to pass (it is stopping)")
        # Duplicates, owned by this response: the instance may stop (closing its
        # own ends, whose numbers the kernel may then reuse for another client's
        # socket) while the response waits to be sent.
        return FdsResult(result, (os.dup(running.root.stdin_fd), os.dup(running.root.stdout_fd)))
    return result


def release(service: Supervisor, peer: Peer, params: protocol.ReleaseParams) -> object:
    lease = service.registry.lease(params.lease)
    released = service.registry.release(params.lease, connection=peer.id, uid=peer.uid, now=service.now())
    service.execute(released.actions)
    service.metrics.releases.labels("release").inc()
    if lease is not None:
        log.info("lease.released", lease=params.lease[:8], instance=lease.instance_id, refcount=released.refcount)
    return {"refcount": released.refcount, "stopping": released.stopping}


def renew(service: Supervisor, peer: Peer, params: protocol.RenewParams) -> object:
    expires_at = service.registry.renew(params.lease, uid=peer.uid, now=service.now(), ttl=params.ttl)
    service.execute([])  # the expiry timer re-reads its deadline
    return {"expires_at": expires_at}


def release_job(service: Supervisor, peer: Peer, params: protocol.ReleaseJobParams) -> object:
    released = service.registry.release_job(params.job, connection=peer.id, uid=peer.uid, now=service.now())
    service.execute(released.actions)
    service.metrics.releases.labels("release_job").inc(released.released)
    log.info("job.released", job=params.job, released=released.released, instances=released.instances)
    return {"released": released.released, "instances": released.instances}


def _status(service: Supervisor, params: protocol.StatusParams, members: dict[str, list[ProcStat]]) -> object:
    """The status answer, from a scan of the trees' members fresh enough to show."""
    # Every control client polls this: list comprehensions rather than
    # generators and one pass for the total save ~1 us of a ~30 us request.
    if params.job is None:
        instances = list(service.registry.instances.values())
    else:
        instances = [i for i in service.registry.instances.values() if i.job == params.job]
    rows = []
    total_rss = 0
    for instance in instances:
        stats = members.get(instance.id, ())
        rss_bytes = sum([s.rss_bytes for s in stats])
        total_rss += rss_bytes
        rows.append({
            "instance": instance.id,
            "job": instance.job,
            "adapter": instance.adapter,
            "state": instance.state.value,
            "pid": instance.pid,
            "pids": sorted([s.pid for s in stats]),
            "refcount": instance.refcount,
            "started_at": instance.started_at,
            "rss_bytes": rss_bytes,
        })
    daemon = service.config.daemon
    return {
        "daemon": {
            "pid": service.pid,
            "version": __version__,
            "instance_id": service.run_id,
            "started_at": service.started_at,
            "uptime_s": round(time.time() - service.started_at, 3),
            "instances": len(service.registry.instances),
            "leases": len(service.registry.leases),
            "connections": len(service.peers),
            "cgroup_mode": service.cgroups is not None,
            "cgroup_base": None if service.cgroups is None else str(service.cgroups.base),
            "spawner": "clone3" if service.uses_clone3 else "subprocess",
            "shutting_down": service.shutting_down,
            "rss_bytes": total_rss,
            "memory_budget": daemon.memory_budget,
            "sweep_interval": daemon.sweep_interval,
        },
        "instances": rows,
    }


def logs(service: Supervisor, peer: Peer, params: protocol.LogsParams) -> object:
    instance_id = params.instance
    if params.lease is not None:
        lease = service.registry.lease(params.lease)
        if lease is None:
            raise UnknownLease("no such lease: it was never issued, was already released, or expired")
        instance_id = lease.instance_id
    assert instance_id is not None
    running = service.running.get(instance_id)
    if running is not None:
        tail = running.root.stderr_tail
    elif instance_id in service.finished_logs:
        tail = service.finished_logs[instance_id]
    elif instance_id in service.registry.instances:
        return {"lines": []}  # not spawned yet
    else:
        raise InvalidParams(f"no instance {instance_id!r} is running or finished recently")
    return {"lines": decode_tail(tail, params.lines)}


async def sweep(service: Supervisor, peer: Peer, params: protocol.SweepParams, started: Started) -> object:
    started()
    report = await service.sweep("manual", deep=params.deep)
    return reports.to_builtins(report)


def reports_(service: Supervisor, peer: Peer, params: protocol.ReportsParams) -> object:
    return {"reports": [reports.to_builtins(r) for r in service.reports.latest(params.limit)]}


def metrics(service: Supervisor, peer: Peer, params: protocol.MetricsParams) -> object:
    return {"text": service.metrics.exposition()}


# The methods `answer_now` answers with one call. `status` and `acquire` have
# cases of their own there (each may have to wait); `sweep` always waits.
SYNC_HANDLERS: dict[str, SyncHandler] = {
    "hello": hello,
    "release": release,
    "renew": renew,
    "release_job": release_job,
    "logs": logs,
    "reports": reports_,
    "metrics": metrics,
}
ASYNC_METHODS = frozenset({"status", "acquire", "sweep"})

# Methods answered in the connection's reader task when the hub hands them
# over (see `answers_at_once`): they never wait for anything but, at most, a
# shared scan of a few ms. `acquire` (may wait for a predecessor's stop) and
# `sweep` get a task, so later requests on the connection are not held up.
INLINE = frozenset(SYNC_HANDLERS) | {"status"}
