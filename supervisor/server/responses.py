"""A request's response line: its method run at once or awaited, its result
encoded, and the one place where exceptions become wire errors (tracebacks go
to the log, never to a client). `_Responses` holds these methods for
`ControlServer`; the reply's after-work runs once its line is handed to the
socket."""

from __future__ import annotations

import os

import structlog
import trio

from supervisor.core import protocol
from supervisor.core.errors import SupervisorError
from supervisor.engine.operation import Reply
from supervisor.engine.instances import AfterReply, run_after
from supervisor.server.connection import Connection
from supervisor.server.methods import Method, Started, method_for

log = structlog.get_logger()


class _Responses:
    """How `ControlServer` answers a request (a base class of it, never used alone)."""

    def _answer_now(
        self, connection: Connection, request: protocol.Request
    ) -> tuple[bytes, tuple[int, ...], AfterReply | tuple[()]] | Reply | None:
        """The response line to `request` made without waiting, with its fds
        and after-work; None (having changed nothing) if it must wait, or if
        it would pass fds while another line is under way. A Reply whose
        answer waits after all (`Reply.later`: its state changes are made)
        comes back as it is, for `_serve_request` to finish. Raises nothing."""
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
        if reply.later is not None:
            return reply
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
        self, connection: Connection, request: protocol.Request, method: Method, waiting: Reply | None = None,
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """`_serve_request` in a task of its own, holding one of the connection's
        in-flight slots until answered. Started once the request's state changes
        are made, so pipelined requests change state in arrival order.
        `waiting`: the request's handler ran already, and its Reply waits."""
        try:
            await self._serve_request(
                connection, request, method, Started(request.id, task_status.started), waiting=waiting
            )
        finally:
            connection.in_flight.release()

    async def _serve_in_own_task(
        self, connection: Connection, nursery: trio.Nursery, request: protocol.Request, method: Method,
        waiting: Reply | None = None,
    ) -> None:
        """Serve `request` in a task of its own (`_serve_in_task`) once one of
        the connection's in-flight slots is free (backpressure: a peer cannot
        have more than MAX_IN_FLIGHT (connection.py) of these running; its next line waits to
        be read). Returns once the task has made the request's state
        changes. `waiting`: the request was answered without waiting, by a
        Reply that waits after all (`Reply.later`)."""
        try:
            connection.in_flight.acquire_nowait()
        except trio.WouldBlock:
            await connection.in_flight.acquire()
        await nursery.start(self._serve_in_task, connection, request, method, waiting)

    async def _serve_request(
        self, connection: Connection, request: protocol.Request, method: Method,
        started: Started | None = None, *, waiting: Reply | None = None, nursery: trio.Nursery | None = None,
    ) -> None:
        """Run `request`'s handler and send its answer: the result, or the wire
        error for what it raised (the one place exceptions become wire errors).
        Calls `started` at the latest before sending. Raises nothing but
        Cancelled; returns without a checkpoint when the handler and the send
        need no wait. The reply's after-work runs once the line is handed to
        the socket, before any wait for the peer. `waiting`: the handler ran
        already (`_answer_now`), and its Reply's answer waits (`Reply.later`),
        as a Reply of the handler run here may: with `nursery` (the
        connection's), that wait goes to a task of its own."""
        if started is None:
            started = Started(request.id)  # answered in the reader: nobody awaits its start
        reply: Reply | None = waiting
        try:
            if reply is None and method.answers_now(self.engine, request.params):
                assert method.now is not None
                reply = method.now(self.engine, connection, request.params)
                if reply.later is not None and nursery is not None:
                    await self._serve_in_own_task(connection, nursery, request, method, reply)
                    return
            elif reply is None:
                reply = await method.answer(self.engine, connection, request.params, started)
            if reply.later is not None:
                started()
                reply = await reply.later()
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
