"""ReadHub on real socket pairs: which callbacks run, when, and in which task.

The server's use of it (connections lent to the hub and handed back) is
tested through a real daemon in test_server.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel
import trio.testing

from supervisor.server.readhub import ReadHub


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Three connected pairs: (the side the hub watches, the peer)."""
    made = []
    for _ in range(3):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        made.append((ours, theirs))
    yield made
    for ours, theirs in made:
        ours.close()
        theirs.close()


@pytest.fixture
async def hub(nursery: trio.Nursery) -> ReadHub:
    made = ReadHub()
    nursery.start_soon(made.run)
    yield made
    nursery.cancel_scope.cancel()


def reader(sock: socket.socket, log: list[tuple[int, bytes, trio.lowlevel.Task]]) -> object:
    def on_readable() -> None:
        log.append((sock.fileno(), sock.recv(100), trio.lowlevel.current_task()))

    return on_readable


async def test_every_ready_socket_is_served_in_the_hubs_one_task(hub: ReadHub, pairs) -> None:
    log: list[tuple[int, bytes, trio.lowlevel.Task]] = []
    for ours, _ in pairs:
        hub.watch(ours.fileno(), reader(ours, log))
    for index, (_, theirs) in enumerate(pairs):
        theirs.send(b"request %d" % index)
    await trio.testing.wait_all_tasks_blocked()
    assert sorted((fd, data) for fd, data, _ in log) == [
        (ours.fileno(), b"request %d" % index) for index, (ours, _) in enumerate(pairs)
    ]
    assert len({task for _, _, task in log}) == 1, "the callbacks ran in more than one task"
    assert log[0][2] is not trio.lowlevel.current_task()


async def test_input_left_unread_is_reported_again(hub: ReadHub, pairs) -> None:
    ours, theirs = pairs[0]
    seen: list[bytes] = []

    def read_one_byte() -> None:
        seen.append(ours.recv(1))

    hub.watch(ours.fileno(), read_one_byte)
    theirs.send(b"abc")
    await trio.testing.wait_all_tasks_blocked()
    assert seen == [b"a", b"b", b"c"]


async def test_an_unwatched_socket_is_not_served_even_with_input(hub: ReadHub, pairs) -> None:
    log: list[tuple[int, bytes, trio.lowlevel.Task]] = []
    (first, first_peer), (second, second_peer) = pairs[0], pairs[1]
    hub.watch(first.fileno(), reader(first, log))
    hub.watch(second.fileno(), reader(second, log))
    hub.unwatch(first.fileno())
    first_peer.send(b"not for the hub")
    second_peer.send(b"for the hub")
    await trio.testing.wait_all_tasks_blocked()
    assert [data for _, data, _ in log] == [b"for the hub"]
    assert hub.watched == 1
    assert first.recv(100) == b"not for the hub"


async def test_a_socket_unwatched_by_an_earlier_callback_of_the_round_is_skipped(hub: ReadHub, pairs) -> None:
    """Both sockets are ready in one round; whichever callback runs first
    unwatches the other, whose readiness was already collected."""
    (first, first_peer), (second, second_peer) = pairs[0], pairs[1]
    called: list[int] = []

    def unwatch_the_other(mine: socket.socket, other: socket.socket) -> object:
        def on_readable() -> None:
            called.append(mine.fileno())
            mine.recv(100)
            hub.unwatch(other.fileno())
            hub.unwatch(mine.fileno())

        return on_readable

    hub.watch(first.fileno(), unwatch_the_other(first, second))
    hub.watch(second.fileno(), unwatch_the_other(second, first))
    # Both ready before the hub's task next runs: one round sees both.
    first_peer.send(b"x")
    second_peer.send(b"y")
    await trio.testing.wait_all_tasks_blocked()
    assert len(called) == 1
    assert hub.watched == 0


async def test_a_hung_up_peer_is_reported(hub: ReadHub, pairs) -> None:
    ours, theirs = pairs[0]
    ends: list[bytes] = []

    def on_readable() -> None:
        ends.append(ours.recv(100))
        hub.unwatch(ours.fileno())

    hub.watch(ours.fileno(), on_readable)
    theirs.close()
    await trio.testing.wait_all_tasks_blocked()
    assert ends == [b""]


async def test_a_steady_stream_keeps_being_served_while_other_tasks_run(hub: ReadHub, pairs, nursery) -> None:
    """Past ROUNDS_BEFORE_RETRY rounds the hub looks for input after letting
    other tasks run, instead of waiting for readiness: input that arrives in
    between must be served all the same, and other tasks must still run."""
    ours, theirs = pairs[0]
    received = bytearray()

    def on_readable() -> None:
        received.extend(ours.recv(65536))

    hub.watch(ours.fileno(), on_readable)
    ticks = 0

    async def other_task() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    nursery.start_soon(other_task)
    for index in range(200):
        theirs.send(b"%04d" % index)
        with trio.fail_after(5):
            while len(received) < 4 * (index + 1):
                await trio.lowlevel.checkpoint()
    assert bytes(received) == b"".join(b"%04d" % index for index in range(200))
    assert ticks > 200
