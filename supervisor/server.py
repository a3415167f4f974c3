"""The control socket: connections, authorization, and the one error boundary.

Each connection has a reader that feeds bytes to the sans-IO decoder, answers
the requests that never wait (`api.answers_at_once`: the INLINE methods, and
acquires that need no wait) itself and starts one task for each other request
(so responses may come out of order), and a send lock so responses and
notifications never interleave within a line. Exceptions become
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

from supervisor import afterreply, api, protocol
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

# Requests with a task of their own (not `api.answers_at_once`) one connection
# may have in flight; past it the daemon stops reading that connection until one
# finishes, so a pipelining peer cannot queue unbounded work (each `acquire` may
# spawn, each `sweep` scans). The rest need no bound: the reader answers them
# one at a time.
MAX_IN_FLIGHT = 64

# Lines a reader serves from one batch before it lets other connections have a
# turn: a peer that pipelines a whole receive buffer of cheap requests (a
# thousand `hello`s) must not hold every other client up for the tens of ms
# that take, while an ordinary batch costs no yield beyond the read's own.
ANSWERS_PER_TURN = 32

# After a read that let other tasks run first found nothing, this many reads
# wait for readability before the next such try (see _read_requests).
READS_BEFORE_RETRY = 16

ROOT_UID = 0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# SO_PEERGROUPS (Linux >= 4.13, <asm-generic/socket.h>): the peer's supplementary
# groups as of connect(). Python does not export the constant.
SO_PEERGROUPS = getattr(stdlib_socket, "SO_PEERGROUPS", 59)

# Room for this many supplementary groups: CPython's getsockopt takes at most
# 1024 bytes. A peer in more groups is judged by uid and primary gid only (the
# kernel answers ERANGE rather than a partial list).
MAX_PEER_GROUPS = 256


def _no_task_to_start() -> None:
    """`started` for a request answered in the reader: nobody awaits its start."""


@dataclass
class Connection:
    """One client connection. Implements `supervisor.daemon.Peer`.

    `sock` is a plain non-blocking stdlib socket, not a trio socket: the reader
    and `send` call it directly and wait with `trio.lowlevel.wait_readable` /
    `wait_writable` only when it would block, so a request that needs no
    waiting costs one scheduler turn (the reader's wait for its bytes) instead
    of a checkpoint per socket call, lock and cancel scope. Whoever closes the
    fd must call `trio.lowlevel.notify_closing` first (see `_serve_connection`).
    """

    id: int
    sock: stdlib_socket.socket
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
        or stopped reading closes the connection; nothing is raised.

        When no other send is under way and the socket takes the whole line at
        once, this returns without a checkpoint. Otherwise it waits for the send
        lock, then (holding it) up to `send_timeout` for the peer to take the
        rest. Before either wait, the request's work deferred until after its
        reply runs (`afterreply.run_now`). Cancellation: a line not begun is
        not sent; a line cut off after its first byte closes the connection,
        since nothing after it could be framed.
        """
        if self.closed:
            return
        view = memoryview(line)
        if self.send_lock.locked():
            afterreply.run_now()
            await self.send_lock.acquire()
            sent = 0
        else:
            # No checkpoint between this check and the send, so no other task
            # can start a line in between: a line the socket takes whole needs
            # no lock at all. (A free trio.Lock has no waiters: release hands
            # it straight to the next one.)
            try:
                sent = self._send_now(view, fds)
            except OSError:
                self.close()
                return
            if sent == len(view):
                return
            self.send_lock.acquire_nowait()
            afterreply.run_now()
        try:
            await self._send_rest(view, sent, fds)
        except (OSError, trio.ClosedResourceError):
            self.close()
        finally:
            self.send_lock.release()

    async def _send_rest(self, line: memoryview, sent: int, fds: tuple[int, ...]) -> None:
        """Send `line` from byte `sent` on as the peer makes room; the caller
        holds the send lock. Closes the connection if the rest is not taken
        within `send_timeout`, or if the line is left cut off for any reason.
        Raises OSError, or trio.ClosedResourceError if the fd is closed meanwhile."""
        with trio.move_on_after(self.send_timeout) as scope:
            try:
                while sent < len(line) and not self.closed:
                    await trio.lowlevel.wait_writable(self.sock)
                    sent += self._send_now(line[sent:], () if sent else fds)
            finally:
                if 0 < sent < len(line):
                    self.close()
        if scope.cancelled_caught:
            log.warning("connection.send_timeout", connection=self.id)
            self.close()

    def _send_now(self, view: memoryview, fds: tuple[int, ...]) -> int:
        """Send what the socket takes without blocking; returns the bytes sent
        (0 if none fit). The fds go with the first byte. Raises OSError."""
        try:
            if fds:
                ancillary = [(stdlib_socket.SOL_SOCKET, stdlib_socket.SCM_RIGHTS, array.array("i", fds))]
                return self.sock.sendmsg([view], ancillary)
            return self.sock.send(view)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Stop talking to the peer. The fd itself is closed by the connection's
        own task when it ends: closing it here, under a reader waiting for
        input, would wake that task with a ClosedResourceError instead of an
        end of input."""
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
        # The connection works on the plain socket under the trio wrapper (see
        # `Connection`). Detaching, rather than reaching into the wrapper, leaves
        # one owner of the fd, and that owner closes it below the way trio's own
        # close does: notify_closing first, so that a task still waiting on the
        # fd (a notification waiting for room) is woken instead of waiting on a
        # number the kernel may hand to the next client.
        plain = stdlib_socket.socket(fileno=sock.detach())
        plain.setblocking(False)
        connection = Connection(
            id=next(self._ids), sock=plain, pid=pid, uid=uid, gid=gid, notify_nursery=server_nursery,
            send_timeout=self.config.send_timeout,
        )
        self.connections[connection.id] = connection
        self.supervisor.connected(connection)
        log.info("connection.opened", connection=connection.id, pid=pid, uid=uid)
        try:
            async with trio.open_nursery() as nursery:
                if not await self._read_requests(connection, nursery):
                    nursery.cancel_scope.cancel()
                # On a clean end of input the requests in flight still get their
                # answers (a client may half-close after its last request).
        finally:
            connection.close()
            trio.lowlevel.notify_closing(plain)
            plain.close()
            del self.connections[connection.id]
            self.supervisor.disconnected(connection)
            log.info("connection.closed", connection=connection.id)

    async def _read_requests(self, connection: Connection, nursery: trio.Nursery) -> bool:
        """Read and serve requests. True on a clean end of input, False when the
        connection must close at once (reset, fatal protocol error).

        Each read waits for the socket to be readable and then takes everything
        there is, so the reader yields to the scheduler once per batch of lines
        (which keeps connections taking turns) and not once per socket call.
        Requests that never wait (`api.answers_at_once`) are answered right
        here, in order, without a task.
        Cancellation: returns nothing, raises Cancelled.
        """
        decoder = protocol.Decoder(self.config.max_message_bytes)
        sock = connection.sock
        # Whether the next read first lets every other task run and then just
        # reads. Under load (many clients, a round of other requests between
        # two of this peer's) the next line is there by then, and this saves
        # arming epoll for it (a sixth of a request's CPU). When nothing is
        # there, reads wait for readability for the next READS_BEFORE_RETRY.
        read_after_others = False
        waited_reads = 0
        while not connection.closed:
            try:
                if read_after_others:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(sock)
                data = sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                read_after_others = False
                waited_reads = 0
                continue  # nothing yet: wait for readability
            except (OSError, trio.ClosedResourceError):
                return False
            if not read_after_others:
                waited_reads += 1
                read_after_others = waited_reads > READS_BEFORE_RETRY and len(self.connections) > 1
            if not data:
                return True
            answered = 0
            for message in decoder.feed(data):
                if isinstance(message, protocol.BadMessage):
                    self.supervisor.metrics.protocol_errors.labels(str(message.error.code)).inc()
                    log.info("request.rejected", connection=connection.id, code=message.error.code, reason=message.error.message)
                    await connection.send(protocol.encode_error(message.id, message.error))
                    if message.fatal:
                        return False
                elif api.answers_at_once(self.supervisor, message):
                    # No in-flight slot: the reader reads nothing more until
                    # this is answered, so these cannot pile up. (INLINE
                    # methods, and acquires that need not wait.)
                    await self._serve_request(connection, message)
                else:
                    # Backpressure: a peer cannot have more than MAX_IN_FLIGHT
                    # of these running; the next line waits to be read.
                    try:
                        connection.in_flight.acquire_nowait()
                    except trio.WouldBlock:
                        await connection.in_flight.acquire()
                    await nursery.start(self._serve_in_task, connection, message)
                answered += 1
                if answered % ANSWERS_PER_TURN == 0:
                    await trio.lowlevel.checkpoint()
        return False

    async def _serve_in_task(
        self, connection: Connection, request: protocol.Request, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """`_serve_request` in a task of its own, holding one of the connection's
        in-flight slots until answered. Started once the request's state changes
        are made, so pipelined requests change state in arrival order."""
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        try:
            await self._serve_request(connection, request, mark_started)
        finally:
            connection.in_flight.release()

    async def _serve_request(
        self, connection: Connection, request: protocol.Request, started: api.Started = _no_task_to_start
    ) -> None:
        """Run `request`'s handler and send its answer: the result, or the wire
        error for what it raised (the one place exceptions become wire errors).
        Calls `started` at the latest before sending. Raises nothing but
        Cancelled; returns without a checkpoint when the handler and the send
        need no wait. What an acquire's handler `defer`red runs after the send
        (no other method spawns, and the block costs every request a few us)."""
        if request.method != "acquire":
            await self._answer(connection, request, started)
            return
        with afterreply.deferring():
            await self._answer(connection, request, started)

    async def _answer(self, connection: Connection, request: protocol.Request, started: api.Started) -> None:
        fds: tuple[int, ...] = ()
        try:
            try:
                result: Any = await api.handle(self.supervisor, connection, request, started)
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
            started()
            await connection.send(line, fds)
        finally:
            # The fds of an FdsResult are duplicates made for this one response.
            for fd in fds:
                os.close(fd)

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
