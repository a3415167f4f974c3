"""The errors a client raises: `DaemonError`, with a subclass for each code
the daemon answers with (docs/protocol.md, "Errors"), and `ConnectionLost`
(with `LeaseLost`) for a connection that ended. Re-exported by
`supervisor.client`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from supervisor.client.lease import LeaseInfo
from supervisor.core import errors


class DaemonError(Exception):
    """The daemon answered with an error: `code` (docs/protocol.md, "Errors"), `message` (written
    for a person) and `data` (extra detail, often None)."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"{message} (error {code})")
        self.code = code
        self.message = message
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message, self.data))


class InvalidRequest(DaemonError):
    """-32700 / -32600: the daemon could not read the request (a client bug)."""


class MethodNotFound(DaemonError):
    """-32601: the daemon does not know the method (an older daemon?)."""


class InvalidParams(DaemonError):
    """-32602: a parameter is missing, unknown or out of range; the message says which."""


class InternalError(DaemonError):
    """-32603: a bug in the daemon; its log has the details."""


class UnknownAdapter(DaemonError):
    """1001: no adapter of that name is configured."""


class UnknownLease(DaemonError):
    """1002: the lease was never issued, or was released, expired or released by `release_job`."""


class SpawnFailed(DaemonError):
    """1003: the adapter's command could not be started."""


class LimitReached(DaemonError):
    """1004: max_instances, the memory budget or max_connections is reached."""


class PermissionDenied(DaemonError):
    """1005: this uid may not use the daemon, or not touch that lease."""


class ShuttingDown(DaemonError):
    """1006: the daemon is stopping and takes no new leases."""


class Conflict(DaemonError):
    """1007: the live instance runs with other params, or has no pipes to pass."""


ERROR_CLASSES: dict[int, type[DaemonError]] = {
    errors.PARSE_ERROR: InvalidRequest,
    errors.INVALID_REQUEST: InvalidRequest,
    errors.METHOD_NOT_FOUND: MethodNotFound,
    errors.INVALID_PARAMS: InvalidParams,
    errors.INTERNAL_ERROR: InternalError,
    errors.UNKNOWN_ADAPTER: UnknownAdapter,
    errors.UNKNOWN_LEASE: UnknownLease,
    errors.SPAWN_FAILED: SpawnFailed,
    errors.LIMIT_REACHED: LimitReached,
    errors.PERMISSION_DENIED: PermissionDenied,
    errors.SHUTTING_DOWN: ShuttingDown,
    errors.CONFLICT: Conflict,
}


def error_from_wire(error: object) -> DaemonError:
    """The exception for a JSON-RPC error object, of the class named for its code
    (`DaemonError` itself for a code this client does not know)."""
    if not isinstance(error, Mapping):
        return InternalError(errors.INTERNAL_ERROR, f"malformed error from the daemon: {error!r}")
    code = error.get("code")
    code = code if isinstance(code, int) else errors.INTERNAL_ERROR
    cls = ERROR_CLASSES.get(code, DaemonError)
    return cls(code, str(error.get("message", "")), error.get("data"))


class ConnectionLost(ConnectionError):
    """The connection to the daemon ended; bound leases went with it. Not retried."""


class LeaseLost(ConnectionLost):
    """A bound lease died with its connection while it was held (`lease` names it)."""

    def __init__(self, message: str, lease: LeaseInfo | None = None) -> None:
        super().__init__(message)
        self.lease = lease


def fresh_error(error: Exception) -> Exception:
    """A new exception like `error` (a DaemonError or ConnectionLost), so that one
    stored failure can be raised in many threads or tasks without their
    tracebacks piling up on one object."""
    if isinstance(error, DaemonError):
        return type(error)(error.code, error.message, error.data)
    return type(error)(*error.args)
