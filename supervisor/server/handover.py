"""Pausing the server for an in-place upgrade and naming what it hands over:
every connection with the bytes read from it and not yet served
(`ServerState`). `_Handover` holds these methods for `ControlServer`; the
next image serves the connections it is handed from the start."""

from __future__ import annotations

import msgspec
import trio

from supervisor.server.connection import MAX_IN_FLIGHT

# An upgrade's pause gives up this soon when all that keeps it waiting is
# connections whose peers have taken nothing of the line under way for that
# long: every other client waits while it does, and such a peer is dropped
# after send_timeout anyway. A peer that reads, however slowly, is waited for
# (up to the pause's own bound).
STUCK_SENDERS_S = 3.0


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


class _Handover:
    """How `ControlServer` pauses for an upgrade (a base class of it, never used alone)."""

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
