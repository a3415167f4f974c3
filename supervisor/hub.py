"""One task that reads every idle connection: `ReadHub`.

With a task per connection, each request costs a trip through trio's
scheduler: its socket's readiness wakes the task, the task runs, and re-arms
its one-shot registration in trio's epoll before it sleeps again. With 32
busy clients that machinery was most of a `status` request's cost; a trio
echo server, which has nothing else to do, managed only ~1.5x our rate.

The hub keeps its own epoll, with a level-triggered registration per watched
socket that stays in place from one request to the next, and waits on that
epoll's fd through trio. When it is readable, the hub takes every ready
socket in one `epoll_wait` and calls each one's `on_readable` right there:
the server's callback reads the socket and answers the requests that need no
waiting, all in the hub's one turn. A socket whose next step must wait (a
spawn, a scan, a peer slow to read) is unwatched by its callback and handed
back to its connection's task, which watches it again once it is done.
"""

from __future__ import annotations

import select
from collections.abc import Callable

import trio

# Ready sockets taken per epoll_wait. More stay ready for the next round (the
# registrations are level-triggered), after other tasks have had a turn.
MAX_EVENTS = 256

# After a look that let other tasks run first found nothing ready, this many
# rounds wait for readiness before the next such look (see `run`).
ROUNDS_BEFORE_RETRY = 16


class ReadHub:
    """Readiness for many sockets, served in one task (`run`)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Call `on_readable()` in the hub's task whenever `fd` has input (or
        its peer hung up) until `unwatch(fd)`. The callback must not raise,
        and must not block: it runs while every other socket waits."""
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = on_readable

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd`; before it is closed, it must be. Its callback is
        not called again, not even for readiness already collected."""
        self._epoll.unregister(fd)
        del self._callbacks[fd]

    @property
    def watched(self) -> int:
        return len(self._callbacks)

    async def run(self) -> None:
        """Serve readiness until cancelled. Raises what a callback raises (a
        bug: callbacks handle their own errors). Cancellation: returns
        nothing; the epoll stays open until `close`."""
        fd = self._epoll.fileno()
        callbacks = self._callbacks
        # Whether the next round first lets every other task run once and then
        # just looks. A client that sends its next request as soon as it has
        # an answer (or many clients, with a round of other work between two
        # requests of each) has usually sent it by then: the daemon then never
        # sleeps, so the client's send needs no wake-up of an idle CPU (tens of
        # us on a VM), and the epoll needs no re-arming in trio's. When nothing
        # is there, rounds wait for readiness for the next ROUNDS_BEFORE_RETRY.
        look_after_others = False
        waited_rounds = 0
        while True:
            if look_after_others:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(fd)
                waited_rounds += 1
            events = self._epoll.poll(0, MAX_EVENTS)
            if look_after_others and not events:
                look_after_others = False
                waited_rounds = 0
                continue
            look_after_others = look_after_others or waited_rounds > ROUNDS_BEFORE_RETRY
            for ready, _ in events:
                # A callback earlier in this round may have unwatched it.
                callback = callbacks.get(ready)
                if callback is not None:
                    callback()

    def close(self) -> None:
        """Close the epoll; call once `run` has ended."""
        trio.lowlevel.notify_closing(self._epoll.fileno())
        self._epoll.close()
