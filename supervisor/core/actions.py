"""What the registry answers: the actions the I/O shell must carry out, the
results of client operations, and the records an adopted instance is taken
back from. Frozen values; pure."""

from __future__ import annotations

import msgspec

from supervisor.core.states import Instance, Lease, Reason


class Spawn(msgspec.Struct, frozen=True, gc=False):
    """Start the root process of `instance_id`; report back with `spawned` or `spawn_failed`."""

    instance_id: str


class StopTree(msgspec.Struct, frozen=True, gc=False):
    """Stop every process of the instance's tree; report back with `tree_gone`."""

    instance_id: str
    reason: Reason


class NotifyExited(msgspec.Struct, frozen=True):
    """Send `adapter_exited` to these connections."""

    connections: tuple[int, ...]
    instance_id: str
    job: str
    adapter: str
    pid: int | None
    returncode: int | None
    reason: Reason


class InstanceSettled(msgspec.Struct, frozen=True, gc=False):
    """A STARTING instance stopped waiting: it runs, or it never will.

    Acquires parked on it can now answer.
    """

    instance_id: str
    running: bool


Action = Spawn | StopTree | NotifyExited | InstanceSettled


class Acquired(msgspec.Struct, frozen=True):
    lease: Lease
    instance: Instance
    spawned: bool
    actions: list[Action]


class Released(msgspec.Struct, frozen=True):
    refcount: int
    stopping: bool
    actions: list[Action]


class JobReleased(msgspec.Struct, frozen=True):
    released: int
    instances: list[str]
    actions: list[Action]


class Ticked(msgspec.Struct, frozen=True):
    expired_leases: list[str]
    actions: list[Action]
    # Bound leases of a previous incarnation nobody resumed in time.
    unresumed_leases: list[str] = msgspec.field(default_factory=list)


class Resumed(msgspec.Struct, frozen=True):
    resumed: list[str]
    not_resumed: list[str]


class AdoptedLease(msgspec.Struct, frozen=True):
    """A lease of a previous incarnation, as it recorded it."""

    token: str
    uid: int
    detached: bool
    ttl: float | None = None
    expires_at: float | None = None


class AdoptedInstance(msgspec.Struct, frozen=True):
    """An instance of a previous incarnation whose tree still runs, as it
    recorded it. `linger_until` is set if it was lingering."""

    id: str
    job: str
    adapter: str
    params: tuple[tuple[str, str], ...]
    pid: int
    started_at: float
    linger: float = 0.0
    linger_until: float | None = None
    leases: tuple[AdoptedLease, ...] = ()
    uid: int | None = None
