"""One client connection of the control socket: `Connection`.

It sends whole lines: responses, and notifications queued by whoever has
news for the peer, never interleave within a line, and a line cut off in
mid-send closes the connection, since nothing after it could be framed. It
also bounds the requests the peer may have in flight.
"""

from __future__ import annotations

import array
import os
import socket as stdlib_socket
from dataclasses import dataclass, field

import structlog
import trio

from supervisor.core import protocol

log = structlog.get_logger()

# Requests with a task of their own (`Waits.LONG`, not answerable at once) one connection
# may have in flight; past it the daemon stops reading that connection until one
# finishes, so a pipelining peer cannot queue unbounded work (each `acquire` may
# spawn, each `sweep` scans). The rest need no bound: the reader answers them
# one at a time.
MAX_IN_FLIGHT = 64


@dataclass
class Connection:
    """One client connection. Implements `supervisor.engine.engine.Peer`.

    `sock` is a plain non-blocking stdlib socket, not a trio socket: the
    reader, the hub and `send` call it directly and wait with
    `trio.lowlevel.wait_readable` / `wait_writable` only when it would block,
    so a request that needs no waiting costs no checkpoint per socket call,
    lock and cancel scope. Whoever closes the fd must call
    `trio.lowlevel.notify_closing` first (see `ControlServer._serve_connection`).

    Lines go out whole and in order. A line the socket took only in part is
    held as `unsent` until someone finishes it (`flush`, or the next `send`);
    no other line starts meanwhile. The send lock is held only by a task that
    is waiting for the peer to make room, and only that task releases it.
    File descriptors handed over with a line belong to the connection from
    then on: it closes them once the line is sent, or dropped.
    """

    id: int
    sock: stdlib_socket.socket
    pid: int
    uid: int
    gid: int
    # Where notification sends run: the server's nursery, which outlives every
    # connection (a connection's own nursery may already be closing when some
    # other request's outcome concerns it). None until the server serves (a
    # connection handed over by an upgrade exists before): lines queued
    # meanwhile wait in `_early`.
    notify_nursery: trio.Nursery | None
    # A peer that does not read for this long is dropped: one stuck peer must
    # not pin tasks and memory forever (daemon.send_timeout).
    send_timeout: float = 10.0
    # The peer's supplementary groups at connect() (SO_PEERGROUPS): a reload
    # that narrows allowed_gids is judged against them.
    groups: tuple[int, ...] = ()
    # Bytes the peer took so far: whether a slow peer is making progress.
    sent_bytes: int = 0
    in_flight: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(MAX_IN_FLIGHT))
    closed: bool = False
    _send_lock: trio.Lock = field(default_factory=trio.Lock)
    # A line begun and not finished: (the line, bytes sent, its fds).
    _unsent: tuple[memoryview, int, tuple[int, ...]] | None = None
    _early: list[bytes] = field(default_factory=list)

    @property
    def sending(self) -> bool:
        """Whether a line is under way, so a new one must wait its turn (`send`)."""
        return self._unsent is not None or self._send_lock.locked()

    @property
    def has_unsent(self) -> bool:
        """Whether a line was begun and not finished: `flush` finishes it."""
        return self._unsent is not None

    def notify(self, method: str, params: object) -> None:
        """Queue a notification; never blocks, never raises."""
        self.queue_line(protocol.encode_notification(method, params))

    def queue_line(self, line: bytes) -> None:
        """Queue a whole line to send; never blocks, never raises."""
        if self.closed:
            return
        if self.notify_nursery is None:
            self._early.append(line)
        else:
            self.notify_nursery.start_soon(self.send, line)

    def start_sending(self, nursery: trio.Nursery) -> None:
        """Send queued lines from now on in `nursery`, the early ones first."""
        self.notify_nursery = nursery
        early, self._early = self._early, []
        for line in early:
            self.queue_line(line)

    async def send(self, line: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send one whole line (with fds on its first byte), after any line
        under way. A peer that went away or stopped reading for `send_timeout`
        closes the connection; nothing is raised.

        When no line is under way and the socket takes the whole line at once,
        this returns without a checkpoint. Cancellation: a line not begun is
        not sent; a line cut off after its first byte closes the connection,
        since nothing after it could be framed.
        """
        if not self.sending:
            # No checkpoint between the check above and this send, so no
            # other task can start a line in between.
            self.try_send(line, fds)
            if self._unsent is not None:
                await self.flush()
            return
        try:
            async with self._send_lock:
                await self._finish_unsent()
                if not self.closed:
                    self._unsent, fds = (memoryview(line), 0, fds), ()
                    await self._finish_unsent()
        finally:
            _close_all(fds)

    def try_send(self, line: bytes, fds: tuple[int, ...] = ()) -> bool:
        """Take `line` without waiting, unless another line is under way
        (then False, and nothing was sent: use `send`). True means the line
        is the connection's: sent whole, or begun and held as unsent for
        `flush` to finish (see `has_unsent`), or dropped because the
        connection is closed or has just failed (and is now closed). The fds
        are the connection's unless this returns False."""
        if self.sending:
            return False
        if self.closed:
            _close_all(fds)
            return True
        try:
            sent = self._send_now(memoryview(line), fds)
        except OSError:
            self.close()
            _close_all(fds)
            return True
        if sent < len(line):
            self._unsent = (memoryview(line), sent, fds)
        else:
            _close_all(fds)
        return True

    async def flush(self) -> None:
        """Finish the line under way, if any, as the peer makes room. Closes
        the connection if the peer goes away or does not take the rest within
        `send_timeout`. Cancellation: a line left cut off closes the connection."""
        if self._unsent is None:
            return
        async with self._send_lock:
            await self._finish_unsent()

    async def _finish_unsent(self) -> None:
        """Send the rest of the unsent line; the caller holds the send lock."""
        if self._unsent is None:
            return
        line, sent, fds = self._unsent
        try:
            await self._send_rest(line, sent, fds)
        except (OSError, trio.ClosedResourceError):
            self.close()
        finally:
            self._unsent = None
            _close_all(fds)

    async def _send_rest(self, line: memoryview, sent: int, fds: tuple[int, ...]) -> None:
        """Send `line` from byte `sent` on as the peer makes room. Closes the
        connection if the rest is not taken within `send_timeout`, or if the
        line is left cut off for any reason. Raises OSError, or
        trio.ClosedResourceError if the fd is closed meanwhile."""
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
                sent = self.sock.sendmsg([view], ancillary)
            else:
                sent = self.sock.send(view)
        except BlockingIOError:
            return 0
        self.sent_bytes += sent
        return sent

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


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)
