"""The control methods: one table, `METHODS`, one row per method of the protocol.

A row says what the method's params decode into, how the engine answers it
without waiting (`now`, when `ready`) and with waiting (`wait`), how long it
may wait (`waits`, which decides where the server serves it), and whether it
is served while the daemon shuts down. Everything else is derived from the
table: the codec's methods (`PARAMS`), the hub's choice of what to answer on
the spot, and the refusals while stopping.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from supervisor.core import protocol
from supervisor.core.errors import MethodNotFound, ShuttingDown
from supervisor.engine.engine import Engine
from supervisor.engine.operation import Peer, Reply

class Started:
    """Handed to a waiting handler with its request: call it once the
    request's state changes are made (later calls do nothing), so that
    pipelined requests change state in arrival order. `request_id` is the
    request's id (an upgrade's answer comes from the next image, by id)."""

    __slots__ = ("request_id", "_on_started")

    def __init__(self, request_id: int | str, on_started: Callable[[], None] | None = None) -> None:
        self.request_id = request_id
        self._on_started = on_started

    def __call__(self) -> None:
        on_started, self._on_started = self._on_started, None
        if on_started is not None:
            on_started()


class Waits(enum.Enum):
    """How long a method's answer may have to wait, which decides who serves it."""

    # Never: the hub, or the connection's reader, answers on the spot.
    NEVER = "never"
    # For a shared tree scan (milliseconds): the connection's reader answers
    # it, in order with the requests around it.
    BRIEFLY = "briefly"
    # For a spawn, a predecessor's stop or a sweep: a task of its own answers
    # it, so later requests of the connection are not held up.
    LONG = "long"


def _always(engine: Engine, params: Any) -> bool:
    return True


class Method(msgspec.Struct, frozen=True):
    """One method of the control protocol."""

    params: type[protocol.Params]
    # The answer without waiting; only when `ready(engine, params)`.
    now: Callable[[Engine, Peer, Any], Reply] | None
    # The answer, waiting as needed. Calls `started()` once its state changes
    # are made (pipelined requests change state in arrival order). None: `now`
    # always answers.
    wait: Callable[[Engine, Peer, Any, Started], Awaitable[Reply]] | None
    waits: Waits
    while_stopping: bool
    ready: Callable[[Engine, Any], bool] = _always

    def answers_now(self, engine: Engine, params: Any) -> bool:
        """Whether `now` may answer these params at this moment."""
        return self.now is not None and self.ready(engine, params)

    async def answer(self, engine: Engine, peer: Peer, params: Any, started: Started) -> Reply:
        """The answer, waiting as needed. Raises SupervisorError.
        Cancellation: raises Cancelled while waiting; state changes already
        made stand, as they would had the answer been sent."""
        if self.wait is not None:
            return await self.wait(engine, peer, params, started)
        assert self.now is not None
        return self.now(engine, peer, params)


async def _acquire(engine: Engine, peer: Peer, params: protocol.AcquireParams, started: Started) -> Reply:
    return await engine.acquire(peer, params, started)


async def _status(engine: Engine, peer: Peer, params: protocol.StatusParams, started: Started) -> Reply:
    return await engine.status(peer, params)


async def _release_job(engine: Engine, peer: Peer, params: protocol.ReleaseJobParams, started: Started) -> Reply:
    return await engine.release_job(peer, params)


async def _sweep(engine: Engine, peer: Peer, params: protocol.SweepParams, started: Started) -> Reply:
    started()
    return await engine.sweep(peer, params)


async def _upgrade(engine: Engine, peer: Peer, params: protocol.UpgradeParams, started: Started) -> Reply:
    started()
    return await engine.upgrade(peer, params, started.request_id)


METHODS: dict[str, Method] = {
    "hello": Method(protocol.HelloParams, Engine.hello, None, Waits.NEVER, while_stopping=True),
    "acquire": Method(
        protocol.AcquireParams, Engine.acquire_now, _acquire,
        Waits.LONG, while_stopping=False, ready=Engine.acquire_answers_now,
    ),
    "release": Method(protocol.ReleaseParams, Engine.release, None, Waits.NEVER, while_stopping=True),
    "renew": Method(protocol.RenewParams, Engine.renew, None, Waits.NEVER, while_stopping=False),
    "release_job": Method(
        protocol.ReleaseJobParams, Engine.release_job_now, _release_job,
        Waits.BRIEFLY, while_stopping=True, ready=Engine.release_job_answers_now,
    ),
    "status": Method(
        protocol.StatusParams, Engine.status_now, _status,
        Waits.BRIEFLY, while_stopping=True, ready=Engine.status_answers_now,
    ),
    "logs": Method(protocol.LogsParams, Engine.logs, None, Waits.NEVER, while_stopping=True),
    "sweep": Method(protocol.SweepParams, None, _sweep, Waits.LONG, while_stopping=False),
    "resume": Method(protocol.ResumeParams, Engine.resume, None, Waits.NEVER, while_stopping=False),
    "upgrade": Method(protocol.UpgradeParams, None, _upgrade, Waits.LONG, while_stopping=False),
    "reports": Method(protocol.ReportsParams, Engine.recent_reports, None, Waits.NEVER, while_stopping=True),
    "metrics": Method(protocol.MetricsParams, Engine.metrics_text, None, Waits.NEVER, while_stopping=True),
    "adapters": Method(protocol.AdaptersParams, Engine.adapters, None, Waits.NEVER, while_stopping=True),
}

# What the codec accepts: every method of the table, with its params.
PARAMS = protocol.MethodParams({name: method.params for name, method in METHODS.items()})


def method_for(engine: Engine, request: protocol.Request) -> Method:
    """The row that serves `request`. Raises MethodNotFound (a method the
    codec knows but this table does not), ShuttingDown (not served while the
    daemon stops)."""
    method = METHODS.get(request.method)
    if method is None:
        raise MethodNotFound(f"method {request.method!r} is not served by this daemon version")
    if engine.shutting_down and not method.while_stopping:
        raise ShuttingDown("the daemon is shutting down; retry against its next run")
    return method
