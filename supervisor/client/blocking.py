"""The Python client of adapter-supervisor (the wire protocol is docs/protocol.md).

Two clients with one API:

* `Client`: blocking, on a plain socket. One instance may be shared by any number
  of threads (a thread pool, a sync web framework): requests are pipelined and
  their answers matched by id. A caller waiting for an answer reads the socket
  itself when no other thread does (no hand-over between threads on the common
  path); a reader thread per client reads while nobody waits, so notifications
  arrive between calls too.
* `AsyncClient` (in `supervisor.client.aio`, importable from `supervisor.client`): the same for asyncio
  and Trio, written once on anyio. ``async with AsyncClient(path) as client:``.

Leases are taken in a ``with`` block so that no exit path can forget them::

    with Client() as client, client.lease("job-1", "claude-acp", fds=True) as lease:
        lease.stdin.write(b"...\\n"); lease.stdin.flush()
        reply = lease.stdout.readline()

The lease is released when the block exits for any reason: normal exit, an
exception, Ctrl-C, cancellation (async). `release_job(job)` releases every lease
of a job, whoever holds it; call it from the one place where an orchestrator
handles a job's terminal transitions.

Notifications reach the lease they concern: ``lease.wait_exited()`` returns an
`AdapterExited` once the daemon says the adapter's tree is gone (or, after
`shutting_down`, that it is going), and ``lease.on_end(callback)`` runs a
callback then (on whichever thread or task read the notification: keep it short,
do not block, do not call the client from it). Every
notification is also kept for `next_notification()`.

Errors the daemon answers with are raised as `DaemonError` subclasses named for
what happened (`UnknownAdapter`, `LimitReached`, `SpawnFailed`, ...), carrying the
daemon's `code` and `message`. A request that gets no answer within the client's
`timeout` raises `TimeoutError`.

Connection loss, and why there is no reconnect: a lease that is not detached
belongs to its connection. When the connection ends (the daemon stopped or
restarted, the socket broke, `close()`), the daemon releases those leases and
stops their trees. A client that quietly reconnected and re-acquired would hand
the caller a new process that lost the old one's state, so instead: every later
call raises `ConnectionLost`; each bound lease is marked `lost`; `wait_exited()`
raises `LeaseLost`; and a `lease()` block whose body finished normally raises
`LeaseLost` on exit, so the job is not reported as done on a dead adapter. To
carry on, open a new client and acquire again. Detached leases (``detach=True``
with a ``ttl``) survive their connection and can be renewed or released by token
from any client of the same uid.

The one exception is a crash or restart of the daemon: the daemon that comes
back adopts the running adapters and holds their bound leases for its
`resume_grace` (30 s by default), for their holder to take back with
`resume`. A client made with ``resume=True`` (or a number of seconds) does
that itself: when its connection ends, it keeps its bound leases (calls made
meanwhile raise ConnectionLost, `lost` is True), connects again every 0.2 s
for up to that long, and resumes them. It then tells the holder either way:
the leases the daemon gave back simply carry on (their fds never stopped
working), those it did not are ended as above (`LeaseLost`), and a
``{"method": "resumed", "params": {"resumed": [...], "lost": [...],
"generation": n}}`` notification is added to `next_notification()` (and
passed to `on_resume`, if given). If no daemon answers in time, every bound
lease is lost as without `resume`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, Self

from supervisor.client.session import (
    DEFAULT_RESUME_S,
    DEFAULT_TIMEOUT_S,
    RECONNECT_INTERVAL_S,
    Reconnected,
    attempt_timeout,
    reconnect_and_resume,
    resumed_notice,
    status_params,
    NOTIFICATION_BACKLOG,
    REFUSAL_GRACE_S,
    FDS_PER_LEASE,
    SHUTDOWN_REASON,
    AdapterExited,
    AdapterInfo,
    ConnectionLost,
    DaemonError,
    HelloResult,
    LeaseInfo,
    LeaseLost,
    Notice,
    Refusal,
    ReleaseJobResult,
    ReleaseResult,
    Reply,
    Session,
    Status,
    Stray,
    UnknownLease,
    acquire_params,
    close_fds,
    default_socket,
    describe,
    fresh_error,
    logs_params,
    receive_with_fds,
    run_callback,
)



# A read whose wait is this close to the client's full timeout relies on the
# socket's receive timeout (set to it) instead of a poll: at most this late.
FULL_WAIT_SLACK_S = 0.05

# As plain ints: the select and socket modules' constants are enums, slow to combine.
_READABLE = int(select.EPOLLIN)
_DONT_WAIT = int(socket.MSG_DONTWAIT)


# -- leases -----------------------------------------------------------------------


class Lease(LeaseInfo):
    """A lease held through a `Client`. With ``fds=True``, `stdin` and `stdout` are
    the adapter's pipes as buffered binary files (flush after writing); they are
    closed when the lease is released."""

    def __init__(self, client: Client, result: Mapping[str, Any], *, detached: bool, fds: Sequence[int]) -> None:
        super().__init__(result, detached=detached)
        self._client = client
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._callbacks: list[Callable[[Lease], None]] = []
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        if len(fds) == FDS_PER_LEASE:
            # Owned by the lease and closed by `release`, so no `with` here.
            self.stdin = open(fds[0], "wb")  # noqa: SIM115
            self.stdout = open(fds[1], "rb")  # noqa: SIM115

    def wait_exited(self, timeout: float | None = None) -> AdapterExited:
        """Block until the adapter is gone (or going, on shutdown) and say how.

        Raises TimeoutError after `timeout` seconds; LeaseLost if the connection
        ended first (ConnectionLost for a detached lease, which lives on).
        """
        if not self._ended.wait(timeout):
            raise TimeoutError(f"the adapter of lease {self.token[:8]} did not exit within {timeout} s")
        if self.exited is None:
            if self.detached:
                raise ConnectionLost(f"the connection ended; detached {describe(self)} lives on, unobserved")
            raise LeaseLost(f"the connection ended while {describe(self)} was held", self)
        return self.exited

    def on_end(self, callback: Callable[[Lease], None]) -> None:
        """Call `callback(lease)` once the adapter exited or the connection ended
        (at once if that already happened). It runs on the thread that read the
        notification: the client's reader thread, or a thread waiting in a call."""
        with self._lock:
            if not self._ended.is_set():
                self._callbacks.append(callback)
                return
        run_callback(callback, self)

    def release(self) -> ReleaseResult | None:
        """Give the lease back and close its pipes; None if the daemon had already
        let it go (release_job, expiry) or it was released before. Raises
        ConnectionLost if the connection is gone (a bound lease went with it),
        TimeoutError if the daemon does not answer."""
        if self.released:
            return None
        self.close_stdio()
        try:
            result: ReleaseResult | None = self._client.release(self.token)
        except UnknownLease:
            result = None
        except ConnectionLost:
            if not self.detached:
                self._mark_released()
            raise
        self._mark_released()
        return result

    def _mark_released(self) -> None:
        self.released = True
        self._client._forget(self)

    def renew(self, ttl: float | None = None) -> float:
        """Extend a detached lease by `ttl` (default: its own); returns the new expiry.
        Raises what `Client.renew` raises, leaving `expires_at` as it was."""
        self.expires_at = self._client.renew(self.token, ttl)
        return self.expires_at

    def logs(self, lines: int = 100) -> list[str]:
        """The tail of the adapter's stderr. Raises what `Client.logs` raises."""
        return self._client.logs(lease=self.token, lines=lines)

    def close_stdio(self) -> None:
        """Close this lease's ends of the adapter's pipes (the adapter keeps running)."""
        for stream in (self.stdin, self.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # a pipe whose reader is gone cannot flush
                    stream.close()

    def _end(self, exited: AdapterExited | None) -> None:
        """The adapter exited (`exited`) or the connection ended (None)."""
        with self._lock:
            self._note_end(exited)
            if self._ended.is_set():
                return
            self._ended.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            run_callback(callback, self)


class _LeaseScope:
    """``with client.lease(...)``: acquires on entry, releases on every exit."""

    def __init__(self, client: Client, request: dict[str, Any]) -> None:
        self._client = client
        self._request = request
        self._lease: Lease | None = None

    def __enter__(self) -> Lease:
        self._lease = self._client._acquire(self._request)
        return self._lease

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._lease is not None
        lease = self._lease
        try:
            lease.release()
        except (ConnectionLost, TimeoutError, DaemonError) as failure:
            if exc is not None:
                exc.add_note(f"releasing lease {lease.token[:8]} on the way out failed too: {failure!r}")
                return
            if isinstance(failure, ConnectionLost):
                raise LeaseLost(f"{describe(lease)} was lost with its connection: {failure}", lease) from failure
            raise
        if exc is None and lease.lost:
            raise LeaseLost(f"{describe(lease)} was lost with its connection", lease)


# -- the blocking client ---------------------------------------------------------


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


class Client:
    """A blocking connection to the daemon, safe to share between threads.

    Raises OSError if the socket cannot be connected. Use as a context manager or
    call `close`. `timeout` bounds each wait for an answer (None: wait forever).

    Every request method raises ConnectionLost once the connection has ended,
    TimeoutError when no answer comes within `timeout`, and the `DaemonError`
    subclass the daemon answers with (ShuttingDown for most methods once the
    daemon is stopping); each method names the errors particular to it.

    Reading: one thread at a time holds the reading role (`_reading`) and is the
    only one that reads the socket. A caller waiting for an answer takes the role
    when it is free and reads until its answer came, so a call is one send and
    one read on the caller's thread, with no wake-up of another thread between.
    The reader thread waits in epoll while no caller holds the role; a caller
    taking the role disarms it (so the answer does not wake it too) and re-arms
    it when it gives the role up. The role goes from a caller that got its answer
    to another caller still waiting, if any, else back to the reader thread.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        resume: bool | float = False,
        on_resume: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """`resume`: after a lost connection, connect again and take back the
        bound leases for up to this many seconds (True: DEFAULT_RESUME_S),
        then call `on_resume` with the `resumed` notification's params (on
        the reader thread; keep it short). See the module docstring."""
        self.path = path or default_socket()
        self.timeout = timeout
        self.resume_window = float(DEFAULT_RESUME_S if resume is True else resume or 0.0)
        self._on_resume = on_resume
        self.sock = _ClientSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(None)  # reads wait as long as the connection lives
        # Guards everything below: the session, waiters, leases, notifications,
        # the reading role.
        self._lock = threading.Lock()
        self._notified = threading.Condition(self._lock)
        self._reading = False
        self._role_free = threading.Condition(self._lock)
        self._reader_waits = False  # the reader thread waits on `_role_free`
        # The number, kept: once the socket is closed, a reused number is not
        # the registered file, and epoll refuses to modify it (ENOENT).
        self._sock_fd = self.sock.fileno()
        self._reader_poll = select.epoll()
        self._reader_poll.register(self._sock_fd, select.EPOLLIN)
        # Wakes the reader thread once the connection ended or was closed: the
        # hang-up alone is lost if the socket is closed while the reader is not
        # in epoll. Closed by the reader thread as it ends, under the lock.
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._reader_poll.register(self._wake_fd, select.EPOLLIN)
        self._caller_poll = select.poll()  # used by the role holder only
        self._caller_poll.register(self.sock.fileno(), select.POLLIN)
        self._set_receive_timeout()
        self._send_lock = threading.Lock()
        self._session = Session()
        self._pending: dict[int, _Waiter] = {}
        self._leases: dict[str, Lease] = {}
        self._notifications: collections.deque[dict[str, Any]] = collections.deque(maxlen=NOTIFICATION_BACKLOG)
        self._refusal: DaemonError | None = None
        self._failure: Exception | None = None
        self._closing = False
        # The connection ended and a new one is being made (`resume`); the
        # socket of the attempt under way.
        self._reconnecting = False
        self._attempt: socket.socket | None = None
        self.shutting_down = False
        self._reader = threading.Thread(target=self._read_loop, name=f"adapter-supervisor-client {self.path}", daemon=True)
        self._reader.start()

    def _set_receive_timeout(self) -> None:
        if self.timeout is not None:
            # A blocking read gives up after `timeout` by itself, so the first
            # read of a call needs no poll before it (see _read_as_caller).
            seconds = math.ceil(self.timeout * 1e6) / 1e6
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", int(seconds), round(seconds % 1 * 1e6)))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """End the connection: the daemon releases its bound leases. Idempotent.
        Waits for the reader thread to end unless called from it."""
        self._closing = True
        self.sock.close()
        with self._lock:
            self._wake_reader()
            if self._attempt is not None:
                self._attempt.close()  # wakes a reconnect attempt waiting for an answer
        if threading.current_thread() is not self._reader:
            self._reader.join()

    @property
    def lost(self) -> bool:
        """True once the connection ended (for any reason)."""
        return self._failure is not None

    # -- raw requests --

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return its result. Raises DaemonError (a subclass
        named for the error), ConnectionLost, or TimeoutError."""
        result, fds = self.call_with_fds(method, params)
        if fds:
            close_fds(fds)
        return result

    def call_with_fds(self, method: str, params: Mapping[str, Any] | None = None) -> tuple[Any, list[int]]:
        """Like `call`, also returning the fds passed with the answer (the caller
        owns and must close them); raises as `call` does. If the wait ends without
        the answer (timeout, KeyboardInterrupt), a lease it grants later is
        released by the client."""
        with self._lock:
            if self._failure is not None:
                raise fresh_error(self._failure)
            session = self._session
            request_id, line = session.request(method, params)
            lead = not self._reading
            if lead:
                self._take_role()
            waiter = self._pending[request_id] = _Waiter(lead=lead)
        answered = False
        try:
            try:
                self._send(line, session)
            except OSError as exc:
                # The daemon may have said why it closed (a refusal) just before.
                if not self._wait(waiter, REFUSAL_GRACE_S):
                    raise ConnectionLost(f"cannot send to the daemon: {exc}") from exc
            if not self._wait(waiter, self.timeout):
                raise TimeoutError(f"the daemon did not answer {method!r} within {self.timeout} s")
            answered = True
        finally:
            self._give_up(request_id, waiter, answered=answered)
        reply = waiter.reply
        assert reply is not None
        if reply.error is not None:
            raise reply.error
        return reply.result, list(reply.fds) if reply.fds else []

    def next_notification(self, timeout: float | None = None) -> dict[str, Any]:
        """The oldest notification not yet taken (the whole JSON object), waiting
        up to `timeout` (default: the client's). Raises TimeoutError, or
        ConnectionLost once the connection ended and none are left."""
        timeout = self.timeout if timeout is None else timeout
        with self._notified:
            ended = lambda: self._failure is not None and not self._reconnecting  # noqa: E731
            if not self._notified.wait_for(lambda: self._notifications or ended(), timeout):
                raise TimeoutError(f"no notification within {timeout} s")
            if self._notifications:
                return self._notifications.popleft()
            assert self._failure is not None
            raise fresh_error(self._failure)

    # -- the API --

    def hello(self) -> HelloResult:
        """The daemon's identity: name, version, protocol, pid and instance id.
        Raises as `call` does."""
        return self.call("hello")  # type: ignore[no-any-return]

    def acquire(
        self, job: str, adapter: str, *, params: Mapping[str, str] | None = None, fds: bool = False,
        detach: bool = False, ttl: float | None = None,
    ) -> Lease:
        """Take a lease on the (job, adapter) instance, spawning it if needed. The
        caller must `release()` it; prefer `lease()`, which cannot forget.

        `params` fills the adapter's {param:NAME} placeholders; `fds` asks for its
        stdin/stdout; `detach` with `ttl` makes a lease that outlives this
        connection until it expires. Raises UnknownAdapter, InvalidParams,
        Conflict, LimitReached, SpawnFailed, ShuttingDown, ConnectionLost,
        TimeoutError (a lease granted after the time ran out is released).
        """
        return self._acquire(acquire_params(job, adapter, params=params, fds=fds, detach=detach, ttl=ttl))

    def lease(self, job: str, adapter: str, *, params: Mapping[str, str] | None = None, fds: bool = False) -> contextlib.AbstractContextManager[Lease]:
        """``with client.lease(job, adapter) as lease:`` a bound lease, released when
        the block exits however it exits. Raises what `acquire` raises on entry,
        and `LeaseLost` on a normal exit if the connection ended meanwhile."""
        return _LeaseScope(self, acquire_params(job, adapter, params=params, fds=fds, detach=False, ttl=None))

    def release(self, lease: Lease | str) -> ReleaseResult:
        """Release a lease by object or token. Raises UnknownLease, PermissionDenied,
        ConnectionLost, TimeoutError."""
        token = lease.token if isinstance(lease, LeaseInfo) else lease
        return self.call("release", {"lease": token})  # type: ignore[no-any-return]

    def renew(self, lease: Lease | str, ttl: float | None = None) -> float:
        """Extend a detached lease; returns its new expiry (Unix time). Raises
        UnknownLease (also for one that has expired), PermissionDenied,
        InvalidParams for a lease that is not detached, ConnectionLost,
        TimeoutError."""
        token = lease.token if isinstance(lease, LeaseInfo) else lease
        params: dict[str, Any] = {"lease": token} | ({"ttl": ttl} if ttl is not None else {})
        return float(self.call("renew", params)["expires_at"])

    def release_job(self, job: str) -> ReleaseJobResult:
        """Release every lease of `job`, whichever connection holds it (same uid or
        root); their holders get `adapter_exited` with reason "released". Raises
        PermissionDenied, releasing nothing, if a lease belongs to another uid;
        ConnectionLost, TimeoutError."""
        return self.call("release_job", {"job": job})  # type: ignore[no-any-return]

    def resume(self, leases: Sequence[str]) -> dict[str, list[str]]:
        """After a crash of the daemon (its `hello` shows a higher
        `generation`), take back on this connection the bound leases of
        `leases` that the restarted daemon holds for their holder (within its
        `resume_grace`). Returns `{"resumed": [...], "not_resumed": [...]}`;
        a lease not resumed is gone (or detached: it needs no resuming).
        The returned leases are bound to this client from now on, but are not
        `Lease` objects of it. Raises ConnectionLost, TimeoutError."""
        return self.call("resume", {"leases": list(leases)})  # type: ignore[no-any-return]

    def upgrade(self) -> dict[str, Any]:
        """Have the daemon re-execute its code in place (root or the daemon's
        own uid); returns the new image's `{"pid", "version", "generation"}`.
        Raises DaemonError (1008: it did not happen, and says why;
        PermissionDenied), ConnectionLost, TimeoutError (the client's timeout
        must cover the new code's check, up to 30 s)."""
        return self.call("upgrade", {})  # type: ignore[no-any-return]

    def status(
        self, job: str | None = None, *, adapter: str | None = None, state: str | None = None, uid: int | None = None
    ) -> Status:
        """The daemon and its instances: those that match every filter given
        (a job, an adapter, a state, the uid that owns them). Raises as `call` does."""
        return self.call("status", status_params(job, adapter, state, uid))  # type: ignore[no-any-return]

    def sweep(self, *, deep: bool = False) -> dict[str, Any]:
        """Run an orphan sweep now; returns its report. Raises as `call` does."""
        return self.call("sweep", {"deep": True} if deep else {})  # type: ignore[no-any-return]

    def reports(self, limit: int = 10) -> list[dict[str, Any]]:
        """The most recent sweep reports, newest first. Raises as `call` does."""
        return self.call("reports", {"limit": limit})["reports"]  # type: ignore[no-any-return]

    def adapters(self) -> list[AdapterInfo]:
        """The adapters of the config the daemon runs now (after a reload, the
        new one), by name, each with its number of live instances. Raises as
        `call` does."""
        return self.call("adapters", {})["adapters"]  # type: ignore[no-any-return]

    def metrics(self) -> str:
        """The daemon's metrics in the Prometheus text format (instances,
        leases and tree RSS per adapter; spawns, releases, reaps, sweeps,
        protocol errors). Raises as `call` does."""
        return self.call("metrics", {})["text"]  # type: ignore[no-any-return]

    def logs(self, instance: str | None = None, *, lease: str | None = None, lines: int = 100) -> list[str]:
        """The tail of an instance's stderr, named by instance id or by lease token.
        Raises ValueError unless exactly one is given (nothing is sent), UnknownLease
        for a lease that does not exist, InvalidParams for an instance neither
        running nor finished recently, ConnectionLost, TimeoutError."""
        return self.call("logs", logs_params(instance, lease, lines))["lines"]  # type: ignore[no-any-return]

    # -- internals --

    def _acquire(self, request: dict[str, Any]) -> Lease:
        result, fds = self.call_with_fds("acquire", request)
        lease = Lease(self, result, detached=bool(request.get("detach")), fds=fds)
        with self._lock:
            self._leases[lease.token] = lease
            lost = self._failure is not None
        if lost:
            lease._end(None)
        return lease

    def _forget(self, lease: LeaseInfo) -> None:
        with self._lock:
            self._leases.pop(lease.token, None)

    def _send(self, line: bytes, session: Session) -> None:
        """Send a line made by `session`. Raises OSError, also when the
        connection that session belongs to was replaced (`resume`): its
        request ids mean nothing on the new one."""
        with self._send_lock:
            if session is not self._session:
                raise OSError("the connection this request was made for has ended")
            self.sock.sendall(line)

    # -- reading --

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
            lease = reply.result.get("lease") if reply.method == "acquire" and isinstance(reply.result, dict) else None
            self._dispose(Stray(lease, reply.fds))

    def _dispose(self, stray: Stray) -> None:
        close_fds(stray.fds)
        if stray.lease is None:
            return
        with self._lock:
            if self._failure is not None:
                return  # a bound lease went with the connection
            session = self._session
            request_id, line = session.request("release", {"lease": stray.lease})
            session.abandon(request_id)
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
