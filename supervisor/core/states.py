"""The records the registry keeps: instances and leases, their states, and
why a tree stops.

Plain mutable values, owned by `Registry` (which alone changes them, on the
trio thread) and read by the shell. Pure: no trio, no clock, no logging.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field

ROOT_UID = 0

# 18 random bytes = 144 bits, above the 128 that make a token unguessable, and a whole
# number of base64 characters (24).
LEASE_TOKEN_BYTES = 18

# Instance ids appear in logs, cgroup names and the environment; 12 hex digits
# (48 bits) keep them short while making a collision within one daemon's life
# vanishingly unlikely. They are identifiers, not secrets.
INSTANCE_ID_BYTES = 6


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    LINGERING = "lingering"
    STOPPING = "stopping"
    EXITED = "exited"


LIVE_STATES = frozenset({State.STARTING, State.RUNNING, State.LINGERING})


class Reason(str, enum.Enum):
    """Why an instance's tree is being stopped (the `reason` of `adapter_exited`)."""

    EXITED = "exited"
    KILLED = "killed"
    MEMORY_LIMIT = "memory_limit"
    PIDS_LIMIT = "pids_limit"
    LEASE_EXPIRED = "lease_expired"
    RELEASED = "released"
    SHUTDOWN = "shutdown"


@dataclass(slots=True)
class Lease:
    token: str
    instance_id: str
    job: str
    adapter: str
    uid: int
    # The connection that acquired the lease; None once that connection closed.
    owner: int | None
    detached: bool
    ttl: float | None = None
    expires_at: float | None = None
    # A bound lease of a previous incarnation of the daemon: it waits, held by
    # no connection, for its holder to `resume` it until then.
    resume_by: float | None = None

    @property
    def deadline(self) -> float | None:
        """When `tick` drops it: its expiry, or the end of its wait for `resume`."""
        return self.resume_by if self.resume_by is not None else self.expires_at


@dataclass(slots=True)
class Instance:
    id: str
    job: str
    adapter: str
    params: tuple[tuple[str, str], ...]
    state: State
    leases: set[str] = field(default_factory=set)
    linger: float = 0.0
    pid: int | None = None
    started_at: float | None = None
    linger_until: float | None = None
    # Set while STARTING behind a predecessor of the same pair whose tree is
    # still being stopped: the spawn is deferred until that tree is gone.
    waiting_for: str | None = None
    # Connections that lost a lease on this instance to someone else
    # (release_job, expiry) and are told when the instance stops.
    watchers: set[int] = field(default_factory=set)
    returncode: int | None = None
    stop_reason: Reason | None = None
    tree_gone: bool = False
    # Taken over from a previous incarnation of the daemon (`adopt`).
    adopted: bool = False
    # The uid whose acquire spawned it: no other uid but root may join it
    # (None: not known, from a record or handover that did not say).
    uid: int | None = None
    # Grows whenever the registry changes the instance or one of its leases
    # (not its watchers): what the shell derived from it (a `status` row, its
    # entry in the state record) is current while this has not moved.
    revision: int = field(default=0, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.job, self.adapter)

    @property
    def refcount(self) -> int:
        return len(self.leases)


def new_token() -> str:
    """A fresh lease token that never starts with "-": a token is an argument
    of command lines (`adapter-supervisor release TOKEN`), where a leading
    dash reads as an option. (One draw in 64 is redrawn; the first character
    then carries log2(63) bits instead of 6.)"""
    while (token := secrets.token_urlsafe(LEASE_TOKEN_BYTES)).startswith("-"):
        pass
    return token


def new_instance_id() -> str:
    return secrets.token_hex(INSTANCE_ID_BYTES)
