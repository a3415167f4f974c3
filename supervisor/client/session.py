"""The client's side of the wire, without I/O policy: `Session`, which frames
lines, matches answers to requests by id and hands out passed fds, what it
makes of each line (`Reply`, `Notice`, `Refusal`, `Stray`), and the one read
that takes bytes and fds together.

Shared by the blocking `supervisor.client.Client` and the async
`supervisor.client.aio.AsyncClient`. What they raise is in `errors.py`, the
shapes of requests and results in `messages.py`, leases in `lease.py`.
"""

from __future__ import annotations

import array
import collections
import contextlib
import itertools
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from supervisor.client.errors import ConnectionLost, DaemonError, error_from_wire
from supervisor.core import daemonconfig

# Seconds to wait for an answer: acquire waits for the spawn, status for a scan of
# the trees, a sweep for a scan of the process table; all are well under this.
DEFAULT_TIMEOUT_S = 30.0

# Notifications kept for `next_notification()`; older ones are dropped, so a
# client that never asks does not grow without bound.
NOTIFICATION_BACKLOG = 1024

# After a failed send, how long to let the reader pick up the reason the daemon
# gave for closing (a refusal is sent just before the close).
REFUSAL_GRACE_S = 1.0


def default_socket() -> str:
    """`$ADAPTER_SUPERVISOR_SOCKET`, else the default socket path for this user."""
    return os.environ.get("ADAPTER_SUPERVISOR_SOCKET") or daemonconfig.default_socket_path()


# Largest number of file descriptors one read may carry (one response has two).
MAX_FDS = 4

# The daemon passes stdin's write end and stdout's read end with an fds acquire.
FDS_PER_LEASE = 2

RECEIVE_BYTES = 65536

# msgspec's JSON, as the daemon's: the codec runs on the client's side of every
# round trip, and msgspec's costs less there than the json module's.
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to request `id`: `result` (with the fds it carried) or `error`."""

    id: int
    method: str
    result: Any = None
    # A DaemonError, or ConnectionLost for an answer that will never come.
    error: Exception | None = None
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Notice:
    """A notification: `method` and `params`, and `message`, the whole object."""

    method: str
    params: Mapping[str, Any]
    message: dict[str, Any]


@dataclass(frozen=True)
class Refusal:
    """An error without an id: the daemon refuses the connection and closes it."""

    error: DaemonError


@dataclass(frozen=True)
class Stray:
    """A successful answer nobody waits for (its caller timed out or was
    cancelled): close `fds` and release `lease`, if any."""

    lease: str | None
    fds: tuple[int, ...]


Incoming = Reply | Notice | Refusal | Stray


class Session:
    """The state of one connection, without I/O: request ids, line framing, which
    fds belong to which answer, and the requests whose callers stopped waiting.

    File descriptors travel on the first byte of their response line, so they
    arrive no later than the line. Only a successful `acquire` with `fds: true`
    carries them, two per answer, so they are handed to those answers in order.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._methods: dict[int, str] = {}
        self._expects_fds: set[int] = set()
        self._abandoned: set[int] = set()

    def request(self, method: str, params: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
        """A new request: its id and the line to send. Raises TypeError if
        `params` holds a value JSON cannot encode."""
        request_id = next(self._ids)
        self._methods[request_id] = method
        if method == "acquire" and params and params.get("fds"):
            self._expects_fds.add(request_id)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": dict(params or {})}
        return request_id, _encode(message) + b"\n"

    def abandon(self, request_id: int) -> None:
        """Nobody waits for `request_id` any more: its answer becomes a `Stray`."""
        if request_id in self._methods:
            self._abandoned.add(request_id)

    def release_line(self, lease: str) -> bytes:
        """The line of a `release` of `lease` that nobody waits for (its answer
        becomes a `Stray`): how a client gives back a lease it did not want."""
        request_id, line = self.request("release", {"lease": lease})
        self.abandon(request_id)
        return line

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Incoming]:
        """Take bytes (and the fds read with them); return what they complete.

        Raises ConnectionLost if the daemon sent something that is not JSON-RPC
        (the connection cannot be trusted after that).
        """
        if fds:
            self._fds.extend(fds)
        if not self._buffer and data[:1] == b"{" and data.find(b"\n") == len(data) - 1:
            # The common case, one whole message in one read: no buffer copies.
            return [self._interpret(data)]
        self._buffer += data
        incoming: list[Incoming] = []
        while (newline := self._buffer.find(b"\n")) != -1:
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if line.strip():
                incoming.append(self._interpret(line))
        return incoming

    def leftover_fds(self) -> list[int]:
        """Fds received but not handed out (the caller closes them)."""
        fds = list(self._fds)
        self._fds.clear()
        return fds

    def _interpret(self, line: bytes) -> Incoming:
        try:
            message = _decode(line)
        except ValueError as exc:  # msgspec.DecodeError is one
            raise ConnectionLost(f"the daemon sent a line that is not JSON ({exc}): {line[:200]!r}") from exc
        if not isinstance(message, dict):
            raise ConnectionLost(f"the daemon sent a line that is not a JSON-RPC message: {line[:200]!r}")
        if "id" not in message:
            params = message.get("params")
            return Notice(str(message.get("method", "")), params if isinstance(params, dict) else {}, message)
        request_id = message["id"]
        if request_id is None:
            return Refusal(error_from_wire(message.get("error")))
        method = self._methods.pop(request_id, None)
        if method is None:
            raise ConnectionLost(f"the daemon answered request {request_id!r}, which was never sent")
        fds: tuple[int, ...] = ()
        if request_id in self._expects_fds:
            self._expects_fds.discard(request_id)
            if "error" not in message:
                fds = tuple(self._fds.popleft() for _ in range(min(FDS_PER_LEASE, len(self._fds))))
        if request_id in self._abandoned:
            self._abandoned.discard(request_id)
            result = message.get("result")
            lease = result.get("lease") if method == "acquire" and isinstance(result, dict) else None
            return Stray(lease if "error" not in message else None, fds)
        if "error" in message:
            return Reply(request_id, method, error=error_from_wire(message["error"]))
        return Reply(request_id, method, result=message.get("result"), fds=fds)


def receive_with_fds(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int]]:
    """One read: the bytes and the fds that came with them, close-on-exec.
    `flags` adds recvmsg flags (MSG_DONTWAIT for one read that must not block).

    Raises OSError (BlockingIOError when there is nothing and the read may not block).
    """
    data, ancillary, _flags, _address = sock.recvmsg(RECEIVE_BYTES, _ANCILLARY_BYTES, _RECEIVE_FLAGS | flags)
    if not ancillary:
        return data, []
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


# Computed once: the socket module's flags are enums, and or-ing them per read
# costs more than the read's bookkeeping.
_ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_RECEIVE_FLAGS = int(socket.MSG_CMSG_CLOEXEC)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def stray_of(reply: Reply) -> Stray:
    """What is left of a successful answer its caller gave up on: its fds,
    and the lease it granted, if it was an `acquire`."""
    lease = reply.result.get("lease") if reply.method == "acquire" and isinstance(reply.result, dict) else None
    return Stray(lease, reply.fds)
