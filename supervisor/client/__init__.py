"""The Python client of adapter-supervisor (the wire protocol is docs/protocol.md).

Two clients with one API:

* `Client` (`supervisor.client.blocking`): blocking, on a plain socket. One
  instance may be shared by any number of threads (a thread pool, a sync web
  framework): requests are pipelined and their answers matched by id. A caller waiting for an answer reads the socket
  itself when no other thread does (no hand-over between threads on the common
  path); a reader thread per client reads while nobody waits, so notifications
  arrive between calls too.
* `AsyncClient` (`supervisor.client.aio`, imported on first use: it needs
  anyio): the same for asyncio and Trio, written once on anyio.
  ``async with AsyncClient(path) as client:``.

Both raise the errors of `supervisor.client.errors` and return the results
and notifications of `supervisor.client.messages`; their leases share
`supervisor.client.lease`, and their wire `supervisor.client.session`.

Leases are taken in a ``with`` block so that no exit path can forget them::

    with Client() as client, client.lease("job-1", "claude-acp", fds=True) as lease:
        lease.stdin.write(b"...\\n"); lease.stdin.flush()
        reply = lease.stdout.readline()

The lease is released when the block exits for any reason: normal exit, an
exception, Ctrl-C, cancellation (async). `release_job(job)` releases every lease
of a job, whoever holds it; call it from the one place where an orchestrator
handles a job's terminal transitions.

Notifications reach the lease they concern: ``lease.wait_exited()`` returns an
`AdapterExited` once the daemon says the adapter's tree is gone (or, after
`shutting_down`, that it is going), and ``lease.on_end(callback)`` runs a
callback then (on whichever thread or task read the notification: keep it short,
do not block, do not call the client from it). Every
notification is also kept for `next_notification()`.

Errors the daemon answers with are raised as `DaemonError` subclasses named for
what happened (`UnknownAdapter`, `LimitReached`, `SpawnFailed`, ...), carrying the
daemon's `code` and `message`. A request that gets no answer within the client's
`timeout` raises `TimeoutError`.

Connection loss, and why there is no reconnect: a lease that is not detached
belongs to its connection. When the connection ends (the daemon stopped or
restarted, the socket broke, `close()`), the daemon releases those leases and
stops their trees. A client that quietly reconnected and re-acquired would hand
the caller a new process that lost the old one's state, so instead: every later
call raises `ConnectionLost`; each bound lease is marked `lost`; `wait_exited()`
raises `LeaseLost`; and a `lease()` block whose body finished normally raises
`LeaseLost` on exit, so the job is not reported as done on a dead adapter. To
carry on, open a new client and acquire again. Detached leases (``detach=True``
with a ``ttl``) survive their connection and can be renewed or released by token
from any client of the same uid.

The one exception is a crash or restart of the daemon: the daemon that comes
back adopts the running adapters and holds their bound leases for its
`resume_grace` (30 s by default), for their holder to take back with
`resume`. A client made with ``resume=True`` (or a number of seconds) does
that itself: when its connection ends, it keeps its bound leases (calls made
meanwhile raise ConnectionLost, `lost` is True), connects again every 0.2 s
for up to that long, and resumes them. It then tells the holder either way:
the leases the daemon gave back simply carry on (their fds never stopped
working), those it did not are ended as above (`LeaseLost`), and a
``{"method": "resumed", "params": {"resumed": [...], "lost": [...],
"generation": n}}`` notification is added to `next_notification()` (and
passed to `on_resume`, if given). If no daemon answers in time, every bound
lease is lost as without `resume`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supervisor.client.blocking import Client, Lease
from supervisor.client.errors import (
    Conflict,
    ConnectionLost,
    DaemonError,
    InternalError,
    InvalidParams,
    InvalidRequest,
    LeaseLost,
    LimitReached,
    MethodNotFound,
    PermissionDenied,
    ShuttingDown,
    SpawnFailed,
    UnknownAdapter,
    UnknownLease,
)
from supervisor.client.lease import LeaseInfo
from supervisor.client.messages import (
    AdapterExited,
    AdapterInfo,
    DaemonStatus,
    HelloResult,
    InstanceStatus,
    LeaseStatus,
    ReleaseJobResult,
    ReleaseResult,
    Status,
)
from supervisor.client.session import default_socket

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
