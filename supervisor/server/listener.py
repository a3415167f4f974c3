"""The control socket's server: accepting, authorization, and serving each connection.

Each connection (`supervisor.server.connection.Connection`: whole lines out,
never interleaved) has a task that owns it. While a connection is idle its
task lends its socket to the server's `ReadHub`: the hub's one task reads
every ready connection and answers the requests the engine can answer
without waiting (`Method.answers_now`) on the spot, without a trip through
the scheduler per request. Whatever must wait (a spawn, a scan, a peer slow
to read) goes back to the connection's task, which answers in order what
waits briefly or not at all (`Waits.NEVER`, `Waits.BRIEFLY`) and starts one
task for each other request (so responses may come out of order), then lends
its socket to the hub again. Exceptions become wire errors in one place
(`responses.py`); tracebacks go to the log. A reply's after-work
(`Reply.after`) runs right after its line is handed to the socket, whatever
became of the send.

The socket file and its peers' credentials are `controlsocket.py`; a
request's response and the error boundary are `responses.py`; the pause for
an in-place upgrade and what it hands over are `handover.py`.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import socket as stdlib_socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from supervisor.core import protocol
from supervisor.core.config import DaemonConfig
from supervisor.core.errors import (
    LimitReached,
    PermissionDenied,
    ShuttingDown,
    SupervisorError,
)
from supervisor.engine.engine import Engine
from supervisor.engine.instances import AfterReply, run_after
from supervisor.engine.operation import Reply
from supervisor.server.connection import Connection
from supervisor.server.controlsocket import _UCRED, SocketGroupRefused, _peer_groups, bind_control_socket
from supervisor.server.handover import HandedConnection, ServerState, _Handover
from supervisor.server.methods import METHODS, PARAMS, Waits, method_for
from supervisor.server.readhub import TURN_BUDGET_S, ReadHub
from supervisor.server.responses import _Responses

# ServerState, SocketGroupRefused and bind_control_socket live in handover.py
# and controlsocket.py; serve.py and upgrade.py import them from here.
__all__ = ["ControlServer", "ServerState", "SocketGroupRefused", "bind_control_socket"]

log = structlog.get_logger()

# Bytes read from a client per receive call.
RECEIVE_BYTES = 65536

# Bytes the hub holds for one connection while the server pauses for an
# upgrade; past it, that connection is not read until the pause ends.
MAX_HELD_BYTES = 1 << 20

# A refused peer gets its error line, then the socket is closed after at most
# this long even if it never reads.
REFUSE_TIMEOUT_S = 1.0

# Lines of one connection served in one turn (of the hub, or of the
# connection's task) before other connections have theirs: a peer that
# pipelines a whole receive buffer of cheap requests (a thousand `hello`s)
# must not hold every other client up for the tens of ms those take, while an
# ordinary batch costs no yield beyond the read's own. A turn also ends once
# it has taken TURN_BUDGET_S (requests that spawn take a millisecond each).
ANSWERS_PER_TURN = 32
ROOT_UID = 0


@dataclass
class _Handback:
    """What a connection's task must do when the hub hands it back: finish
    the line under way (`Connection.flush`), send `line` if the hub could not
    start it, then end, or serve `messages` in order."""

    # An answer the hub could not start: another line was under way.
    line: bytes | None = None
    # Lines decoded and not yet served.
    messages: list[protocol.Message] = field(default_factory=list)
    # The peer closed its end cleanly: answers in flight still go out.
    end_of_input: bool = False
    # The connection must close at once (reset, fatal protocol error).
    fatal: bool = False
    # A request the hub answered whose Reply waits (`Reply.later`): served in
    # a task of its own before `messages`.
    waiting: tuple[protocol.Request, Reply] | None = None


class ControlServer(_Responses, _Handover):
    """Accepts clients on the control socket and serves their requests.

    `pause` (for an in-place upgrade) brings every connection to a point
    where it can be handed over: nothing decoded and not yet answered,
    nothing half sent, no request in flight; `export_state` then names them
    and `resume_serving` carries on if the upgrade did not happen. A server
    built with `handed` serves the connections of the previous image."""

    def __init__(self, engine: Engine, *, handed: ServerState | None = None) -> None:
        self.engine = engine
        self._ids = itertools.count(handed.next_id if handed is not None else 1)
        self.connections: dict[int, Connection] = {}
        # Connections handed over by an upgrade are the engine's peers at once,
        # before its trees are taken back: no notification is lost.
        self._handed = [self._take_handed(c) for c in handed.connections] if handed is not None else []
        self._listen_scope: trio.CancelScope | None = None
        self._hub: ReadHub | None = None
        # Pausing for an upgrade: the hub goes on reading every connection lent
        # to it (`_lent`: how to take it back, and its decoder), but holds what
        # it reads (`_held`) instead of serving it, so that no client blocks
        # sending while the daemon waits for it to read.
        self._pausing = False
        self._resumed = trio.Event()
        self._lent: dict[int, tuple[Callable[[_Handback], None], protocol.Decoder]] = {}
        self._held: dict[int, bytearray] = {}
        # Connections whose peer ended its input, by id, with their decoders:
        # only their requests in flight keep them open.
        self._ended: dict[int, protocol.Decoder] = {}
        self._accept_scope: trio.CancelScope | None = None
        # Accepted sockets not yet a connection (or refused).
        self._arriving = 0

    async def serve(
        self, listener: trio.socket.SocketType, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept until `stop_accepting`, then keep serving open connections until
        cancelled. Cancellation closes every connection (their leases are released)."""
        self._hub = hub = ReadHub()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hub.run)
                for connection, decoder, early in self._handed:
                    connection.start_sending(nursery)
                    nursery.start_soon(self._serve_registered, connection, decoder, early)
                self._handed = []
                await self._accept(listener, nursery, task_status)
        finally:
            hub.close()

    async def _accept(self, listener: trio.socket.SocketType, nursery: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as self._listen_scope:
            task_status.started()
            while True:
                if self._pausing:
                    await self._resumed.wait()
                    continue
                sock = None
                with trio.CancelScope() as self._accept_scope:
                    try:
                        sock, _ = await listener.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.error("server.accept_failed", error=os.strerror(exc.errno))
                            await trio.sleep(0.1)
                            continue
                        raise
                if sock is not None:
                    self._arriving += 1
                    nursery.start_soon(self._serve_connection, sock, nursery)
        listener.close()
        await trio.sleep_forever()

    def stop_accepting(self) -> None:
        if self._listen_scope is not None:
            self._listen_scope.cancel()

    async def _serve_connection(self, sock: trio.socket.SocketType, server_nursery: trio.Nursery) -> None:
        try:
            pid, uid, gid = _UCRED.unpack(
                sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _UCRED.size)
            )
        except BaseException:
            self._arriving -= 1
            raise
        refusal: SupervisorError | None = None
        groups = tuple(_peer_groups(sock))
        if not self._allowed(uid, {gid, *groups}):
            refusal = PermissionDenied(
                f"uid {uid} / gid {gid} may not use this daemon; add it to allowed_uids or allowed_gids (or its user to socket_group)"
            )
        elif self.engine.shutting_down:
            refusal = ShuttingDown("the daemon is shutting down")
        elif len(self.connections) >= self._connection_limit():
            refusal = LimitReached(
                f"the daemon already serves {len(self.connections)} connections "
                f"(max_connections {self.config.max_connections}, or half its open-file limit)"
            )
        if refusal is not None:
            self._arriving -= 1
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
            send_timeout=self.config.send_timeout, groups=groups,
        )
        self._arriving -= 1
        log.info("connection.opened", connection=connection.id, pid=pid, uid=uid)
        await self._serve_open(connection, protocol.Decoder(self.config.max_message_bytes, PARAMS))

    def _take_handed(self, handed: HandedConnection) -> tuple[Connection, protocol.Decoder, list[protocol.Message]]:
        """A connection the previous image handed over, registered as it left
        it, with its decoder and the lines its unread bytes already make."""
        plain = stdlib_socket.socket(fileno=handed.fd)
        plain.setblocking(False)
        connection = Connection(
            id=handed.id, sock=plain, pid=handed.pid, uid=handed.uid, gid=handed.gid,
            notify_nursery=None, send_timeout=self.config.send_timeout, groups=tuple(handed.groups),
        )
        decoder = protocol.Decoder(self.config.max_message_bytes, PARAMS)
        early = decoder.feed(handed.unread)
        self.connections[connection.id] = connection
        self.engine.connected(connection)
        return connection, decoder, early

    async def _serve_open(self, connection: Connection, decoder: protocol.Decoder) -> None:
        """Register an open connection and serve it until it ends."""
        self.connections[connection.id] = connection
        self.engine.connected(connection)
        await self._serve_registered(connection, decoder, [])

    async def _serve_registered(
        self, connection: Connection, decoder: protocol.Decoder, early: list[protocol.Message]
    ) -> None:
        """Serve a registered connection until it ends, then release what it held."""
        plain = connection.sock
        try:
            async with trio.open_nursery() as nursery:
                if not await self._read_requests(connection, nursery, decoder, early):
                    nursery.cancel_scope.cancel()
                # On a clean end of input the requests in flight still get their
                # answers (a client may half-close after its last request).
        finally:
            connection.close()
            trio.lowlevel.notify_closing(plain)
            plain.close()
            del self.connections[connection.id]
            self._ended.pop(connection.id, None)
            self.engine.disconnected(connection)
            log.info("connection.closed", connection=connection.id)

    async def _read_requests(
        self,
        connection: Connection,
        nursery: trio.Nursery,
        decoder: protocol.Decoder,
        early: list[protocol.Message],
    ) -> bool:
        """Serve requests. True on a clean end of input, False when the
        connection must close at once (reset, fatal protocol error).

        While nothing needs waiting, the hub reads the connection and answers
        (`_serve_ready`). What it hands back is served here: requests that
        wait briefly or not at all right here, in order, without a task;
        others each in a task of their own.
        `early`: lines decoded before (a handed connection's) to serve first.
        While the server pauses, the connection parks between batches.
        Cancellation: returns nothing, raises Cancelled.
        """
        handback = _Handback(messages=early)
        await connection.flush()  # an answer the previous image owed may be under way
        while not connection.closed:
            if not handback.messages and len(self._held.get(connection.id, b"")) > MAX_HELD_BYTES:
                # Held too much during a pause: wait it out, then serve it.
                await connection.flush()
                await self._resumed.wait()
                handback = _Handback(messages=decoder.feed(bytes(self._held.pop(connection.id, b""))))
            if not handback.messages:
                handback = await self._lend_to_hub(connection, decoder)
            await connection.flush()
            if handback.line is not None:
                await connection.send(handback.line)
            if handback.fatal:
                return False
            if handback.waiting is not None:
                request, reply = handback.waiting
                await self._serve_in_own_task(connection, nursery, request, METHODS[request.method], reply)
            if handback.end_of_input:
                # Answers still due go out (requests in flight send their
                # own); an upgrade may hand the connection over meanwhile.
                self._ended[connection.id] = decoder
                await connection.flush()
                return True
            turn_began = time.perf_counter()
            for answered, message in enumerate(handback.messages, start=1):
                if connection.closed:
                    return False
                if isinstance(message, protocol.BadMessage):
                    await connection.send(self._rejection(connection, message))
                    if message.fatal:
                        return False
                    continue
                try:
                    method = method_for(self.engine, message)
                except SupervisorError as exc:
                    await connection.send(self._error_line(connection, message, exc))
                    continue
                if method.waits is not Waits.LONG or method.answers_now(self.engine, message.params):
                    # No in-flight slot: nothing more is read from the peer
                    # until this is answered, so these cannot pile up.
                    await self._serve_request(connection, message, method, nursery=nursery)
                else:
                    await self._serve_in_own_task(connection, nursery, message, method)
                if answered % ANSWERS_PER_TURN == 0 or time.perf_counter() - turn_began > TURN_BUDGET_S:
                    await trio.lowlevel.checkpoint()
                    turn_began = time.perf_counter()
            handback = _Handback()
        return False



    async def _lend_to_hub(self, connection: Connection, decoder: protocol.Decoder) -> _Handback:
        """Let the hub serve the connection until it hands it back.
        Cancellation: the hub lets go of the connection first."""
        hub = self._hub
        assert hub is not None, "serve() runs the hub"
        task = trio.lowlevel.current_task()
        fd = connection.sock.fileno()
        handback: _Handback | None = None
        aborted = False

        def on_readable() -> None:
            nonlocal handback
            try:
                result = self._serve_ready(connection, decoder)
            except Exception:  # a bug, logged whole: the hub serves the others on
                log.exception("connection.hub_failed", connection=connection.id)
                connection.close()
                result = _Handback(fatal=True)
            if result is None:
                return
            if aborted:
                # The task was cancelled while this ran (and let go of the fd):
                # nobody will finish a line this began.
                connection.close()
                return
            handback = result
            self._lent.pop(connection.id, None)
            hub.unwatch(fd)
            trio.lowlevel.reschedule(task)

        def take_back(given: _Handback) -> None:
            """Hand the connection back to its task with `given` to do."""
            nonlocal handback
            handback = given
            self._lent.pop(connection.id, None)
            hub.unwatch(fd)
            trio.lowlevel.reschedule(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            nonlocal aborted
            aborted = True
            self._lent.pop(connection.id, None)
            hub.unwatch(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        hub.watch(fd, on_readable)
        self._lent[connection.id] = (take_back, decoder)
        await trio.lowlevel.wait_task_rescheduled(abort)
        assert handback is not None
        return handback

    def _serve_ready(self, connection: Connection, decoder: protocol.Decoder) -> _Handback | None:
        """The hub's turn at a connection with input: read once, and answer
        the lines that need no waiting. None keeps the connection in the hub;
        otherwise its task must take over. Raises nothing."""
        if connection.closed:
            return _Handback(fatal=True)
        try:
            data = connection.sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return None
        except OSError:
            return _Handback(fatal=True)
        if not data:
            return _Handback(end_of_input=True)
        if self._pausing:
            held = self._held.setdefault(connection.id, bytearray())
            held += data
            # A peer that sends this much while the daemon upgrades has its
            # connection kept out of the hub (and the upgrade may time out).
            return _Handback(messages=[]) if len(held) > MAX_HELD_BYTES else None
        messages = decoder.feed(data)
        began = time.perf_counter()
        for index, message in enumerate(messages):
            if connection.closed:
                return _Handback(fatal=True)  # the peer is gone: serve nothing more
            if index == ANSWERS_PER_TURN or (index and time.perf_counter() - began > TURN_BUDGET_S):
                return _Handback(messages=messages[index:])
            fatal = False
            fds: tuple[int, ...] = ()
            after: AfterReply | tuple[()] = ()
            if isinstance(message, protocol.BadMessage):
                line = self._rejection(connection, message)
                fatal = message.fatal
            else:
                answer = self._answer_now(connection, message)
                if answer is None:
                    return _Handback(messages=messages[index:])
                if isinstance(answer, Reply):
                    return _Handback(waiting=(message, answer), messages=messages[index + 1:])
                line, fds, after = answer
            taken = connection.try_send(line, fds)
            run_after(after)
            if not taken:
                # (Only while a notification's line is under way; a reply
                # with fds never meets one here: see _answer_now.)
                return _Handback(line=line, fatal=fatal, messages=messages[index + 1:])
            if connection.has_unsent:
                return _Handback(fatal=fatal, messages=messages[index + 1:])
            if fatal:
                return _Handback(fatal=True)
        return _Handback(fatal=True) if connection.closed else None

    def resume_serving(self) -> None:
        """Carry on after a pause (the upgrade did not happen): what the hub
        held is served now, in order."""
        self._pausing = False
        for connection_id in list(self._held):
            lent = self._lent.get(connection_id)
            if lent is not None:
                take_back, decoder = lent
                take_back(_Handback(messages=decoder.feed(bytes(self._held.pop(connection_id)))))
        # (A connection that held too much to stay lent serves its own.)
        resumed, self._resumed = self._resumed, trio.Event()
        resumed.set()

    def connection(self, connection_id: int) -> Connection | None:
        return self.connections.get(connection_id)

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
        return self.engine.config.daemon

    def drop_disallowed(self) -> list[int]:
        """After a reload: close the connections of peers the config no longer
        allows (their bound leases are released as on any disconnect), telling
        each why first. Returns their ids."""
        dropped = []
        for connection in list(self.connections.values()):
            if connection.closed or self._allowed(connection.uid, {connection.gid, *connection.groups}):
                continue
            refusal = PermissionDenied(
                f"uid {connection.uid} / gid {connection.gid} may no longer use this daemon "
                "(allowed_uids / allowed_gids changed)"
            )
            connection.try_send(protocol.encode_error(None, refusal))
            connection.close()
            dropped.append(connection.id)
            log.warning("connection.no_longer_allowed", connection=connection.id, pid=connection.pid,
                        uid=connection.uid)
        return dropped

    def _allowed(self, uid: int, gids: set[int]) -> bool:
        return (
            uid in (ROOT_UID, os.geteuid())
            or uid in self.config.allowed_uids
            or not gids.isdisjoint(self.config.allowed_gids)
            # The group the socket file was given is there to let its members in.
            or self.config.socket_group in gids
        )
