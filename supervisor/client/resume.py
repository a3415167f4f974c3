"""Resuming after a crash of the daemon, the part both clients share: connect
again and take back the bound leases (`resume`), blocking, in the calling
thread, and the `resumed` notification the client then adds to its stream."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from supervisor.client.errors import ConnectionLost
from supervisor.client.session import Incoming, Refusal, Reply, Session, close_fds, receive_with_fds
from supervisor.core.protocol import MAX_RESUME_LEASES

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
