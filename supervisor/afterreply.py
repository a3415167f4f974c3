"""Work a request leaves for after its reply: `defer(fn, ...)`.

A cold `acquire` is answered once its root is spawned and registered. What
else the spawn needs (starting the root's stderr reader and watcher tasks,
counting it in the metrics) changes nothing the reply says or any later
request depends on, yet on an idle host it costs about 100 us of the ~0.9 ms
the daemon spends on the acquire; so does its `lease.acquired` log line
(about 100 us cold at info level). The server runs each request's handler
inside `deferring()`; work handed to `defer` there runs right after the reply
is sent (in the same turn, before any other task, when the send needs no
wait), and runs whatever happens to the request: an error answer, a failed
send, cancellation. A reply that has to wait (for the connection's send lock,
or for the peer to make room) calls `run_now()` first: deferred work never
waits on a peer, so a log line still says what happened when it happened.

Outside a handler, and in any task other than the handler's own (a task it
started inherits its context), `defer` runs the work at once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import structlog
import trio

log = structlog.get_logger()


class _Deferred:
    __slots__ = ("task", "work")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.work: list[Callable[[], object]] | None = []  # None once run


_CURRENT: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar("supervisor_after_reply", default=None)


def defer(fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """Call `fn(*args, **kwargs)` after the current request's reply is sent, or
    now if this task is not handling a request (or its reply is already out)."""
    deferred = _CURRENT.get()
    if deferred is None or deferred.work is None or deferred.task is not trio.lowlevel.current_task():
        fn(*args, **kwargs)
        return
    deferred.work.append(partial(fn, *args, **kwargs))


def run_now() -> None:
    """Run the current request's deferred work now rather than after its
    reply: the reply is about to wait. Later `defer` calls run at once. Does
    nothing outside a handler, or in a task other than the handler's."""
    deferred = _CURRENT.get()
    if deferred is not None and deferred.work is not None and deferred.task is trio.lowlevel.current_task():
        _run(deferred)


def _run(deferred: _Deferred) -> None:
    work, deferred.work = deferred.work or [], None
    for fn in work:
        try:
            fn()
        except Exception:
            log.exception("after_reply.failed", work=repr(fn))


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """Collect the `defer`red work of the request handled in this block, and run
    it as the block exits (the server sends the reply at the block's end). A
    failing piece is logged and does not stop the others."""
    deferred = _Deferred(trio.lowlevel.current_task())
    token = _CURRENT.set(deferred)
    try:
        yield
    finally:
        _CURRENT.reset(token)
        _run(deferred)
