"""The control socket: connections, authorization, and the one error boundary.

Each connection has a reader that feeds bytes to the sans-IO decoder and starts
one task per request (so responses may come out of order), and a send lock so
responses and notifications never interleave within a line. Exceptions become
wire errors here and nowhere else; tracebacks go to the log.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import resource
import socket as stdlib_socket
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from supervisor import api, protocol
from supervisor.config import DaemonConfig
from supervisor.daemon import Supervisor
from supervisor.errors import (
    LimitReached,
    PermissionDenied,
    ShuttingDown,
    SupervisorError,
)

log = structlog.get_logger()

# Bytes read from a client per receive call.
RECEIVE_BYTES = 65536

# A refused peer gets its error line, then the socket is closed after at most
# this long even if it never reads.
REFUSE_TIMEOUT_S = 1.0

# Requests one connection may have in flight; past it the daemon stops reading
# that connection until one finishes, so a pipelining peer cannot queue
# unbounded work (each `status` or `sweep` costs a scan).
MAX_IN_FLIGHT = 64

ROOT_UID = 0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# SO_PEERGROUPS (Linux >= 4.13, <asm-generic/socket.h>): the peer's supplementary
# groups as of connect(). Python does not export the constant.
SO_PEERGROUPS = getattr(stdlib_socket, "SO_PEERGROUPS", 59)

# Room for this many supplementary groups: CPython's getsockopt takes at most
# 1024 bytes. A peer in more groups is judged by uid and primary gid only (the
# kernel answers ERANGE rather than a partial list).
MAX_PEER_GROUPS = 256


@dataclass
class Connection:
    """One client connection. Implements `supervisor.daemon.Peer`."""

    id: int
    sock: trio.socket.SocketType
    pid: int
    uid: int
    gid: int
    # Where notification sends run: the server's nursery, which outlives every
    # connection (a connection's own nursery may already be closing when some
    # other request's outcome concerns it).
    notify_nursery: trio.Nursery
    # A peer that does not read for this long is dropped: one stuck peer must
    # not pin tasks and memory forever (daemon.send_timeout).
    send_timeout: float = 10.0
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    in_flight: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(MAX_IN_FLIGHT))
    closed: bool = False

    def notify(self, method: str, params: object) -> None:
        """Queue a notification; never blocks, never raises."""
        if not self.closed:
            self.notify_nursery.start_soon(self.send, protocol.encode_notification(method, params))

    async def send(self, line: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send one whole line (with fds on its first byte). A peer that went away
        or stopped reading closes the connection; nothing is raised."""
        if self.closed:
            return
        async with self.send_lock:
            with trio.move_on_after(self.send_timeout) as scope:
                try:
                    view = memoryview(line)
                    if fds:
                        ancillary = [(stdlib_socket.SOL_SOCKET, stdlib_socket.SCM_RIGHTS, array.array("i", fds))]
                        sent = await self.sock.sendmsg([view], ancillary)
                        view = view[sent:]
                    while view:
                        sent = await self.sock.send(view)
                        view = view[sent:]
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    self.close()
            if scope.cancelled_caught:
                log.warning("connection.send_timeout", connection=self.id)
                self.close()

    def close(self) -> None:
        """Stop talking to the peer. The fd itself is closed by the connection's
        own task when it ends: closing it here, under a reader blocked in recv,
        would hand that task a ClosedResourceError instead of an end of input."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(stdlib_socket.SHUT_RDWR)
            except OSError:
                pass  # already disconnected


class ControlServer:
    """Accepts clients on the control socket and serves their requests."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self._ids = itertools.count(1)
        self.connections: dict[int, Connection] = {}
        self._listen_scope: trio.CancelScope | None = None

    async def serve(
        self, listener: trio.socket.SocketType, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept until `stop_accepting`, then keep serving open connections until
        cancelled. Cancellation closes every connection (their leases are released)."""
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as self._listen_scope:
                task_status.started()
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.error("server.accept_failed", error=os.strerror(exc.errno))
                            await trio.sleep(0.1)
                            continue
                        raise
                    nursery.start_soon(self._serve_connection, sock, nursery)
            listener.close()
            await trio.sleep_forever()

    def stop_accepting(self) -> None:
        if self._listen_scope is not None:
            self._listen_scope.cancel()

    async def _serve_connection(self, sock: trio.socket.SocketType, server_nursery: trio.Nursery) -> None:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _UCRED.size))
        refusal: SupervisorError | None = None
        if not self._allowed(uid, {gid, *_peer_groups(sock)}):
            refusal = PermissionDenied(
                f"uid {uid} / gid {gid} may not use this daemon; add it to allowed_uids or allowed_gids"
            )
        elif self.supervisor.shutting_down:
            refusal = ShuttingDown("the daemon is shutting down")
        elif len(self.connections) >= self._connection_limit():
            refusal = LimitReached(
                f"the daemon already serves {len(self.connections)} connections "
                f"(max_connections {self.config.max_connections}, or half its open-file limit)"
            )
        if refusal is not None:
            log.warning("connection.refused", pid=pid, uid=uid, gid=gid, code=refusal.code, reason=refusal.message)
            with trio.move_on_after(REFUSE_TIMEOUT_S):
                try:
                    await sock.send(protocol.encode_error(None, refusal))
                except OSError:
                    pass
            sock.close()
            return
        connection: Connection | None = None
        try:
            async with trio.open_nursery() as nursery:
                connection = Connection(
                    id=next(self._ids), sock=sock, pid=pid, uid=uid, gid=gid, notify_nursery=server_nursery,
                    send_timeout=self.config.send_timeout,
                )
                self.connections[connection.id] = connection
                self.supervisor.connected(connection)
                log.info("connection.opened", connection=connection.id, pid=pid, uid=uid)
                if not await self._read_requests(connection, nursery):
                    nursery.cancel_scope.cancel()
                # On a clean end of input the requests in flight still get their
                # answers (a client may half-close after its last request).
        finally:
            sock.close()
            if connection is not None:
                connection.close()
                del self.connections[connection.id]
                self.supervisor.disconnected(connection)
                log.info("connection.closed", connection=connection.id)

    async def _read_requests(self, connection: Connection, nursery: trio.Nursery) -> bool:
        """Read and start requests. True on a clean end of input, False when the
        connection must close at once (reset, fatal protocol error)."""
        decoder = protocol.Decoder(self.config.max_message_bytes)
        while not connection.closed:
            try:
                data = await connection.sock.recv(RECEIVE_BYTES)
            except (OSError, trio.ClosedResourceError):
                return False
            if not data:
                return True
            for message in decoder.feed(data):
                if isinstance(message, protocol.BadMessage):
                    self.supervisor.metrics.protocol_errors.labels(str(message.error.code)).inc()
                    log.info("request.rejected", connection=connection.id, code=message.error.code, reason=message.error.message)
                    await connection.send(protocol.encode_error(message.id, message.error))
                    if message.fatal:
                        return False
                    continue
                # Backpressure: a peer cannot have more than this many
                # requests in flight; the next line waits to be read.
                await connection.in_flight.acquire()
                if message.method in api.INLINE:
                    await self._serve_request(connection, message)
                else:
                    await nursery.start(self._serve_request, connection, message)
        return False

    async def _serve_request(
        self, connection: Connection, request: protocol.Request, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        fds: tuple[int, ...] = ()
        try:
            try:
                result: Any = await api.handle(self.supervisor, connection, request, mark_started)
                if isinstance(result, api.FdsResult):
                    result, fds = result.result, result.fds
                line = protocol.encode_result(request.id, result)
            except SupervisorError as exc:
                self.supervisor.metrics.protocol_errors.labels(str(exc.code)).inc()
                log.info("request.failed", connection=connection.id, method=request.method, code=exc.code, reason=exc.message)
                line = protocol.encode_error(request.id, exc)
            except Exception:
                # A bug, not a client's mistake: log it whole, answer without details.
                log.exception("request.crashed", connection=connection.id, method=request.method)
                line = protocol.encode_error(request.id, SupervisorError("internal error; see the daemon's log"))
            mark_started()
            await connection.send(line, fds)
        finally:
            # The fds of an FdsResult are duplicates made for this one response.
            for fd in fds:
                os.close(fd)
            connection.in_flight.release()

    def _connection_limit(self) -> int:
        """max_connections, but never more than half the open-file limit: the
        other half stays for pipes, pidfds and /proc reads, without which trees
        cannot be stopped."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.config.max_connections
        return min(self.config.max_connections, soft // 2)

    @property
    def config(self) -> DaemonConfig:
        """The daemon section in force (a reload may replace it)."""
        return self.supervisor.config.daemon

    def _allowed(self, uid: int, gids: set[int]) -> bool:
        return (
            uid in (ROOT_UID, os.geteuid())
            or uid in self.config.allowed_uids
            or not gids.isdisjoint(self.config.allowed_gids)
        )


def _peer_groups(sock: trio.socket.SocketType) -> list[int]:
    """The peer's supplementary groups (empty where the kernel cannot tell)."""
    try:
        raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
    except OSError:
        return []
    return list(array.array("I", raw[: len(raw) - len(raw) % 4]))


async def bind_control_socket(path: str, mode: int) -> trio.socket.SocketType:
    """Create, bind and listen on the control socket at `path` with `mode`.

    A stale socket file (nobody answers on it) is replaced; a live one raises
    `OSError(EADDRINUSE)`, since two daemons must never share a socket.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise OSError(errno.EADDRINUSE, f"another daemon is already serving on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    # No window in which the socket file is more open than `mode` allows.
    old_umask = os.umask(0o777 & ~mode)
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(stdlib_socket.SOMAXCONN)
    return sock
