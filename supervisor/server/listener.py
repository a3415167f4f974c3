"""The control socket: the listener, authorization, and the one error boundary.

Each connection (`supervisor.server.connection.Connection`: whole lines out,
never interleaved) has a task that owns it. While a connection is idle its
task lends its socket to the server's `ReadHub`: the hub's one task reads
every ready connection and answers the requests the engine can answer
without waiting (`Method.answers_now`) on the spot, without a trip through
the scheduler per request. Whatever must wait (a spawn, a scan, a peer slow
to read) goes back to the connection's task, which answers in order what
waits briefly or not at all (`Waits.NEVER`, `Waits.BRIEFLY`) and starts one
task for each other request (so responses may come out of order), then lends
its socket to the hub again. Exceptions become wire errors here and nowhere
else; tracebacks go to the log. A reply's after-work (`Reply.after`) runs
right after its line is handed to the socket, whatever became of the send.
"""

from __future__ import annotations

import array
import contextlib
import errno
import grp
import itertools
import json
import os
import resource
import socket as stdlib_socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec
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
from supervisor.engine.engine import Engine, Reply
from supervisor.engine.instances import AfterReply, run_after
from supervisor.server.connection import MAX_IN_FLIGHT, Connection
from supervisor.server.methods import PARAMS, Method, Started, Waits, method_for
from supervisor.server.readhub import TURN_BUDGET_S, ReadHub

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

# An upgrade's pause gives up this soon when all that keeps it waiting is
# connections whose peers have taken nothing of the line under way for that
# long: every other client waits while it does, and such a peer is dropped
# after send_timeout anyway. A peer that reads, however slowly, is waited for
# (up to the pause's own bound).
STUCK_SENDERS_S = 3.0

ROOT_UID = 0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# SO_PEERGROUPS (Linux >= 4.13, <asm-generic/socket.h>): the peer's supplementary
# groups as of connect(). Python does not export the constant.
SO_PEERGROUPS = getattr(stdlib_socket, "SO_PEERGROUPS", 59)

# Room for this many supplementary groups: CPython's getsockopt takes at most
# 1024 bytes. A peer in more groups is judged by uid and primary gid only (the
# kernel answers ERANGE rather than a partial list).
MAX_PEER_GROUPS = 256


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


class HandedConnection(msgspec.Struct, frozen=True, kw_only=True):
    """A client connection handed to the next image in an in-place upgrade."""

    fd: int
    id: int
    pid: int
    uid: int
    gid: int
    # Bytes read from the peer that do not make a whole line yet.
    unread: bytes = b""
    groups: list[int] = []


class ServerState(msgspec.Struct, frozen=True, kw_only=True):
    """Every open connection, and where the next connection's id starts."""

    next_id: int
    connections: list[HandedConnection]


class ControlServer:
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
                    await self._serve_request(connection, message, method)
                else:
                    # Backpressure: a peer cannot have more than MAX_IN_FLIGHT (connection.py)
                    # of these running; the next line waits to be read.
                    try:
                        connection.in_flight.acquire_nowait()
                    except trio.WouldBlock:
                        await connection.in_flight.acquire()
                    await nursery.start(self._serve_in_task, connection, message, method)
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

    def _answer_now(
        self, connection: Connection, request: protocol.Request
    ) -> tuple[bytes, tuple[int, ...], AfterReply | tuple[()]] | None:
        """The response line to `request` made without waiting, with its fds
        and after-work; None (having changed nothing) if it must wait, or if
        it would pass fds while another line is under way. Raises nothing."""
        engine, params = self.engine, request.params
        try:
            method = method_for(engine, request)
            now = method.now
            if now is None or not method.ready(engine, params):
                return None
            if connection.sending and isinstance(params, protocol.AcquireParams) and params.fds:
                return None
            reply = now(engine, connection, params)
        except SupervisorError as exc:
            return self._error_line(connection, request, exc), (), ()
        except Exception:  # noqa: BLE001 (a bug: _crash_line logs it whole)
            return self._crash_line(connection, request), (), ()
        return self._result_line(connection, request, reply), reply.fds, reply.after

    def _result_line(self, connection: Connection, request: protocol.Request, reply: Reply) -> bytes:
        """The line that carries `reply`'s result, or an internal error if it
        cannot be encoded (a bug). Call it while no exception is handled."""
        try:
            return protocol.encode_result(request.id, reply.result)
        except Exception:  # noqa: BLE001 (a bug: _crash_line logs it whole)
            return self._crash_line(connection, request)

    def _rejection(self, connection: Connection, message: protocol.BadMessage) -> bytes:
        """The error line for a line that is not a valid request."""
        self.engine.count_error(message.error.code)
        log.info("request.rejected", connection=connection.id, code=message.error.code, reason=message.error.message)
        return protocol.encode_error(message.id, message.error)

    def _error_line(self, connection: Connection, request: protocol.Request, exc: SupervisorError) -> bytes:
        self.engine.count_error(exc.code)
        log.info("request.failed", connection=connection.id, method=request.method, code=exc.code, reason=exc.message)
        return protocol.encode_error(request.id, exc)

    def _crash_line(self, connection: Connection, request: protocol.Request) -> bytes:
        """For a handler's unexpected exception (a bug, not a client's
        mistake): logged whole, answered without details. Call it while
        handling the exception."""
        log.exception("request.crashed", connection=connection.id, method=request.method)
        return protocol.encode_error(request.id, SupervisorError("internal error; see the daemon's log"))

    async def _serve_in_task(
        self, connection: Connection, request: protocol.Request, method: Method,
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """`_serve_request` in a task of its own, holding one of the connection's
        in-flight slots until answered. Started once the request's state changes
        are made, so pipelined requests change state in arrival order."""
        try:
            await self._serve_request(connection, request, method, Started(request.id, task_status.started))
        finally:
            connection.in_flight.release()

    async def _serve_request(
        self, connection: Connection, request: protocol.Request, method: Method,
        started: Started | None = None,
    ) -> None:
        """Run `request`'s handler and send its answer: the result, or the wire
        error for what it raised (the one place exceptions become wire errors).
        Calls `started` at the latest before sending. Raises nothing but
        Cancelled; returns without a checkpoint when the handler and the send
        need no wait. The reply's after-work runs once the line is handed to
        the socket, before any wait for the peer."""
        if started is None:
            started = Started(request.id)  # answered in the reader: nobody awaits its start
        reply: Reply | None = None
        try:
            if method.answers_now(self.engine, request.params):
                assert method.now is not None
                reply = method.now(self.engine, connection, request.params)
            else:
                reply = await method.answer(self.engine, connection, request.params, started)
        except SupervisorError as exc:
            line = self._error_line(connection, request, exc)
        except Exception:  # noqa: BLE001 (a bug: _crash_line logs it whole)
            line = self._crash_line(connection, request)
        else:
            line = self._result_line(connection, request, reply)
        started()
        fds = reply.fds if reply is not None else ()
        after = reply.after if reply is not None else ()
        try:
            taken = connection.try_send(line, fds)
            if taken:
                fds = ()  # the connection's now
            run_after(after)
            if taken:
                await connection.flush()
            else:
                line_fds, fds = fds, ()
                await connection.send(line, line_fds)
        finally:
            run_after(after)
            for fd in fds:
                os.close(fd)

    # -- an in-place upgrade ------------------------------------------------------

    async def pause(self, *, requester: int | None, timeout: float) -> str | None:
        """Stop accepting (the listening socket stays open: new clients wait
        in its backlog) and stop serving: the hub goes on reading every
        connection but holds what it reads. Waits at most `timeout` for every
        connection to be lent to the hub with nothing in flight and nothing
        left to send. `requester` is the connection whose request asked for
        this (its one request stays in flight). Returns None once all are,
        else why not (then call `resume_serving`). Cancellation: raises;
        call `resume_serving`."""
        self._pausing = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        stuck_since: float | None = None
        progress: list[tuple[int, int]] = []
        with trio.move_on_after(timeout):
            while True:
                busy = self._busy(requester)
                if not busy:
                    return None
                stuck = [self.connections[i] for i in busy if i in self.connections and self.connections[i].has_unsent]
                # Stuck means taking nothing: a peer that reads slowly is waited for.
                now_progress = [(c.id, c.sent_bytes) for c in stuck]
                if len(stuck) < len(busy) or now_progress != progress:
                    stuck_since, progress = None, now_progress
                elif stuck_since is None:
                    stuck_since = trio.current_time()
                elif trio.current_time() - stuck_since >= STUCK_SENDERS_S:
                    peers = ", ".join(f"connection {c.id} (pid {c.pid})" for c in stuck)
                    return (f"{peers} did not read the answers sent to it for {STUCK_SENDERS_S:g} s; "
                            "try again once it reads or is dropped (daemon.send_timeout)")
                await trio.sleep(0.002)
        return f"{len(self._busy(requester))} connections were still busy after {timeout:g} s"

    def _busy(self, requester: int | None) -> list[int]:
        busy = []
        for connection in self.connections.values():
            if connection.closed:
                continue
            in_use = MAX_IN_FLIGHT - connection.in_flight.value - (1 if connection.id == requester else 0)
            idle = connection.id in self._lent or connection.id in self._ended
            if not idle or in_use or connection.sending:
                busy.append(connection.id)
        if self._arriving:
            busy.append(-1)
        return busy

    def export_state(self) -> tuple[ServerState, list[int]]:
        """The open connections (call after `pause` succeeded, with no
        checkpoint before the exec), and the fds to keep open."""
        handed = []
        for connection in self.connections.values():
            lent = self._lent.get(connection.id)
            decoder = lent[1] if lent is not None else self._ended.get(connection.id)
            if connection.closed or decoder is None:
                continue
            unread = decoder.unread() + bytes(self._held.get(connection.id, b""))
            handed.append(HandedConnection(
                fd=connection.sock.fileno(), id=connection.id, pid=connection.pid, uid=connection.uid,
                gid=connection.gid, unread=unread, groups=list(connection.groups),
            ))
        state = ServerState(next_id=next(self._ids), connections=handed)
        return state, [c.fd for c in handed]

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


def _peer_groups(sock: trio.socket.SocketType) -> list[int]:
    """The peer's supplementary groups (empty where the kernel cannot tell)."""
    try:
        raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
    except OSError:
        return []
    return list(array.array("I", raw[: len(raw) - len(raw) % 4]))


class SocketGroupRefused(Exception):
    """The kernel refused to give the socket file to `socket_group`: the
    daemon is neither root nor a member of the group. The message says so
    and what to do."""


async def bind_control_socket(path: str, mode: int, group: int | None = None) -> trio.socket.SocketType:
    """Create, bind and listen on the control socket at `path` with `mode`,
    its file given to the gid `group` if one is named.

    A stale socket file (nobody answers on it) is replaced; a live one raises
    `OSError(EADDRINUSE)`, since two daemons must never share a socket. Raises
    SocketGroupRefused (having removed the file it bound) if the daemon may
    not give the file to `group`. Clients can connect only once the file has
    its group and mode: the socket listens last.
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
            listener_pid = _UCRED.unpack(probe.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _UCRED.size))[0]
            raise OSError(
                errno.EADDRINUSE, f"another daemon is already serving on {path} (its socket was opened by pid {listener_pid})"
            )
        finally:
            probe.close()
    plain = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    # No window in which the socket file is more open than `mode` allows.
    # The bind is synchronous: no other task runs under the borrowed umask
    # and egid.
    old_umask = os.umask(0o777 & ~mode)
    try:
        with _creating_as_group(group):
            plain.bind(path)
    except BaseException:
        plain.close()
        raise
    finally:
        os.umask(old_umask)
    sock = trio.socket.from_stdlib_socket(plain)
    await trio.lowlevel.checkpoint()
    if group is not None and os.stat(path).st_gid != group:
        try:
            os.chown(path, -1, group)
        except PermissionError:
            sock.close()
            os.unlink(path)
            raise SocketGroupRefused(
                f"daemon.socket_group: the daemon (uid {os.geteuid()}) may not give {path} to group "
                f"{_group_label(group)}: only root or a member of the group may; add the daemon's user "
                "to the group (then restart its session or service), or leave socket_group unset"
            ) from None
    os.chmod(path, mode)
    sock.listen(stdlib_socket.SOMAXCONN)
    return sock


@contextlib.contextmanager
def _creating_as_group(group: int | None) -> Iterator[None]:
    """Files created inside get `group` where the daemon may take it as its
    effective gid (root with CAP_SETGID), so that root needs no CAP_CHOWN
    to give the socket file to socket_group; elsewhere nothing changes and
    the caller falls back to chown. The egid is restored on the way out."""
    own = os.getegid()
    if group is None or group == own:
        yield
        return
    try:
        os.setegid(group)
    except PermissionError:
        yield
        return
    try:
        yield
    finally:
        os.setegid(own)


def _group_label(gid: int) -> str:
    """`"agents" (gid 4242)`, or `gid 4242` for a gid without a name."""
    try:
        return f"{json.dumps(grp.getgrgid(gid).gr_name)} (gid {gid})"
    except KeyError:
        return f"gid {gid}"
