"""How a blocking `Client` uses its connection: sending a line, the reading
role (one thread at a time reads the socket: a caller waiting for its answer
when it can, the reader thread otherwise), the routing of what arrives to
waiting callers, leases and the notification queue, answers nobody waits for
any more, the end of the connection, and with `resume` the reconnection in
the reader thread. `_Connection` holds these methods for `Client`, whose
`__init__` makes the state they share (see its docstring).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from supervisor.client.errors import ConnectionLost, DaemonError, fresh_error
from supervisor.client.messages import SHUTDOWN_REASON, AdapterExited
from supervisor.client.lease import run_callback
from supervisor.client.resume import RECONNECT_INTERVAL_S, Reconnected, attempt_timeout, reconnect_and_resume, resumed_notice
from supervisor.client.session import Notice, Refusal, Reply, Session, Stray, close_fds, receive_with_fds, stray_of

# A read whose wait is this close to the client's full timeout relies on the
# socket's receive timeout (set to it) instead of a poll: at most this late.
FULL_WAIT_SLACK_S = 0.05

# As plain ints: the select and socket modules' constants are enums, slow to combine.
_READABLE = int(select.EPOLLIN)
_DONT_WAIT = int(socket.MSG_DONTWAIT)


class _ClientSocket(socket.socket):
    """A socket whose `close` shuts it down first. Closing alone would leave a
    thread blocked in recvmsg or epoll holding the connection open, so neither it
    nor the daemon would see it end; the shutdown wakes both."""

    def close(self) -> None:
        if self.fileno() != -1:
            with contextlib.suppress(OSError):  # not connected any more
                self.shutdown(socket.SHUT_RDWR)
        super().close()


class _Waiter:
    """A caller waiting for the answer to one request. A caller that does not
    read (`lead` false) sleeps until `wake`: its answer arrived, or the reading
    role was handed to it. A caller that reads from the start needs no event."""

    __slots__ = ("_event", "lead", "reply")

    def __init__(self, *, lead: bool) -> None:
        self.lead = lead
        self.reply: Reply | None = None
        self._event = None if lead else threading.Event()

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()

    def sleep(self, timeout: float | None) -> None:
        assert self._event is not None, "a caller that reads from the start never sleeps"
        self._event.wait(timeout)


class _Connection:
    """The connection of `Client` (a base class of it, never used alone)."""

    def _send(self, line: bytes, session: Session) -> None:
        """Send a line made by `session`. Raises OSError, also when the
        connection that session belongs to was replaced (`resume`): its
        request ids mean nothing on the new one."""
        with self._send_lock:
            if session is not self._session:
                raise OSError("the connection this request was made for has ended")
            self.sock.sendall(line)

    def _set_receive_timeout(self) -> None:
        if self.timeout is not None:
            # A blocking read gives up after `timeout` by itself, so the first
            # read of a call needs no poll before it (see _read_as_caller).
            seconds = math.ceil(self.timeout * 1e6) / 1e6
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", int(seconds), round(seconds % 1 * 1e6)))

    def _wake_reader(self) -> None:
        """Called with the lock held."""
        if self._wake_fd >= 0:
            os.eventfd_write(self._wake_fd, 1)

    def _take_role(self) -> None:
        """Called with the lock held and the role free."""
        self._reading = True
        # try/except rather than contextlib.suppress: this runs twice per call.
        try:
            self._reader_poll.modify(self._sock_fd, 0)
        except (OSError, ValueError):
            pass  # the socket or the epoll is closed: nothing to disarm

    def _pass_role(self) -> None:
        """Called with the lock held by the role's holder: hand the role to a caller
        still waiting for an answer, else free it and re-arm the reader thread."""
        for waiter in self._pending.values():
            waiter.lead = True
            waiter.wake()
            return
        self._reading = False
        if self._failure is None:
            try:
                self._reader_poll.modify(self._sock_fd, _READABLE)
            except (OSError, ValueError):
                pass  # closed meanwhile: the reader thread is ending
        if self._reader_waits:
            self._role_free.notify_all()

    def _wait(self, waiter: _Waiter, timeout: float | None) -> bool:
        """Wait up to `timeout` s for `waiter`'s answer, reading the socket while
        this caller holds the role. False if the time ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiter.reply is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if waiter.lead:
                self._read_as_caller(remaining)
            else:
                waiter.sleep(remaining)
        return True

    def _read_as_caller(self, timeout: float | None) -> None:
        """One read by the caller holding the role, waiting up to `timeout` s."""
        # Within FULL_WAIT_SLACK_S of the client's timeout, the socket's own
        # receive timeout bounds the read; a shorter wait polls first.
        if timeout is not None and timeout < self.timeout - FULL_WAIT_SLACK_S and not self._caller_poll.poll(max(1, math.ceil(timeout * 1000))):  # type: ignore[operator]
            return
        try:
            data, fds = receive_with_fds(self.sock)
        except BlockingIOError:
            return  # the receive timeout: the caller's loop sees the time is up
        except OSError as exc:
            self._connection_ended(ConnectionLost(f"the connection to the daemon failed: {exc}"))
            return
        if not data:
            close_fds(fds)
            self._connection_ended(ConnectionLost("the daemon closed the connection"))
            return
        self._dispatch(data, fds)

    def _give_up(self, request_id: int, waiter: _Waiter, *, answered: bool) -> None:
        """The caller is done with `request_id`: it gives up the reading role if it
        holds it and, unless `answered`, its answer, if it ever comes or came
        meanwhile, is disposed of (fds closed, a granted lease released)."""
        with self._lock:
            # Out of `_pending` first, so that the role is not passed back to it.
            waiting = not answered and self._pending.pop(request_id, None) is not None
            if waiting:
                self._session.abandon(request_id)
            if waiter.lead:
                waiter.lead = False
                self._pass_role()
            if answered or waiting:
                return
        reply = waiter.reply
        if reply is not None and reply.error is None:
            self._dispose(stray_of(reply))

    def _dispose(self, stray: Stray) -> None:
        close_fds(stray.fds)
        if stray.lease is None:
            return
        with self._lock:
            if self._failure is not None:
                return  # a bound lease went with the connection
            session = self._session
            line = session.release_line(stray.lease)
        with contextlib.suppress(OSError):  # then the daemon released it anyway
            self._send(line, session)

    def _read_loop(self) -> None:
        """The reader thread: reads while no caller holds the role; with
        `resume`, connects again when the connection ends."""
        try:
            while True:
                self._connection_ended(self._read_connection())
                if not self._reconnect():
                    return
        finally:
            with self._lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
                self._reader_poll.close()

    def _read_connection(self) -> ConnectionLost:
        """Read the connection until it ends; returns why it did."""
        reason = ConnectionLost("the daemon closed the connection")
        try:
            while True:
                self._reader_poll.poll()
                with self._lock:
                    if self._failure is not None:
                        return self._failure if isinstance(self._failure, ConnectionLost) else reason
                    if self._reading:
                        # Woken by a hang-up (never masked) while a caller reads:
                        # that caller will see the end; wait for the role.
                        self._reader_waits = True
                        self._role_free.wait_for(lambda: not self._reading or self._failure is not None)
                        self._reader_waits = False
                        continue
                    self._take_role()
                try:
                    # A caller may have read what woke us before we took the role.
                    data, fds = receive_with_fds(self.sock, _DONT_WAIT)
                except BlockingIOError:
                    data, fds = None, []
                except OSError as exc:
                    reason = ConnectionLost(f"the connection to the daemon failed: {exc}")
                    break
                if data == b"":
                    close_fds(fds)
                    break
                try:
                    if data:
                        self._dispatch(data, fds)
                finally:
                    with self._lock:
                        self._pass_role()
        except ConnectionLost as exc:
            reason = exc
        return reason

    def _resuming(self) -> bool:
        """Whether a lost connection is to be resumed (called with the lock held)."""
        return self.resume_window > 0 and not self._closing and self._refusal is None

    def _reconnect(self) -> bool:
        """After the connection ended: with `resume`, connect again and take
        back the bound leases (True once connected), else end them (False)."""
        with self._lock:
            resuming = self._resuming()
            self._drain_wake()
            if resuming:
                # Its hang-up would wake every wait below at once.
                with contextlib.suppress(OSError, ValueError):
                    self._reader_poll.unregister(self._sock_fd)
        deadline = time.monotonic() + self.resume_window
        reconnected: Reconnected | None = None
        while resuming and reconnected is None:
            with self._lock:
                # Leases released meanwhile are left to the daemon's grace.
                tokens = [lease.token for lease in self._leases.values() if not lease.detached and lease.exited is None]
            remaining = deadline - time.monotonic()
            try:
                reconnected = reconnect_and_resume(
                    self.path, tokens, attempt_timeout(self.timeout, remaining), self._reconnect_socket
                )
            except (OSError, ConnectionLost, DaemonError):
                with self._lock:
                    self._attempt = None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Woken early by `close`.
                self._reader_poll.poll(min(RECONNECT_INTERVAL_S, remaining))
                with self._lock:
                    self._drain_wake()
                    resuming = self._resuming()
        if reconnected is None:
            self._end_suspended()
            return False
        with self._lock:
            self._attempt = None
            if self._closing:
                reconnected.sock.close()
                resuming = False
            else:
                self._install(reconnected)
        if not resuming:
            self._end_suspended()
            return False
        lost = [self._leases.pop(token) for token in reconnected.lost if token in self._leases]
        for lease in lost:
            lease._end(None)
        for token in reconnected.resumed:
            if token not in self._leases:
                # Released by the application while the daemon was away.
                self._dispose(Stray(token, ()))
        notice = resumed_notice(reconnected)
        with self._lock:
            self._notifications.append(notice)
            self._notified.notify_all()
        if self._on_resume is not None:
            run_callback(self._on_resume, notice["params"])
        for incoming in reconnected.later:
            self._dispatch_incoming(incoming)
        return True

    def _reconnect_socket(self) -> socket.socket:
        """A socket for one reconnect attempt, which `close` can interrupt."""
        sock = _ClientSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            self._attempt = sock
            if self._closing:
                sock.close()
        return sock

    def _install(self, reconnected: Reconnected) -> None:
        """Serve on the new connection from now on (called with the lock held)."""
        old, self.sock = self.sock, reconnected.sock  # type: ignore[assignment]
        old.close()
        self.sock.settimeout(None)
        self._set_receive_timeout()
        self._sock_fd = self.sock.fileno()
        self._reader_poll.register(self._sock_fd, select.EPOLLIN)
        self._caller_poll = select.poll()
        self._caller_poll.register(self._sock_fd, select.POLLIN)
        self._session = reconnected.session
        self._failure = None
        self._reconnecting = False
        self._reading = False
        self.shutting_down = False

    def _drain_wake(self) -> None:
        """Reset the reader's wake-up (called with the lock held)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    def _end_suspended(self) -> None:
        """No new connection: the leases kept for resuming are lost after all."""
        with self._lock:
            self._reconnecting = False
            self._notified.notify_all()
            leases = list(self._leases.values())
        for lease in leases:
            lease._end(None)

    def _dispatch_incoming(self, incoming: Reply | Notice | Refusal | Stray) -> None:
        later: list[Callable[[], None]] = []
        with self._lock:
            if isinstance(incoming, Notice):
                self._notifications.append(incoming.message)
                self._notified.notify_all()
                later += self._route_notice(incoming)
            elif isinstance(incoming, Stray):
                later.append(functools.partial(self._dispose, incoming))
            elif isinstance(incoming, Reply):
                close_fds(incoming.fds)
        for action in later:
            action()

    def _dispatch(self, data: bytes, fds: list[int]) -> None:
        """Route what one read completed; callbacks and releases run after the lock."""
        later: list[Callable[[], None]] = []
        with self._lock:
            for incoming in self._session.receive(data, fds):
                if isinstance(incoming, Reply):
                    waiter = self._pending.pop(incoming.id, None)
                    if waiter is None:
                        close_fds(incoming.fds)
                        continue
                    waiter.reply = incoming
                    waiter.wake()
                elif isinstance(incoming, Notice):
                    self._notifications.append(incoming.message)
                    self._notified.notify_all()
                    later += self._route_notice(incoming)
                elif isinstance(incoming, Refusal):
                    self._refusal = incoming.error
                    for request_id, waiter in list(self._pending.items()):
                        waiter.reply = Reply(request_id, "", error=fresh_error(incoming.error))
                        waiter.wake()
                    self._pending.clear()
                else:
                    later.append(functools.partial(self._dispose, incoming))
        for action in later:
            action()

    def _route_notice(self, notice: Notice) -> list[Callable[[], None]]:
        if notice.method == "adapter_exited":
            exited = AdapterExited.from_params(notice.params)
            return [functools.partial(lease._end, exited) for lease in self._leases.values() if lease.instance == exited.instance]
        if notice.method == "shutting_down":
            self.shutting_down = True
            return [
                functools.partial(lease._end, AdapterExited(lease.instance, lease.job, lease.adapter, lease.pid, None, SHUTDOWN_REASON))
                for lease in self._leases.values()
            ]
        return []

    def _connection_ended(self, reason: ConnectionLost) -> None:
        """Fail every waiting call and every bound lease; the first end counts."""
        with self._lock:
            if self._failure is not None:
                return
            if self._closing:
                reason = ConnectionLost("this client was closed")
            failure: Exception = self._refusal or reason
            self._failure = failure
            for request_id, waiter in self._pending.items():
                waiter.reply = Reply(request_id, "", error=fresh_error(failure))
                waiter.wake()
            self._pending.clear()
            # Kept for `_reconnect` to resume, or lost now.
            self._reconnecting = self._resuming()
            leases = [] if self._reconnecting else list(self._leases.values())
            self._notified.notify_all()
            self._role_free.notify_all()
            self._wake_reader()
            close_fds(self._session.leftover_fds())
        for lease in leases:
            lease._end(None)
