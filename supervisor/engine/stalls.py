"""How long the trio thread is held at a time: a trio instrument that times
every task step.

A task step is the code a task runs between two checkpoints; while it runs,
no other task (no other request, no reap, no timer) can. The watch keeps the
longest step since it was installed and since the last time it was read, and
counts the steps that took longer than a few thresholds, for the metrics.

It is called around every task step of the daemon, so it does as little as it
can: one `perf_counter_ns` on each side and, for the rare step longer than
the smallest threshold, a walk of a handful of thresholds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import TypeVar

import structlog
import trio

# Steps at least this long are counted by threshold (nanoseconds, seconds as the
# metric shows them). The 5 ms one is the daemon's own promise (no request holds
# the trio thread longer); 1 ms shows what approaches it, 20 and 100 ms what a
# client would notice as a stall of the whole daemon.
THRESHOLDS_NS = (1_000_000, 5_000_000, 20_000_000, 100_000_000)

# A loop over every instance on the trio thread (status rows, the state
# record) lets other tasks run once its turn has taken this long: well under
# the 5 ms a step may take, and few turns when the work is cheap (a turn that
# yields every few hundred rows waits behind every other busy task that often).
STEP_BUDGET_S = 0.002

# A step at least this long is logged (`trio.stall`, with its task): long
# enough that a healthy daemon logs none, and they stay few on a sick one.
LOG_STALL_NS = 50_000_000

log = structlog.get_logger()

Key = TypeVar("Key")
Value = TypeVar("Value")


class TurnClock:
    """For a loop over many items on the trio thread: `tick` between two
    pieces of work lets other tasks run once the current turn has taken
    STEP_BUDGET_S."""

    __slots__ = ("_began",)

    def __init__(self) -> None:
        self._began = time.perf_counter()

    async def tick(self) -> None:
        """A checkpoint, and a new turn, if this turn has taken STEP_BUDGET_S;
        otherwise nothing (no checkpoint). Cancellation: as a checkpoint."""
        if time.perf_counter() - self._began > STEP_BUDGET_S:
            await trio.lowlevel.checkpoint()
            self._began = time.perf_counter()


async def present_in_turns(
    entries: Mapping[Key, Value], per_look: int
) -> AsyncIterator[list[tuple[Key, Value]]]:
    """The entries of `entries` still in it when their turn comes, `per_look`
    at a time, in turns of STEP_BUDGET_S (a `TurnClock` looked at between two
    pieces). It lists the keys only: a list of the pairs would be as many
    tuples alive across the turns, each for the collector to look at.
    Cancellation: as a checkpoint, between two pieces."""
    keys = list(entries)
    clock = TurnClock()
    for start in range(0, len(keys), per_look):
        await clock.tick()
        yield [(key, value) for key in keys[start:start + per_look] if (value := entries.get(key)) is not None]


class StallWatch(trio.abc.Instrument):
    """The longest task step of the trio run it is installed in.

    Only the trio thread calls it (trio calls instruments there); readers
    run there too, so it needs no lock.
    """

    def __init__(self) -> None:
        self._began = 0
        # The longest step since installed, and the task that took it.
        self.longest_ns = 0
        self.longest_task = ""
        # The longest step since the last `take_recent`.
        self.recent_ns = 0
        self.recent_task = ""
        # Steps at least THRESHOLDS_NS[i] long, per threshold.
        self.over = [0] * len(THRESHOLDS_NS)

    def install(self) -> None:
        """Start timing the current trio run's task steps (from the trio
        thread, inside the run). The step that installs it counts from now."""
        self._began = time.perf_counter_ns()
        trio.lowlevel.add_instrument(self)

    def uninstall(self) -> None:
        """Stop timing (from the trio thread of the run it was installed in)."""
        trio.lowlevel.remove_instrument(self)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.perf_counter_ns()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter_ns() - self._began
        if took > self.recent_ns:
            self.recent_ns = took
            self.recent_task = task.name
            if took > self.longest_ns:
                self.longest_ns = took
                self.longest_task = task.name
        if took >= THRESHOLDS_NS[0]:
            for index, threshold in enumerate(THRESHOLDS_NS):
                if took < threshold:
                    break
                self.over[index] += 1
            if took >= LOG_STALL_NS:
                log.warning("trio.stall", task=task.name, ms=round(took / 1e6, 1))

    def take_recent(self) -> tuple[int, str]:
        """The longest step (ns) since the previous call, and its task's name;
        starts a new period."""
        recent = (self.recent_ns, self.recent_task)
        self.recent_ns, self.recent_task = 0, ""
        return recent
