"""How an `AsyncClient` uses its connection: sending whole lines (shielded
from cancellation, bounded), the reader task, the routing of what arrives to
waiting tasks, leases and the notification queue, answers nobody waits for
any more (a granted lease is released), the end of the connection, and with
`resume` the reconnection. `_AsyncConnection` holds these methods for
`AsyncClient`, whose `__init__` makes the state they share.
"""

from __future__ import annotations

import contextlib
import socket

import anyio
import anyio.lowlevel

from supervisor.client.errors import ConnectionLost, DaemonError, fresh_error
from supervisor.client.lease import run_callback
from supervisor.client.messages import SHUTDOWN_REASON, AdapterExited
from supervisor.client.resume import RECONNECT_INTERVAL_S, Reconnected, attempt_timeout, reconnect_and_resume, resumed_notice
from supervisor.client.session import (
    REFUSAL_GRACE_S,
    Notice,
    Refusal,
    Reply,
    Session,
    Stray,
    close_fds,
    receive_with_fds,
    stray_of,
)

# Bound on sending one request line. The daemon reads continuously, so a send
# that takes this long means a stuck daemon; the connection is then closed
# (a half-sent line cannot be taken back).
SEND_TIMEOUT_S = 10.0


class _Waiter:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reply: Reply | None = None


class _AsyncConnection:
    """The connection of `AsyncClient` (a base class of it, never used alone)."""

    async def _send(self, line: bytes, session: Session) -> None:
        """Send one whole line, shielded from cancellation and bounded by
        SEND_TIMEOUT_S (a timeout closes the connection). Raises ConnectionLost."""
        assert self._send_lock is not None and self._ended is not None, "use the client inside `async with`"
        async with self._send_lock:
            with anyio.CancelScope(shield=True):
                error: OSError | None = None
                with anyio.move_on_after(SEND_TIMEOUT_S) as scope:
                    try:
                        await self._send_all(line, session)
                    except OSError as exc:
                        error = exc
                if scope.cancelled_caught:
                    self._close(ConnectionLost(f"the daemon took no data for {SEND_TIMEOUT_S} s"))
                if error is not None or scope.cancelled_caught:
                    # The daemon may have said why it closed (a refusal) just before.
                    with anyio.move_on_after(REFUSAL_GRACE_S):
                        await self._ended.wait()
                    if self._failure is not None:
                        raise fresh_error(self._failure) from error
                    raise ConnectionLost(f"cannot send to the daemon: {error}") from error

    async def _send_all(self, line: bytes, session: Session) -> None:
        """Send a line made by `session`, only on the connection it belongs
        to (after a `resume`, its request ids mean nothing on the new one)."""
        view = memoryview(line)
        while view:
            if self._sock is None or self._failure is not None or session is not self._session:
                raise ConnectionLost("the connection ended")
            try:
                view = view[self._sock.send(view):]
            except BlockingIOError:
                await anyio.wait_writable(self._sock)

    def _give_up(self, request_id: int, waiter: _Waiter) -> None:
        if self._pending.pop(request_id, None) is not None:
            self._session.abandon(request_id)
            return
        reply = waiter.reply
        if reply is not None and reply.error is None:
            self._dispose(stray_of(reply))

    def _dispose(self, stray: Stray) -> None:
        close_fds(stray.fds)
        if stray.lease is None or self._failure is not None or self._task_group is None:
            return
        session = self._session
        self._task_group.start_soon(self._send_quietly, session.release_line(stray.lease), session)

    async def _send_quietly(self, line: bytes, session: Session) -> None:
        try:
            await self._send(line, session)
        except (ConnectionLost, DaemonError):
            pass  # then the daemon released the lease with the connection (or refused it)

    async def _read_loop(self) -> None:
        """Read until the connection ends; with `resume`, connect again and
        read on. Cancellation: the connection is closed, bound leases lost."""
        reason = ConnectionLost("the daemon closed the connection")
        try:
            while True:
                reason = await self._read_connection()
                if not await self._reconnect(reason):
                    break
        finally:
            self._close(ConnectionLost("this client was closed") if self._closing else reason)

    async def _read_connection(self) -> ConnectionLost:
        """Read the connection until it ends; returns why it did."""
        assert self._sock is not None
        try:
            while True:
                try:
                    data, fds = receive_with_fds(self._sock)
                except BlockingIOError:
                    await anyio.wait_readable(self._sock)
                    continue
                if not data:
                    close_fds(fds)
                    return ConnectionLost("the daemon closed the connection")
                for incoming in self._session.receive(data, fds):
                    self._dispatch(incoming)
                await anyio.lowlevel.checkpoint()
        except ConnectionLost as exc:
            return exc
        except (OSError, anyio.ClosedResourceError) as exc:
            return ConnectionLost(f"the connection to the daemon failed: {exc!r}")

    async def _reconnect(self, reason: ConnectionLost) -> bool:
        """With `resume`: keep the bound leases, connect again and take them
        back (True once connected). Else, or if no daemon answers in time,
        False (the caller closes, and the leases are lost)."""
        if self.resume_window <= 0 or self._closing or self._refusal is not None:
            return False
        self._suspend(reason)
        deadline = anyio.current_time() + self.resume_window
        reconnected: Reconnected | None = None
        while reconnected is None and not self._closing:
            # Leases released meanwhile are left to the daemon's grace.
            tokens = [lease.token for lease in self._leases.values() if not lease.detached and lease.exited is None]
            attempt: list[socket.socket] = []

            def new_socket() -> socket.socket:
                attempt.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                return attempt[0]

            try:
                # Abandoned if cancelled (leaving `async with`): its socket is
                # closed, which ends the attempt in its thread.
                reconnected = await anyio.to_thread.run_sync(
                    reconnect_and_resume, self.path, tokens,
                    attempt_timeout(self.timeout, deadline - anyio.current_time()), new_socket,
                    abandon_on_cancel=True,
                )
            except (OSError, ConnectionLost, DaemonError):
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    break
                await anyio.sleep(min(RECONNECT_INTERVAL_S, remaining))
            except BaseException:
                for sock in attempt:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                raise
        self._reconnecting = False
        if reconnected is None or self._closing:
            if reconnected is not None:
                reconnected.sock.close()
            # No new connection: the leases kept for resuming are lost after all.
            self._wake_notified()
            for lease in list(self._leases.values()):
                lease._end(None)
            return False
        reconnected.sock.setblocking(False)
        self._sock, self._session = reconnected.sock, reconnected.session
        self._failure = None
        self.shutting_down = False
        self._ended = anyio.Event()
        for token in reconnected.lost:
            lease = self._leases.get(token)
            if lease is not None:
                lease._end(None)
        for token in reconnected.resumed:
            if token not in self._leases:
                # Released by the application while the daemon was away.
                self._dispose(Stray(token, ()))
        notice = resumed_notice(reconnected)
        self._notifications.append(notice)
        self._wake_notified()
        if self._on_resume is not None:
            run_callback(self._on_resume, notice["params"])
        for incoming in reconnected.later:
            self._dispatch(incoming)
        return True

    def _suspend(self, reason: ConnectionLost) -> None:
        """The connection ended and will be made again: calls fail meanwhile,
        bound leases are kept."""
        self._reconnecting = True
        if self._sock is not None and self._sock.fileno() != -1:
            anyio.notify_closing(self._sock)
            self._sock.close()
        self._failure = reason
        self._fail_pending(reason)
        close_fds(self._session.leftover_fds())
        if self._ended is not None:
            self._ended.set()

    def _wake_notified(self) -> None:
        assert self._notified is not None
        self._notified.set()
        self._notified = anyio.Event()

    def _dispatch(self, incoming: Reply | Notice | Refusal | Stray) -> None:
        if isinstance(incoming, Reply):
            waiter = self._pending.pop(incoming.id, None)
            if waiter is None:
                close_fds(incoming.fds)
                return
            waiter.reply = incoming
            waiter.event.set()
        elif isinstance(incoming, Notice):
            self._notifications.append(incoming.message)
            self._wake_notified()
            self._route_notice(incoming)
        elif isinstance(incoming, Refusal):
            self._refusal = incoming.error
            self._fail_pending(incoming.error)
        else:
            self._dispose(incoming)

    def _route_notice(self, notice: Notice) -> None:
        if notice.method == "adapter_exited":
            exited = AdapterExited.from_params(notice.params)
            for lease in [lease for lease in self._leases.values() if lease.instance == exited.instance]:
                lease._end(exited)
        elif notice.method == "shutting_down":
            self.shutting_down = True
            for lease in list(self._leases.values()):
                lease._end(AdapterExited(lease.instance, lease.job, lease.adapter, lease.pid, None, SHUTDOWN_REASON))

    def _fail_pending(self, error: Exception) -> None:
        for request_id, waiter in self._pending.items():
            waiter.reply = Reply(request_id, "", error=fresh_error(error))
            waiter.event.set()
        self._pending.clear()

    def _close(self, reason: ConnectionLost | None = None) -> None:
        """End the connection (synchronous, so it is safe in `finally` and when
        cancelled): fail waiters, mark bound leases lost. Idempotent."""
        if reason is None:
            self._closing = True
            reason = ConnectionLost("this client was closed")
        if self._sock is not None and self._sock.fileno() != -1:
            anyio.notify_closing(self._sock)
            self._sock.close()
        if self._reconnecting:
            # Closed while connecting again: the leases kept for resuming
            # are lost after all.
            self._reconnecting = False
            self._fail_pending(self._failure or reason)
            for event in (self._notified, self._ended):
                if event is not None:
                    event.set()
            for lease in list(self._leases.values()):
                lease._end(None)
            return
        if self._failure is not None:
            return
        self._failure = self._refusal or reason
        self._fail_pending(self._failure)
        close_fds(self._session.leftover_fds())
        for event in (self._notified, self._ended):
            if event is not None:
                event.set()
        for lease in list(self._leases.values()):
            lease._end(None)
