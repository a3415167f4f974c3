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
import time
from collections.abc import Callable

import trio

# Ready sockets taken per epoll_wait. More stay ready for the next round (the
# registrations are level-triggered), after other tasks have had a turn.
MAX_EVENTS = 256

# After a look for input found nothing ready, this many rounds wait for
# readiness before the next look (see `run`).
ROUNDS_BEFORE_RETRY = 16

# How long a look goes on letting other tasks run and polling, while nothing
# is ready. A client that sends its next request as soon as it has an answer
# takes 20-40 us (its own decoding and encoding) to do so. Waking the daemon
# from sleep for it costs more than this on a VM, in latency and in CPU: with
# this look, one client's `Client.status()` loop ran at 56 us a call instead
# of 76, and the daemon used 12% less CPU for the same calls. A look that
# finds nothing costs this much CPU once per ROUNDS_BEFORE_RETRY + 1 rounds.
LOOK_S = 50e-6

# The trio thread is held at most about this long by one turn of the hub, or
# of a connection's task, serving requests back to back: past it, the rest
# waits until every other task has had a turn. (The daemon promises that no
# request holds the thread for more than 5 ms; a turn of many requests that
# each take under that must not add up to more.) Checked between requests, so
# a turn ends at most one request past it.
TURN_BUDGET_S = 0.002


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
        # Whether the next round looks for input (`_look`) rather than waits
        # for readiness. A client that sends its next request as soon as it
        # has an answer (or many clients, with a round of other work between
        # two requests of each) has usually sent it within the look: the
        # daemon then never sleeps, so the client's send needs no wake-up of
        # an idle CPU (tens of us on a VM), and the epoll needs no re-arming
        # in trio's. When a look finds nothing, rounds wait for readiness for
        # the next ROUNDS_BEFORE_RETRY.
        looking = False
        waited_rounds = 0
        while True:
            if looking:
                events = await self._look()
                if not events:
                    looking = False
                    waited_rounds = 0
                    continue
            else:
                await trio.lowlevel.wait_readable(fd)
                events = self._epoll.poll(0, MAX_EVENTS)
                waited_rounds += 1
                looking = waited_rounds > ROUNDS_BEFORE_RETRY
            turn_began = time.perf_counter()
            for ready, _ in events:
                if time.perf_counter() - turn_began > TURN_BUDGET_S:
                    await trio.lowlevel.checkpoint()
                    turn_began = time.perf_counter()
                # A callback earlier in this round (or a task, while the hub
                # let others run) may have unwatched it; a socket watched
                # again under the same number finds no input and waits.
                callback = callbacks.get(ready)
                if callback is not None:
                    callback()

    async def _look(self) -> list[tuple[int, int]]:
        """What is ready, looked for after letting the other tasks run, and
        again after each of their turns for up to LOOK_S while nothing is."""
        until = time.perf_counter() + LOOK_S
        while True:
            await trio.lowlevel.checkpoint()
            events = self._epoll.poll(0, MAX_EVENTS)
            if events or time.perf_counter() >= until:
                return events

    def close(self) -> None:
        """Close the epoll; call once `run` has ended."""
        trio.lowlevel.notify_closing(self._epoll.fileno())
        self._epoll.close()
