"""The blocking client, `Client`: one socket, shareable by any number of
threads. Requests are pipelined and their answers matched by id; a caller
waiting for an answer reads the socket itself when no other thread does (no
hand-over between threads on the common path), and a reader thread per client
reads while nobody waits, so notifications arrive between calls too (the
connection's sending, reading and resuming are `blockingconnection.py`).

`supervisor.client` describes both clients: leases, notifications, errors,
connection loss and `resume`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, Self

from supervisor.client.blockingconnection import _ClientSocket, _Connection, _Waiter
from supervisor.client.errors import ConnectionLost, DaemonError, LeaseLost, UnknownLease, fresh_error
from supervisor.client.lease import LeaseInfo, describe, run_callback
from supervisor.client.messages import (
    AdapterExited,
    AdapterInfo,
    HelloResult,
    ReleaseJobResult,
    ReleaseResult,
    Status,
    acquire_params,
    logs_params,
    status_params,
)
from supervisor.client.resume import DEFAULT_RESUME_S
from supervisor.client.session import (
    DEFAULT_TIMEOUT_S,
    FDS_PER_LEASE,
    NOTIFICATION_BACKLOG,
    REFUSAL_GRACE_S,
    Session,
    close_fds,
    default_socket,
)


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


class Client(_Connection):
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
