"""The async client, for asyncio and Trio alike (written once on anyio).

``async with AsyncClient(path) as client:`` connects and runs one reader task
that matches answers to requests by id and routes notifications to leases; it
has the API of the blocking `supervisor.client.Client`, with ``await``. See
`supervisor.client` for leases, notifications, errors, and why there is no
reconnect except to resume bound leases after a crash of the daemon
(``resume=True``). Its connection's
sending, reading and resuming are `aioconnection.py`.

Cancellation: a cancelled request never leaves a half-sent line (sends are
shielded and bounded), and if it was an `acquire` the daemon goes on to grant,
the client releases that lease when the answer arrives. A lease taken with
``async with client.lease(...)`` is released on the way out however the block
ends, cancellation included: the release runs shielded, bounded by
`RELEASE_TIMEOUT_S`.

Exceptions: whatever the block raises (an error of the client's, such as
`UnknownAdapter` or `ConnectionLost`, or the caller's own) leaves
``async with AsyncClient()`` as itself, never wrapped in an ExceptionGroup by
the reader task's task group, so ``except UnknownAdapter`` works around the
block as inside it. Cancellation passes through as usual.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import anyio.lowlevel

from supervisor.client.aioconnection import _AsyncConnection, _Waiter
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
from supervisor.client.pipes import ASYNCIO_STREAM_LIMIT, PipeReceiveStream, PipeSendStream, open_asyncio_streams
from supervisor.client.resume import DEFAULT_RESUME_S
from supervisor.client.session import (
    DEFAULT_TIMEOUT_S,
    FDS_PER_LEASE,
    NOTIFICATION_BACKLOG,
    Session,
    close_fds,
    default_socket,
)

__all__ = ["AsyncClient", "AsyncLease", "PipeReceiveStream", "PipeSendStream"]

# Bound on the release a `lease()` block makes on its way out, which runs
# shielded from cancellation: a daemon that does not answer in this long is
# stuck, and the lease then goes when the connection closes.
RELEASE_TIMEOUT_S = 10.0


# -- leases ------------------------------------------------------------------------


class AsyncLease(LeaseInfo):
    """A lease held through an `AsyncClient`. With ``fds=True``, `stdin` and
    `stdout` are the adapter's pipes as anyio byte streams, closed on release
    (under asyncio, `asyncio_streams()` makes them asyncio streams instead)."""

    def __init__(self, client: AsyncClient, result: Mapping[str, Any], *, detached: bool, fds: Sequence[int]) -> None:
        super().__init__(result, detached=detached)
        self._client = client
        self._ended = anyio.Event()
        self._callbacks: list[Callable[[AsyncLease], None]] = []
        self.stdin: PipeSendStream | None = None
        self.stdout: PipeReceiveStream | None = None
        if len(fds) == FDS_PER_LEASE:
            self.stdin, self.stdout = PipeSendStream(fds[0]), PipeReceiveStream(fds[1])
        # The pipes' owners once `asyncio_streams()` took them over.
        self._transports: tuple[asyncio.BaseTransport, ...] = ()

    async def wait_exited(self) -> AdapterExited:
        """Wait until the adapter is gone (or going, on shutdown) and say how.
        Raises LeaseLost if the connection ended first (ConnectionLost for a
        detached lease, which lives on). Cancellation raises Cancelled and
        changes nothing."""
        await self._ended.wait()
        if self.exited is None:
            if self.detached:
                raise ConnectionLost(f"the connection ended; detached {describe(self)} lives on, unobserved")
            raise LeaseLost(f"the connection ended while {describe(self)} was held", self)
        return self.exited

    def on_end(self, callback: Callable[[AsyncLease], None]) -> None:
        """Call `callback(lease)` once the adapter exited or the connection ended
        (at once if that already happened). It runs in the reader task: keep it
        short and non-blocking (start a task or set an event for real work)."""
        if self._ended.is_set():
            run_callback(callback, self)
        else:
            self._callbacks.append(callback)

    async def release(self) -> ReleaseResult | None:
        """Give the lease back and close its pipes; None if the daemon had already
        let it go or it was released before. Raises ConnectionLost if the
        connection is gone (a bound lease went with it), TimeoutError.

        Cancellation raises Cancelled with `released` still False (and stdout
        perhaps still open): the release may or may not have reached the
        daemon, and calling again is safe (it returns None if the first one went
        through)."""
        if self.released:
            return None
        await self.aclose_stdio()
        try:
            result: ReleaseResult | None = await self._client.release(self.token)
        except UnknownLease:
            result = None
        except ConnectionLost:
            if not self.detached:
                self._mark_released()
            raise
        self._mark_released()
        return result

    async def renew(self, ttl: float | None = None) -> float:
        """Extend a detached lease by `ttl` (default: its own); returns the new expiry.
        Raises what `AsyncClient.renew` raises. On an error or cancellation
        `expires_at` is left as it was (a cancelled renewal may still have been
        made by the daemon)."""
        self.expires_at = await self._client.renew(self.token, ttl)
        return self.expires_at

    async def logs(self, lines: int = 100) -> list[str]:
        """The tail of the adapter's stderr. Raises and is cancelled as
        `AsyncClient.logs` is."""
        return await self._client.logs(lease=self.token, lines=lines)

    async def asyncio_streams(self, *, limit: int = ASYNCIO_STREAM_LIMIT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The adapter's stdout and stdin as asyncio streams, for code written
        for them: ``reader, writer = await lease.asyncio_streams()``, then for
        the Agent Client Protocol SDK ``acp.connect_to_agent(client, writer,
        reader)``. The pipes move over: `stdin` and `stdout` are None from
        then on, and the streams are closed on release as they would have
        been. `limit` is the longest line ``reader.readline()`` returns. Call
        it before any task uses `stdin` or `stdout`, never while one waits
        on them.

        Raises RuntimeError, changing nothing, outside asyncio (under Trio use
        `stdin` and `stdout`) or if the lease has no pipes (taken without
        ``fds=True``, or already released or handed over). Cancellation
        closes the pipes."""
        if self.stdin is None or self.stdout is None:
            raise RuntimeError(f"{describe(self)} has no pipes to hand over: acquire it with fds=True")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("asyncio_streams() needs asyncio's event loop; under Trio use the lease's stdin and stdout") from None
        try:
            # stdin first: `aclose_stdio` closes it first, so a half-closed
            # pair fails here before anything is taken.
            fds = self.stdin.take_fd(), self.stdout.take_fd()
        except anyio.ClosedResourceError:
            raise RuntimeError(f"the pipes of {describe(self)} are closed (released, or aclose_stdio)") from None
        self.stdin = self.stdout = None
        reader, writer, self._transports = await open_asyncio_streams(*fds, limit=limit)
        return reader, writer

    async def aclose_stdio(self) -> None:
        """Close this lease's ends of the adapter's pipes (the adapter keeps running).
        Cancellation may leave stdout open; calling again closes what is left."""
        for transport in self._transports:
            transport.close()  # stdin's after writing what is buffered (or finding the adapter gone)
        for stream in (self.stdin, self.stdout):
            if stream is not None:
                await stream.aclose()

    def _mark_released(self) -> None:
        self.released = True
        self._client._forget(self)

    def _end(self, exited: AdapterExited | None) -> None:
        self._note_end(exited)
        if self._ended.is_set():
            return
        self._ended.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            run_callback(callback, self)


class _AsyncLeaseScope:
    """``async with client.lease(...)``: acquires on entry, releases on every exit."""

    def __init__(self, client: AsyncClient, request: dict[str, Any]) -> None:
        self._client = client
        self._request = request
        self._lease: AsyncLease | None = None

    async def __aenter__(self) -> AsyncLease:
        self._lease = await self._client._acquire(self._request)
        return self._lease

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._lease is not None
        lease = self._lease
        failure: Exception | None = None
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(RELEASE_TIMEOUT_S):
                    await lease.release()
            except (ConnectionLost, TimeoutError, DaemonError) as exc_release:
                failure = exc_release
        if failure is not None:
            if exc is not None:
                exc.add_note(f"releasing {describe(lease)} on the way out failed too: {failure!r}")
                return
            if isinstance(failure, ConnectionLost):
                raise LeaseLost(f"{describe(lease)} was lost with its connection: {failure}", lease) from failure
            raise failure
        if exc is None and lease.lost:
            raise LeaseLost(f"{describe(lease)} was lost with its connection", lease)


# -- the client ----------------------------------------------------------------------


def _wraps_only(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """Whether `group` is nothing but `exc` in one or more single-member groups."""
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
        inner = inner.exceptions[0]
        if inner is exc:
            return True
    return False


def _connect(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class AsyncClient(_AsyncConnection):
    """An async connection to the daemon, for asyncio or Trio.

    Use as ``async with AsyncClient(path) as client:`` (the reader task lives in
    that block). Any number of tasks may use one client at once. `timeout`
    bounds each wait for an answer (None: wait forever); entering raises
    OSError if the socket cannot be connected.

    Every request method raises what the blocking `Client`'s method of the same
    name raises, and is cancelled as `call_with_fds` is.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        resume: bool | float = False,
        on_resume: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """`resume` and `on_resume`: as for the blocking `Client` (on_resume
        runs in the reader task)."""
        self.path = path or default_socket()
        self.timeout = timeout
        self.resume_window = float(DEFAULT_RESUME_S if resume is True else resume or 0.0)
        self._on_resume = on_resume
        # The connection ended and a new one is being made (`resume`).
        self._reconnecting = False
        self.shutting_down = False
        self._sock: socket.socket | None = None
        self._session = Session()
        self._pending: dict[int, _Waiter] = {}
        self._leases: dict[str, AsyncLease] = {}
        self._notifications: collections.deque[dict[str, Any]] = collections.deque(maxlen=NOTIFICATION_BACKLOG)
        # Created on entry: anyio's primitives need the event loop to exist.
        self._notified: anyio.Event | None = None
        self._ended: anyio.Event | None = None
        self._send_lock: anyio.Lock | None = None
        self._refusal: DaemonError | None = None
        self._failure: Exception | None = None
        self._closing = False
        self._task_group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        self._notified, self._ended, self._send_lock = anyio.Event(), anyio.Event(), anyio.Lock()
        self._sock = await anyio.to_thread.run_sync(_connect, self.path, self.timeout)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._read_loop)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        """Close the connection and end the reader task. What the block raised
        leaves it as itself: the task group, which would wrap it in an
        ExceptionGroup, is unwrapped here (the reader task never fails, so a
        group holds nothing else)."""
        self._close()
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        try:
            return await self._task_group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            if exc is not None and _wraps_only(group, exc):
                return False  # the block's own exception goes on, traceback and all
            raise

    async def aclose(self) -> None:
        """End the connection now (the daemon releases its bound leases).
        Idempotent; the connection is closed even if the call is cancelled."""
        self._close()
        await anyio.lowlevel.checkpoint()

    @property
    def lost(self) -> bool:
        """True once the connection ended (for any reason)."""
        return self._failure is not None

    # -- raw requests --

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return its result. Raises DaemonError (a subclass
        named for the error), ConnectionLost, or TimeoutError; cancelled as
        `call_with_fds` is."""
        result, fds = await self.call_with_fds(method, params)
        close_fds(fds)
        return result

    async def call_with_fds(self, method: str, params: Mapping[str, Any] | None = None) -> tuple[Any, list[int]]:
        """Like `call`, also returning the fds passed with the answer (the caller
        owns them); raises as `call` does. If cancelled or timed out, a lease the
        daemon grants anyway is released by the client when the answer comes.

        Cancellation raises Cancelled. A request line whose sending has begun is
        sent whole first (shielded, at most `aioconnection.SEND_TIMEOUT_S`); its answer, if it
        comes, is disposed of: fds closed, a granted lease released."""
        if self._failure is not None:
            raise fresh_error(self._failure)
        session = self._session
        request_id, line = session.request(method, params)
        waiter = self._pending[request_id] = _Waiter()
        answered = False
        try:
            await self._send(line, session)
            with anyio.fail_after(self.timeout):
                await waiter.event.wait()
            answered = True
        finally:
            if not answered:
                self._give_up(request_id, waiter)
        reply = waiter.reply
        assert reply is not None
        if reply.error is not None:
            raise reply.error
        return reply.result, list(reply.fds)

    async def next_notification(self) -> dict[str, Any]:
        """The oldest notification not yet taken (the whole JSON object). Raises
        ConnectionLost once the connection ended and none are left. Cancellation
        raises Cancelled and takes no notification."""
        while not self._notifications:
            if self._failure is not None and not self._reconnecting:
                raise fresh_error(self._failure)
            assert self._notified is not None, "use the client inside `async with`"
            await self._notified.wait()
        return self._notifications.popleft()

    # -- the API (see `supervisor.client.Client` for what each raises) --

    async def hello(self) -> HelloResult:
        """As `Client.hello`; cancelled as `call_with_fds` is."""
        return await self.call("hello")  # type: ignore[no-any-return]

    async def acquire(
        self, job: str, adapter: str, *, params: Mapping[str, str] | None = None, fds: bool = False,
        detach: bool = False, ttl: float | None = None,
    ) -> AsyncLease:
        """Take a lease the caller must `release()`; prefer `lease()`. Raises as
        `Client.acquire` does. Cancellation raises Cancelled; a lease the daemon
        grants anyway is released when its answer comes."""
        return await self._acquire(acquire_params(job, adapter, params=params, fds=fds, detach=detach, ttl=ttl))

    def lease(
        self, job: str, adapter: str, *, params: Mapping[str, str] | None = None, fds: bool = False
    ) -> contextlib.AbstractAsyncContextManager[AsyncLease]:
        """``async with client.lease(job, adapter) as lease:`` a bound lease,
        released when the block exits however it exits (cancellation included).
        Raises what `acquire` raises on entry, and `LeaseLost` on a normal exit if
        the connection ended meanwhile. The release on the way out is shielded
        from cancellation and bounded by `RELEASE_TIMEOUT_S`; if it fails while
        the block raised, the failure is added to that exception as a note."""
        return _AsyncLeaseScope(self, acquire_params(job, adapter, params=params, fds=fds, detach=False, ttl=None))

    async def release(self, lease: LeaseInfo | str) -> ReleaseResult:
        """As `Client.release`; cancelled as `call_with_fds` is (the release
        may still reach the daemon)."""
        token = lease.token if isinstance(lease, LeaseInfo) else lease
        return await self.call("release", {"lease": token})  # type: ignore[no-any-return]

    async def renew(self, lease: LeaseInfo | str, ttl: float | None = None) -> float:
        """As `Client.renew`; cancelled as `call_with_fds` is (the renewal may
        still reach the daemon)."""
        token = lease.token if isinstance(lease, LeaseInfo) else lease
        params: dict[str, Any] = {"lease": token} | ({"ttl": ttl} if ttl is not None else {})
        return float((await self.call("renew", params))["expires_at"])

    async def release_job(self, job: str) -> ReleaseJobResult:
        """As `Client.release_job`; cancelled as `call_with_fds` is (the release
        may still reach the daemon)."""
        return await self.call("release_job", {"job": job})  # type: ignore[no-any-return]

    async def resume(self, leases: Sequence[str]) -> dict[str, list[str]]:
        """As `Client.resume`; cancelled as `call_with_fds` is."""
        return await self.call("resume", {"leases": list(leases)})  # type: ignore[no-any-return]

    async def upgrade(self) -> dict[str, Any]:
        """As `Client.upgrade`; cancelled as `call_with_fds` is (the upgrade
        may still happen)."""
        return await self.call("upgrade", {})  # type: ignore[no-any-return]

    async def status(
        self, job: str | None = None, *, adapter: str | None = None, state: str | None = None, uid: int | None = None
    ) -> Status:
        """As `Client.status`; cancelled as `call_with_fds` is."""
        return await self.call("status", status_params(job, adapter, state, uid))  # type: ignore[no-any-return]

    async def sweep(self, *, deep: bool = False) -> dict[str, Any]:
        """As `Client.sweep`; cancelled as `call_with_fds` is (the sweep still
        runs in the daemon)."""
        return await self.call("sweep", {"deep": True} if deep else {})  # type: ignore[no-any-return]

    async def reports(self, limit: int = 10) -> list[dict[str, Any]]:
        """As `Client.reports`; cancelled as `call_with_fds` is."""
        return (await self.call("reports", {"limit": limit}))["reports"]  # type: ignore[no-any-return]

    async def adapters(self) -> list[AdapterInfo]:
        """As `Client.adapters`; cancelled as `call_with_fds` is."""
        return (await self.call("adapters", {}))["adapters"]  # type: ignore[no-any-return]

    async def metrics(self) -> str:
        """As `Client.metrics`; cancelled as `call_with_fds` is."""
        return (await self.call("metrics", {}))["text"]  # type: ignore[no-any-return]

    async def logs(self, instance: str | None = None, *, lease: str | None = None, lines: int = 100) -> list[str]:
        """As `Client.logs`; cancelled as `call_with_fds` is."""
        return (await self.call("logs", logs_params(instance, lease, lines)))["lines"]  # type: ignore[no-any-return]

    # -- internals --

    async def _acquire(self, request: dict[str, Any]) -> AsyncLease:
        result, fds = await self.call_with_fds("acquire", request)
        lease = AsyncLease(self, result, detached=bool(request.get("detach")), fds=fds)
        self._leases[lease.token] = lease
        if self._failure is not None:
            lease._end(None)
        return lease

    def _forget(self, lease: LeaseInfo) -> None:
        self._leases.pop(lease.token, None)
