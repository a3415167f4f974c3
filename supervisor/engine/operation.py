"""What an engine operation is asked by and answers with: the client
connection it needs (`Peer`) and its answer (`Reply`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from supervisor.engine.instances import AfterReply


class Peer(Protocol):
    """What the engine needs of a client connection."""

    id: int
    # The peer's process, user and group, from SO_PEERCRED when it connected.
    pid: int
    uid: int
    gid: int

    def notify(self, method: str, params: object) -> None: ...


class Reply(msgspec.Struct):
    """An operation's answer. `fds` ride on the reply's line (SCM_RIGHTS) and
    belong to the reply: whoever sends it closes them once sent (or not).
    `after` is work for once the reply has been handed to the socket (or has
    failed to be); it changes nothing the reply says.

    An operation answered without waiting (a method's `now`) whose state
    changes are made but whose answer turned out to need a wait (a spawn
    whose root had not exec'd yet) returns a Reply with `later` set: the
    answer is what `later()` returns (or raises), and `result` means
    nothing."""

    result: Any
    fds: tuple[int, ...] = ()
    # () unless the operation left work: then a list of its own.
    after: AfterReply | tuple[()] = ()
    later: Callable[[], Awaitable[Reply]] | None = None
