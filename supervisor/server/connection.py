"""One client connection of the control socket: `Connection`.

It sends whole lines: responses, and notifications queued by whoever has
news for the peer, never interleave within a line, and a line cut off in
mid-send closes the connection, since nothing after it could be framed. It
also bounds the requests the peer may have in flight.
"""

from __future__ import annotations

import array
import socket as stdlib_socket
from dataclasses import dataclass, field

import structlog
import trio

from supervisor import afterreply
from supervisor.core import protocol

log = structlog.get_logger()

# Requests with a task of their own (not `api.answers_at_once`) one connection
# may have in flight; past it the daemon stops reading that connection until one
# finishes, so a pipelining peer cannot queue unbounded work (each `acquire` may
# spawn, each `sweep` scans). The rest need no bound: the reader answers them
# one at a time.
MAX_IN_FLIGHT = 64


@dataclass
class Connection:
    """One client connection. Implements `supervisor.daemon.Peer`.

    `sock` is a plain non-blocking stdlib socket, not a trio socket: the
    reader, the hub and `send` call it directly and wait with
    `trio.lowlevel.wait_readable` / `wait_writable` only when it would block,
    so a request that needs no waiting costs no checkpoint per socket call,
    lock and cancel scope. Whoever closes the fd must call
    `trio.lowlevel.notify_closing` first (see `ControlServer._serve_connection`).
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
    # Held while a line is under way but not whole. A semaphore rather than a
    # trio.Lock, which only its owner may release: the hub may start a line
    # that the connection's task finishes.
    send_lock: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(1, max_value=1))
    in_flight: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(MAX_IN_FLIGHT))
    closed: bool = False

    @property
    def sending(self) -> bool:
        """Whether a line is under way (and others must wait for the lock)."""
        return self.send_lock.value == 0

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
        if self.sending:
            afterreply.run_now()
            await self.send_lock.acquire()
            await self.finish_line(memoryview(line), 0, fds)
            return
        # No checkpoint between the check above and this send, so no other
        # task can start a line in between: a line the socket takes whole needs
        # no lock at all.
        sent = self.try_send(line, fds)
        if sent is not None and sent < len(line):
            await self.finish_line(memoryview(line), sent, fds)

    def try_send(self, line: bytes, fds: tuple[int, ...] = ()) -> int | None:
        """Send `line` without waiting if no other line is under way. Returns
        None if one is (nothing was sent: use `send`); else how much of the
        line is out. If not all of it, the send lock is now held for the rest
        and the caller must `finish_line`. A connection that is closed, or
        that fails now (and is closed), counts as having taken the whole line.
        If the line is cut off, the request's deferred work runs before this
        returns (the rest of its reply will wait for the peer)."""
        if self.sending:
            return None
        if self.closed:
            return len(line)
        try:
            sent = self._send_now(memoryview(line), fds)
        except OSError:
            self.close()
            return len(line)
        if sent < len(line):
            self.send_lock.acquire_nowait()
            afterreply.run_now()
        return sent

    async def finish_line(self, line: memoryview, sent: int, fds: tuple[int, ...]) -> None:
        """Send `line` from byte `sent` on, holding the send lock (which this
        releases), as the peer makes room. Closes the connection if the peer
        goes away, or does not take the rest within `send_timeout`.
        Cancellation: releases the lock; a line left cut off closes the
        connection."""
        try:
            await self._send_rest(line, sent, fds)
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
