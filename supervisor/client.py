"""A small blocking client for the control socket.

One request at a time per `Client`; notifications that arrive while waiting
for a response are kept in `notifications`. Errors from the daemon are raised
as `DaemonError` carrying the daemon's code and message.
"""

from __future__ import annotations

import array
import itertools
import json
import os
import socket
from typing import Any

from supervisor import config as config_module

# Largest number of file descriptors one response may carry (stdin + stdout).
MAX_FDS = 4

RECEIVE_BYTES = 65536


class DaemonError(Exception):
    """The daemon answered a request with an error."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"{message} (error {code})")
        self.code = code
        self.message = message
        self.data = data


class ConnectionLost(Exception):
    """The daemon closed the connection before answering."""


def default_socket() -> str:
    """`$ADAPTER_SUPERVISOR_SOCKET`, else the default socket path for this user."""
    return os.environ.get("ADAPTER_SUPERVISOR_SOCKET") or config_module.default_socket_path()


class Client:
    """A connection to the daemon. Use as a context manager or call `close`."""

    def __init__(self, path: str | None = None, *, timeout: float | None = 30.0) -> None:
        self.path = path or default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            raise
        self._ids = itertools.count(1)
        self._buffer = b""
        self._fds: list[int] = []
        self.notifications: list[dict[str, Any]] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result; raises DaemonError or ConnectionLost."""
        result, _ = self.call_with_fds(method, params)
        return result

    def call_with_fds(self, method: str, params: dict[str, Any] | None = None) -> tuple[Any, list[int]]:
        """Like `call`, also returning file descriptors passed with the response
        (the caller owns and must close them)."""
        request_id = next(self._ids)
        line = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}})
        self.sock.sendall(line.encode() + b"\n")
        while True:
            message = self._next_message()
            if "id" not in message:
                self.notifications.append(message)
                continue
            if message.get("id") not in (request_id, None):
                continue
            fds, self._fds = self._fds, []
            if "error" in message:
                for fd in fds:
                    os.close(fd)
                error = message["error"]
                raise DaemonError(error.get("code", 0), error.get("message", ""), error.get("data"))
            return message.get("result"), fds

    def next_notification(self) -> dict[str, Any]:
        """Block until the daemon sends a notification (or return a queued one)."""
        if self.notifications:
            return self.notifications.pop(0)
        while True:
            message = self._next_message()
            if "id" not in message:
                return message

    def _next_message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            fds = array.array("i")
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                RECEIVE_BYTES, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % fds.itemsize
                    fds.frombytes(payload[:usable])
            for fd in fds:
                os.set_inheritable(fd, False)
            self._fds.extend(fds)
            if not data:
                raise ConnectionLost("the daemon closed the connection")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)
