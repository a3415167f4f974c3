"""The one error hierarchy of the daemon.

Every error a client can see is a `SupervisorError` subclass that knows its wire
code. The mapping from exception to JSON-RPC error object happens in exactly one
place (`supervisor.server`); everything else only raises.
"""

from __future__ import annotations

# JSON-RPC 2.0 reserved codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Application codes (docs/protocol.md, "Errors").
UNKNOWN_ADAPTER = 1001
UNKNOWN_LEASE = 1002
SPAWN_FAILED = 1003
LIMIT_REACHED = 1004
PERMISSION_DENIED = 1005
SHUTTING_DOWN = 1006
CONFLICT = 1007
UPGRADE_FAILED = 1008


class SupervisorError(Exception):
    """Base of every error that is reported to a client.

    `message` is written for a person: it says what went wrong and, where it can,
    what to do about it.
    """

    code: int = INTERNAL_ERROR

    def __init__(self, message: str, *, data: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class ProtocolError(SupervisorError):
    """The bytes or the envelope of a message are wrong."""


class ParseError(ProtocolError):
    code = PARSE_ERROR


class InvalidRequest(ProtocolError):
    code = INVALID_REQUEST


class MessageTooLarge(InvalidRequest):
    """A line exceeded `max_message_bytes`; the connection must be closed."""


class MethodNotFound(ProtocolError):
    code = METHOD_NOT_FOUND


class InvalidParams(ProtocolError):
    code = INVALID_PARAMS


class UnknownAdapter(SupervisorError):
    code = UNKNOWN_ADAPTER


class UnknownLease(SupervisorError):
    code = UNKNOWN_LEASE


class SpawnFailed(SupervisorError):
    code = SPAWN_FAILED


class LimitReached(SupervisorError):
    code = LIMIT_REACHED


class PermissionDenied(SupervisorError):
    code = PERMISSION_DENIED


class ShuttingDown(SupervisorError):
    code = SHUTTING_DOWN


class Conflict(SupervisorError):
    code = CONFLICT


class UpgradeFailed(SupervisorError):
    """An in-place upgrade did not happen; the daemon serves on as before."""

    code = UPGRADE_FAILED


class ConfigError(Exception):
    """A configuration file is unusable.

    Not a `SupervisorError`: it never crosses the wire. `str()` names the file, the
    key path and what was expected.
    """

    def __init__(self, path: str, key: str, expected: str) -> None:
        self.path = path
        self.key = key
        self.expected = expected
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {expected}")
