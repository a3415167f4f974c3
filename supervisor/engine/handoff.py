"""What the engine hands to the next image of the daemon in an in-place
upgrade (`EngineState`), and how it is taken and rebuilt.

The registry (every instance and lease, tokens, deadlines and watchers), every
running tree (its root, known members, the daemon's ends of its stdin and
stdout pipes, its stderr file and read offset), and the counters of the
metrics. File descriptors are named by number: they stay open across
`execve` (the caller clears their close-on-exec flag). A msgspec format,
versioned with the rest of the handover (`supervisor.upgrade`).
"""

from __future__ import annotations

import msgspec

from supervisor.core.registry import Instance, Lease, Reason, Registry, State


class HandedLease(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    instance_id: str
    job: str
    adapter: str
    uid: int
    owner: int | None
    detached: bool
    ttl: float | None = None
    expires_at: float | None = None
    resume_by: float | None = None


class HandedInstance(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    job: str
    adapter: str
    params: list[tuple[str, str]]
    state: str
    leases: list[str]
    linger: float = 0.0
    pid: int | None = None
    started_at: float | None = None
    linger_until: float | None = None
    waiting_for: str | None = None
    watchers: list[int] = []
    returncode: int | None = None
    stop_reason: str | None = None
    tree_gone: bool = False
    adopted: bool = False
    uid: int | None = None


class HandedTree(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    adapter: str
    root_pid: int
    root_start_time: int
    known: list[tuple[int, int]]
    stdin_fd: int | None = None
    stdout_fd: int | None = None
    stderr_file: str | None = None
    stderr_fd: int | None = None
    stderr_offset: int = 0
    # The last lines of its stderr, for `logs` (what the file held of them
    # may have been deallocated).
    stderr_tail: list[bytes] = []
    # Wall-clock time its stop began, if it is being stopped.
    stop_began: float | None = None
    # The root was reaped already (its status is `returncode`).
    root_reaped: bool = False
    returncode: int | None = None
    adopted: bool = False


class HandedCounter(msgspec.Struct, frozen=True):
    name: str
    labels: dict[str, str]
    value: float


class HandedMode(msgspec.Struct, frozen=True):
    """How the previous image tracked trees: the cgroup base it proved
    writable (its probe), or None for the process table. The new image
    carries on the same way without probing again."""

    cgroup_base: str | None


class EngineState(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    started_at: float
    registry_closed: bool
    instances: list[HandedInstance]
    leases: list[HandedLease]
    trees: list[HandedTree]
    counters: list[HandedCounter] = []
    # The stderr tails of instances stopped lately, oldest first.
    finished_logs: list[tuple[str, list[bytes]]] = []
    # Absent in handovers of images that did not say: the new one detects.
    mode: HandedMode | None = None


def export_registry(registry: Registry) -> tuple[list[HandedInstance], list[HandedLease]]:
    instances = [
        HandedInstance(
            id=i.id, job=i.job, adapter=i.adapter, params=list(i.params), state=i.state.value,
            leases=sorted(i.leases), linger=i.linger, pid=i.pid, started_at=i.started_at,
            linger_until=i.linger_until, waiting_for=i.waiting_for, watchers=sorted(i.watchers),
            returncode=i.returncode, stop_reason=i.stop_reason.value if i.stop_reason else None,
            tree_gone=i.tree_gone, adopted=i.adopted, uid=i.uid,
        )
        for i in registry.instances.values()
    ]
    leases = [
        HandedLease(
            token=lease.token, instance_id=lease.instance_id, job=lease.job, adapter=lease.adapter, uid=lease.uid,
            owner=lease.owner, detached=lease.detached, ttl=lease.ttl, expires_at=lease.expires_at,
            resume_by=lease.resume_by,
        )
        for lease in registry.leases.values()
    ]
    return instances, leases


def restore_registry(state: EngineState, **factories: object) -> Registry:
    """The registry `state` describes. Raises ValueError if it is inconsistent."""
    instances = [
        Instance(
            id=i.id, job=i.job, adapter=i.adapter, params=tuple((k, v) for k, v in i.params), state=State(i.state),
            leases=set(i.leases), linger=i.linger, pid=i.pid, started_at=i.started_at,
            linger_until=i.linger_until, waiting_for=i.waiting_for, watchers=set(i.watchers),
            returncode=i.returncode, stop_reason=Reason(i.stop_reason) if i.stop_reason else None,
            tree_gone=i.tree_gone, adopted=i.adopted, uid=i.uid,
        )
        for i in state.instances
    ]
    leases = [
        Lease(
            token=h.token, instance_id=h.instance_id, job=h.job, adapter=h.adapter, uid=h.uid, owner=h.owner,
            detached=h.detached, ttl=h.ttl, expires_at=h.expires_at, resume_by=h.resume_by,
        )
        for h in state.leases
    ]
    return Registry.restore(instances, leases, closed=state.registry_closed, **factories)  # type: ignore[arg-type]
