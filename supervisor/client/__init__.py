"""The Python client of adapter-supervisor: the public surface.

* `Client` (`supervisor.client.blocking`): blocking, shareable by threads.
* `AsyncClient` (`supervisor.client.aio`): the same API for asyncio and Trio,
  imported on first use (it needs anyio).
* The errors, results and notifications both return (`supervisor.client.session`).

See `supervisor.client.blocking` for leases, notifications, errors and why a
client never reconnects on its own; the wire protocol is docs/protocol.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supervisor.client.blocking import Client, Lease
from supervisor.client.session import (
    AdapterExited,
    AdapterInfo,
    Conflict,
    ConnectionLost,
    DaemonError,
    DaemonStatus,
    HelloResult,
    InstanceStatus,
    InternalError,
    InvalidParams,
    InvalidRequest,
    LeaseInfo,
    LeaseLost,
    LeaseStatus,
    LimitReached,
    MethodNotFound,
    PermissionDenied,
    ReleaseJobResult,
    ReleaseResult,
    ShuttingDown,
    SpawnFailed,
    Status,
    UnknownAdapter,
    UnknownLease,
    default_socket,
)

if TYPE_CHECKING:
    from supervisor.client.aio import AsyncClient, AsyncLease

__all__ = [
    "AdapterExited", "AdapterInfo", "AsyncClient", "AsyncLease", "Client", "Conflict", "ConnectionLost",
    "DaemonError", "DaemonStatus", "HelloResult", "InstanceStatus", "InternalError", "InvalidParams",
    "InvalidRequest", "Lease", "LeaseInfo", "LeaseLost", "LeaseStatus", "LimitReached", "MethodNotFound",
    "PermissionDenied", "ReleaseJobResult", "ReleaseResult", "ShuttingDown", "SpawnFailed", "Status",
    "UnknownAdapter", "UnknownLease", "default_socket",
]


def __getattr__(name: str) -> Any:
    # The async client needs anyio; it is imported only by those who use it.
    if name in ("AsyncClient", "AsyncLease"):
        from supervisor.client import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
