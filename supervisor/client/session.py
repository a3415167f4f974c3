"""The client's side of the wire protocol, without I/O policy: the errors a
client raises, the shapes of results and notifications, and `Session`, which
frames lines, matches answers to requests by id and hands out passed fds.

Shared by the blocking `supervisor.client.Client` and the async
`supervisor.client.aio.AsyncClient`; the public names are re-exported by
`supervisor.client`.
"""

from __future__ import annotations

import array
import collections
import contextlib
import itertools
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import msgspec
import structlog

from supervisor.core import config as config_module
from supervisor.core import errors
from supervisor.core.protocol import MAX_RESUME_LEASES

# Seconds to wait for an answer: acquire waits for the spawn, status for a scan of
# the trees, a sweep for a scan of the process table; all are well under this.
DEFAULT_TIMEOUT_S = 30.0

# Notifications kept for `next_notification()`; older ones are dropped, so a
# client that never asks does not grow without bound.
NOTIFICATION_BACKLOG = 1024

# After a failed send, how long to let the reader pick up the reason the daemon
# gave for closing (a refusal is sent just before the close).
REFUSAL_GRACE_S = 1.0


def default_socket() -> str:
    """`$ADAPTER_SUPERVISOR_SOCKET`, else the default socket path for this user."""
    return os.environ.get("ADAPTER_SUPERVISOR_SOCKET") or config_module.default_socket_path()


log = structlog.get_logger()

# Largest number of file descriptors one read may carry (one response has two).
MAX_FDS = 4

# The daemon passes stdin's write end and stdout's read end with an fds acquire.
FDS_PER_LEASE = 2

RECEIVE_BYTES = 65536

# msgspec's JSON, as the daemon's: the codec runs on the client's side of every
# round trip, and msgspec's costs less there than the json module's.
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

# The `reason` given to leases when the daemon announces `shutting_down`; the
# daemon then stops every tree without a further `adapter_exited`.
SHUTDOWN_REASON = "shutdown"

# A client made with `resume=True` that lost its connection tries to connect
# again this often, for at most its `resume` seconds (the daemon's
# `resume_grace` is 30 s by default: longer is pointless, the leases are gone).
RECONNECT_INTERVAL_S = 0.2
DEFAULT_RESUME_S = 30.0
# One reconnect attempt waits at most this long for its answers (a socket
# that accepts and does not answer must not use up the whole window).
RECONNECT_ATTEMPT_S = 2.0
# The notification a resuming client adds to its own stream when it is
# connected again: {"resumed": [tokens], "lost": [tokens], "generation": n}.
RESUMED_NOTICE = "resumed"


# -- errors --------------------------------------------------------------------


class DaemonError(Exception):
    """The daemon answered with an error: `code` (docs/protocol.md, "Errors"), `message` (written
    for a person) and `data` (extra detail, often None)."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"{message} (error {code})")
        self.code = code
        self.message = message
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message, self.data))


class InvalidRequest(DaemonError):
    """-32700 / -32600: the daemon could not read the request (a client bug)."""


class MethodNotFound(DaemonError):
    """-32601: the daemon does not know the method (an older daemon?)."""


class InvalidParams(DaemonError):
    """-32602: a parameter is missing, unknown or out of range; the message says which."""


class InternalError(DaemonError):
    """-32603: a bug in the daemon; its log has the details."""


class UnknownAdapter(DaemonError):
    """1001: no adapter of that name is configured."""


class UnknownLease(DaemonError):
    """1002: the lease was never issued, or was released, expired or released by `release_job`."""


class SpawnFailed(DaemonError):
    """1003: the adapter's command could not be started."""


class LimitReached(DaemonError):
    """1004: max_instances, the memory budget or max_connections is reached."""


class PermissionDenied(DaemonError):
    """1005: this uid may not use the daemon, or not touch that lease."""


class ShuttingDown(DaemonError):
    """1006: the daemon is stopping and takes no new leases."""


class Conflict(DaemonError):
    """1007: the live instance runs with other params, or has no pipes to pass."""


ERROR_CLASSES: dict[int, type[DaemonError]] = {
    errors.PARSE_ERROR: InvalidRequest,
    errors.INVALID_REQUEST: InvalidRequest,
    errors.METHOD_NOT_FOUND: MethodNotFound,
    errors.INVALID_PARAMS: InvalidParams,
    errors.INTERNAL_ERROR: InternalError,
    errors.UNKNOWN_ADAPTER: UnknownAdapter,
    errors.UNKNOWN_LEASE: UnknownLease,
    errors.SPAWN_FAILED: SpawnFailed,
    errors.LIMIT_REACHED: LimitReached,
    errors.PERMISSION_DENIED: PermissionDenied,
    errors.SHUTTING_DOWN: ShuttingDown,
    errors.CONFLICT: Conflict,
}


def error_from_wire(error: object) -> DaemonError:
    """The exception for a JSON-RPC error object, of the class named for its code
    (`DaemonError` itself for a code this client does not know)."""
    if not isinstance(error, Mapping):
        return InternalError(errors.INTERNAL_ERROR, f"malformed error from the daemon: {error!r}")
    code = error.get("code")
    code = code if isinstance(code, int) else errors.INTERNAL_ERROR
    cls = ERROR_CLASSES.get(code, DaemonError)
    return cls(code, str(error.get("message", "")), error.get("data"))


class ConnectionLost(ConnectionError):
    """The connection to the daemon ended; bound leases went with it. Not retried."""


class LeaseLost(ConnectionLost):
    """A bound lease died with its connection while it was held (`lease` names it)."""

    def __init__(self, message: str, lease: LeaseInfo | None = None) -> None:
        super().__init__(message)
        self.lease = lease


# -- what the daemon sends -----------------------------------------------------


@dataclass(frozen=True)
class AdapterExited:
    """The adapter of a lease is gone (`adapter_exited`), or going: after
    `shutting_down` every lease gets one with reason "shutdown" and returncode None.

    `reason` is exited, killed, memory_limit (the tree passed its adapter's
    memory_limit), pids_limit (it held more processes than its max_pids),
    lease_expired, released or shutdown.
    """

    instance: str
    job: str
    adapter: str
    pid: int | None
    returncode: int | None
    reason: str

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> AdapterExited:
        return cls(
            instance=str(params.get("instance", "")), job=str(params.get("job", "")),
            adapter=str(params.get("adapter", "")), pid=params.get("pid"),
            returncode=params.get("returncode"), reason=str(params.get("reason", "")),
        )


class HelloResult(TypedDict):
    server: str
    version: str
    protocol: int
    pid: int
    instance_id: str
    # Incarnations of the daemon on its state_dir: grows on a restart or an upgrade.
    generation: int


class ReleaseResult(TypedDict):
    refcount: int
    stopping: bool


class ReleaseJobResult(TypedDict):
    released: int
    instances: list[str]


class LeaseStatus(TypedDict):
    """One lease of an instance, as `status` shows it."""

    # The whole token to its own uid and to root, else its first 8 characters.
    lease: str
    detached: bool
    # Unix time a detached lease expires unless renewed; None for a bound one.
    expires_at: float | None
    # The uid that acquired it.
    uid: int
    # The holding connection's process; None while no connection holds it.
    pid: int | None


class _ExitedInstanceFields(TypedDict, total=False):
    """What only an exited instance's status row has. (A base of its own:
    `NotRequired` in a postponed annotation is not seen before Python 3.12.)"""

    # The root's exit status (minus the signal number if a signal killed
    # it; None if unknown) and why the instance ended, as in `AdapterExited`.
    returncode: int | None
    reason: str | None


class InstanceStatus(_ExitedInstanceFields):
    instance: str
    job: str
    adapter: str
    # starting, running, lingering, stopping or exited.
    state: str
    pid: int | None
    pids: list[int]
    refcount: int
    started_at: float | None
    rss_bytes: int
    # Taken over from a previous incarnation of the daemon after a crash.
    adopted: bool
    # The uid whose acquire spawned it (None: not known, from an older daemon).
    uid: int | None
    leases: list[LeaseStatus]


class DaemonStatus(TypedDict, total=False):
    pid: int
    version: str
    instance_id: str
    generation: int
    started_at: float
    uptime_s: float
    instances: int
    leases: int
    connections: int
    cgroup_mode: bool
    # The cgroup directory of the instances; None in process-table mode.
    cgroup_base: str | None
    # clone3 or subprocess.
    spawner: str
    shutting_down: bool
    rss_bytes: int
    memory_budget: int | None
    sweep_interval: float


class Status(TypedDict):
    daemon: DaemonStatus
    instances: list[InstanceStatus]


class AdapterInfo(TypedDict):
    """One configured adapter, as the `adapters` method shows it."""

    name: str
    # The argv template, {job} and {param:NAME} unfilled.
    command: list[str]
    # The names a client may fill in with `params`.
    params: list[str]
    # pipe or null.
    stdio: str
    # The user its processes run as; None for the daemon's own.
    user: str | None
    max_instances: int
    # Bytes of tree RSS; None for no limit.
    memory_limit: int | None
    # Its instances starting, running or lingering now.
    live: int


def acquire_params(
    job: str, adapter: str, *, params: Mapping[str, str] | None, fds: bool, detach: bool, ttl: float | None
) -> dict[str, Any]:
    """The params of an `acquire` request, leaving out the defaults."""
    request: dict[str, Any] = {"job": job, "adapter": adapter}
    if params:
        request["params"] = dict(params)
    if fds:
        request["fds"] = True
    if detach:
        request["detach"] = True
    if ttl is not None:
        request["ttl"] = ttl
    return request


def logs_params(instance: str | None, lease: str | None, lines: int) -> dict[str, Any]:
    """The params of a `logs` request; raises ValueError unless exactly one of
    `instance` and `lease` is given."""
    if (instance is None) == (lease is None):
        raise ValueError("logs() needs exactly one of instance or lease")
    return {"instance": instance, "lines": lines} if instance is not None else {"lease": lease, "lines": lines}


# -- the connection, without I/O -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to request `id`: `result` (with the fds it carried) or `error`."""

    id: int
    method: str
    result: Any = None
    # A DaemonError, or ConnectionLost for an answer that will never come.
    error: Exception | None = None
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Notice:
    """A notification: `method` and `params`, and `message`, the whole object."""

    method: str
    params: Mapping[str, Any]
    message: dict[str, Any]


@dataclass(frozen=True)
class Refusal:
    """An error without an id: the daemon refuses the connection and closes it."""

    error: DaemonError


@dataclass(frozen=True)
class Stray:
    """A successful answer nobody waits for (its caller timed out or was
    cancelled): close `fds` and release `lease`, if any."""

    lease: str | None
    fds: tuple[int, ...]


Incoming = Reply | Notice | Refusal | Stray


class Session:
    """The state of one connection, without I/O: request ids, line framing, which
    fds belong to which answer, and the requests whose callers stopped waiting.

    File descriptors travel on the first byte of their response line, so they
    arrive no later than the line. Only a successful `acquire` with `fds: true`
    carries them, two per answer, so they are handed to those answers in order.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._methods: dict[int, str] = {}
        self._expects_fds: set[int] = set()
        self._abandoned: set[int] = set()

    def request(self, method: str, params: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
        """A new request: its id and the line to send. Raises TypeError if
        `params` holds a value JSON cannot encode."""
        request_id = next(self._ids)
        self._methods[request_id] = method
        if method == "acquire" and params and params.get("fds"):
            self._expects_fds.add(request_id)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": dict(params or {})}
        return request_id, _encode(message) + b"\n"

    def abandon(self, request_id: int) -> None:
        """Nobody waits for `request_id` any more: its answer becomes a `Stray`."""
        if request_id in self._methods:
            self._abandoned.add(request_id)

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Incoming]:
        """Take bytes (and the fds read with them); return what they complete.

        Raises ConnectionLost if the daemon sent something that is not JSON-RPC
        (the connection cannot be trusted after that).
        """
        if fds:
            self._fds.extend(fds)
        if not self._buffer and data[:1] == b"{" and data.find(b"\n") == len(data) - 1:
            # The common case, one whole message in one read: no buffer copies.
            return [self._interpret(data)]
        self._buffer += data
        incoming: list[Incoming] = []
        while (newline := self._buffer.find(b"\n")) != -1:
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if line.strip():
                incoming.append(self._interpret(line))
        return incoming

    def leftover_fds(self) -> list[int]:
        """Fds received but not handed out (the caller closes them)."""
        fds = list(self._fds)
        self._fds.clear()
        return fds

    def _interpret(self, line: bytes) -> Incoming:
        try:
            message = _decode(line)
        except ValueError as exc:  # msgspec.DecodeError is one
            raise ConnectionLost(f"the daemon sent a line that is not JSON ({exc}): {line[:200]!r}") from exc
        if not isinstance(message, dict):
            raise ConnectionLost(f"the daemon sent a line that is not a JSON-RPC message: {line[:200]!r}")
        if "id" not in message:
            params = message.get("params")
            return Notice(str(message.get("method", "")), params if isinstance(params, dict) else {}, message)
        request_id = message["id"]
        if request_id is None:
            return Refusal(error_from_wire(message.get("error")))
        method = self._methods.pop(request_id, None)
        if method is None:
            raise ConnectionLost(f"the daemon answered request {request_id!r}, which was never sent")
        fds: tuple[int, ...] = ()
        if request_id in self._expects_fds:
            self._expects_fds.discard(request_id)
            if "error" not in message:
                fds = tuple(self._fds.popleft() for _ in range(min(FDS_PER_LEASE, len(self._fds))))
        if request_id in self._abandoned:
            self._abandoned.discard(request_id)
            result = message.get("result")
            lease = result.get("lease") if method == "acquire" and isinstance(result, dict) else None
            return Stray(lease if "error" not in message else None, fds)
        if "error" in message:
            return Reply(request_id, method, error=error_from_wire(message["error"]))
        return Reply(request_id, method, result=message.get("result"), fds=fds)


def receive_with_fds(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int]]:
    """One read: the bytes and the fds that came with them, close-on-exec.
    `flags` adds recvmsg flags (MSG_DONTWAIT for one read that must not block).

    Raises OSError (BlockingIOError when there is nothing and the read may not block).
    """
    data, ancillary, _flags, _address = sock.recvmsg(RECEIVE_BYTES, _ANCILLARY_BYTES, _RECEIVE_FLAGS | flags)
    if not ancillary:
        return data, []
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


# Computed once: the socket module's flags are enums, and or-ing them per read
# costs more than the read's bookkeeping.
_ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_RECEIVE_FLAGS = int(socket.MSG_CMSG_CLOEXEC)


def fresh_error(error: Exception) -> Exception:
    """A new exception like `error` (a DaemonError or ConnectionLost), so that one
    stored failure can be raised in many threads or tasks without their
    tracebacks piling up on one object."""
    if isinstance(error, DaemonError):
        return type(error)(error.code, error.message, error.data)
    return type(error)(*error.args)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def run_callback(callback: Callable[[Any], None], lease: LeaseInfo) -> None:
    """Run a user's `on_end` callback; its failure is logged, never raised into
    the reader (which serves every other lease of the connection)."""
    try:
        callback(lease)
    except Exception:  # user code: anything may come out, and the reader must survive it
        log.exception("client.callback_failed", lease=lease.token[:8], instance=lease.instance)


# -- leases ---------------------------------------------------------------------


class LeaseInfo:
    """What the daemon said when it granted a lease, and what happened since."""

    def __init__(self, result: Mapping[str, Any], *, detached: bool) -> None:
        self.token: str = result["lease"]
        self.instance: str = result["instance"]
        self.job: str = result["job"]
        self.adapter: str = result["adapter"]
        self.pid: int | None = result.get("pid")
        self.refcount: int = result.get("refcount", 1)
        self.spawned: bool = result.get("spawned", False)
        self.started_at: float | None = result.get("started_at")
        self.expires_at: float | None = result.get("expires_at")
        self.detached = detached
        # Set once the adapter is gone or going (see `AdapterExited`).
        self.exited: AdapterExited | None = None
        # True once the connection ended while the lease was held.
        self.lost = False
        # True once this client released the lease (or learnt it was gone).
        self.released = False

    def _note_end(self, exited: AdapterExited | None) -> None:
        """Record how the lease ended: the adapter exited (`exited`) or the
        connection ended (None; a detached lease survives that)."""
        if exited is None:
            self.lost = not self.detached
        elif self.exited is None:
            self.exited = exited

    def __repr__(self) -> str:
        state = "released" if self.released else "lost" if self.lost else "exited" if self.exited else "held"
        return f"<{type(self).__name__} {self.token[:8]} job={self.job!r} adapter={self.adapter!r} pid={self.pid} {state}>"


def describe(lease: LeaseInfo) -> str:
    return f"lease {lease.token[:8]} (job {lease.job!r}, adapter {lease.adapter!r})"


@dataclass
class Reconnected:
    """A new connection of a resuming client, with what `resume` said."""

    sock: socket.socket
    session: Session
    resumed: list[str]
    lost: list[str]
    generation: int | None
    # What came after the answers (notifications), to handle like any other.
    later: list[Incoming]


def reconnect_and_resume(
    path: str, tokens: Sequence[str], timeout: float | None, make_socket: Callable[[], socket.socket]
) -> Reconnected:
    """Blocking: connect to `path` again and take back the bound leases of
    `tokens` (`resume`), on a socket from `make_socket` (left blocking).
    Tokens the daemon does not give back are `lost`; a daemon that does not
    know `resume` gives none back. Raises OSError (cannot connect, the read
    failed or timed out), ConnectionLost (closed before answering), the
    DaemonError of a refusal."""
    sock = make_socket()
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        session = Session()
        hello_id, line = session.request("hello", {})
        resume_id = None
        if tokens:
            resume_id, resume_line = session.request("resume", {"leases": list(tokens)[:MAX_RESUME_LEASES]})
            line += resume_line
        sock.sendall(line)
        answers: dict[int, Reply] = {}
        later: list[Incoming] = []
        while hello_id not in answers or (resume_id is not None and resume_id not in answers):
            data, fds = receive_with_fds(sock)
            if not data:
                close_fds(fds)
                raise ConnectionLost("the daemon closed the new connection before answering")
            for incoming in session.receive(data, fds):
                if isinstance(incoming, Refusal):
                    raise incoming.error
                if isinstance(incoming, Reply) and incoming.id in (hello_id, resume_id):
                    answers[incoming.id] = incoming
                else:
                    later.append(incoming)
    except BaseException:
        sock.close()
        raise
    hello = answers[hello_id].result if answers[hello_id].error is None else None
    resumed: list[str] = []
    if resume_id is not None and answers[resume_id].error is None:
        result = answers[resume_id].result
        given = result.get("resumed") if isinstance(result, dict) else None
        if not isinstance(given, list) or not all(isinstance(token, str) for token in given):
            sock.close()
            raise ConnectionLost(f"the daemon answered resume with {result!r}, not a list of tokens")
        resumed = [token for token in given if token in tokens]
    return Reconnected(
        sock=sock, session=session, resumed=resumed, lost=[t for t in tokens if t not in resumed],
        generation=hello.get("generation") if isinstance(hello, dict) else None, later=later,
    )


def attempt_timeout(timeout: float | None, remaining: float) -> float:
    """How long one reconnect attempt may wait: RECONNECT_ATTEMPT_S, less if
    the client's timeout or the resume window left is shorter."""
    bound = min(RECONNECT_ATTEMPT_S, max(remaining, 0.05))
    return bound if timeout is None else min(timeout, bound)


def resumed_notice(reconnected: Reconnected) -> dict[str, Any]:
    """The notification a resuming client adds to its stream once connected again."""
    params = {"resumed": reconnected.resumed, "lost": reconnected.lost, "generation": reconnected.generation}
    return {"jsonrpc": "2.0", "method": RESUMED_NOTICE, "params": params}


def status_params(
    job: str | None = None, adapter: str | None = None, state: str | None = None, uid: int | None = None
) -> dict[str, Any]:
    """The params of `status` for the filters given (None: not filtered on)."""
    given = {"job": job, "adapter": adapter, "state": state, "uid": uid}
    return {name: value for name, value in given.items() if value is not None}
