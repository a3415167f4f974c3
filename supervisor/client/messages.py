"""What a client and the daemon say to each other, as Python values: the
params of the requests that take any (`acquire`, `logs`, `status`), the
results as typed dicts, and `AdapterExited`, what a lease is told when its
adapter is gone. Re-exported by `supervisor.client`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

# The `reason` given to leases when the daemon announces `shutting_down`; the
# daemon then stops every tree without a further `adapter_exited`.
SHUTDOWN_REASON = "shutdown"


@dataclass(frozen=True)
class AdapterExited:
    """The adapter of a lease is gone (`adapter_exited`), or going: after
    `shutting_down` every lease gets one with reason "shutdown" and returncode None.

    `reason` is exited, killed, memory_limit (the tree passed its adapter's
    memory_limit), pids_limit (it held more processes than its max_pids),
    lease_expired, released or shutdown.
    """

    instance: str
    job: str
    adapter: str
    pid: int | None
    returncode: int | None
    reason: str

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AdapterExited:
        return cls(
            instance=str(params.get("instance", "")), job=str(params.get("job", "")),
            adapter=str(params.get("adapter", "")), pid=params.get("pid"),
            returncode=params.get("returncode"), reason=str(params.get("reason", "")),
        )


class HelloResult(TypedDict):
    server: str
    version: str
    protocol: int
    pid: int
    instance_id: str
    # Incarnations of the daemon on its state_dir: grows on a restart or an upgrade.
    generation: int


class ReleaseResult(TypedDict):
    refcount: int
    stopping: bool


class ReleaseJobResult(TypedDict):
    released: int
    instances: list[str]


class LeaseStatus(TypedDict):
    """One lease of an instance, as `status` shows it."""

    # The whole token to its own uid and to root, else its first 8 characters.
    lease: str
    detached: bool
    # Unix time a detached lease expires unless renewed; None for a bound one.
    expires_at: float | None
    # The uid that acquired it.
    uid: int
    # The holding connection's process; None while no connection holds it.
    pid: int | None


class _ExitedInstanceFields(TypedDict, total=False):
    """What only an exited instance's status row has. (A base of its own:
    `NotRequired` in a postponed annotation is not seen before Python 3.12.)"""

    # The root's exit status (minus the signal number if a signal killed
    # it; None if unknown) and why the instance ended, as in `AdapterExited`.
    returncode: int | None
    reason: str | None


class InstanceStatus(_ExitedInstanceFields):
    instance: str
    job: str
    adapter: str
    # starting, running, lingering, stopping or exited.
    state: str
    pid: int | None
    pids: list[int]
    refcount: int
    started_at: float | None
    rss_bytes: int
    # Taken over from a previous incarnation of the daemon after a crash.
    adopted: bool
    # The uid whose acquire spawned it (None: not known, from an older daemon).
    uid: int | None
    leases: list[LeaseStatus]


class DaemonStatus(TypedDict, total=False):
    pid: int
    version: str
    instance_id: str
    generation: int
    started_at: float
    uptime_s: float
    instances: int
    leases: int
    connections: int
    cgroup_mode: bool
    # The cgroup directory of the instances; None in process-table mode.
    cgroup_base: str | None
    # clone3 or subprocess.
    spawner: str
    shutting_down: bool
    rss_bytes: int
    memory_budget: int | None
    sweep_interval: float


class Status(TypedDict):
    daemon: DaemonStatus
    instances: list[InstanceStatus]


class AdapterInfo(TypedDict):
    """One configured adapter, as the `adapters` method shows it."""

    name: str
    # The argv template, {job} and {param:NAME} unfilled.
    command: list[str]
    # The names a client may fill in with `params`.
    params: list[str]
    # pipe or null.
    stdio: str
    # The user its processes run as; None for the daemon's own.
    user: str | None
    max_instances: int
    # Bytes of tree RSS; None for no limit.
    memory_limit: int | None
    # Its instances starting, running or lingering now.
    live: int


def acquire_params(
    job: str, adapter: str, *, params: Mapping[str, str] | None, fds: bool, detach: bool, ttl: float | None
) -> dict[str, Any]:
    """The params of an `acquire` request, leaving out the defaults."""
    request: dict[str, Any] = {"job": job, "adapter": adapter}
    if params:
        request["params"] = dict(params)
    if fds:
        request["fds"] = True
    if detach:
        request["detach"] = True
    if ttl is not None:
        request["ttl"] = ttl
    return request


def logs_params(instance: str | None, lease: str | None, lines: int) -> dict[str, Any]:
    """The params of a `logs` request; raises ValueError unless exactly one of
    `instance` and `lease` is given."""
    if (instance is None) == (lease is None):
        raise ValueError("logs() needs exactly one of instance or lease")
    return {"instance": instance, "lines": lines} if instance is not None else {"lease": lease, "lines": lines}


def status_params(
    job: str | None = None, adapter: str | None = None, state: str | None = None, uid: int | None = None
) -> dict[str, Any]:
    """The params of `status` for the filters given (None: not filtered on)."""
    given = {"job": job, "adapter": adapter, "state": state, "uid": uid}
    return {name: value for name, value in given.items() if value is not None}
