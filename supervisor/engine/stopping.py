"""Stopping trees: what `Instances` does once the registry says a tree must go.

A stop is asked for with `stop` and started by the one stop starter, a few
dozen per turn (`_start_stops`), so that thousands of stops decided at once
(a big `release_job`, a shutdown) never reach the scheduler in one batch.
Each stop is a task of its own: stop_signal to every member, stop_timeout of
grace, then SIGKILL (`procs/tree.py`), bounded and shielded so that a stop
that began always ends; then the tree is forgotten (`_forget`): its pipes
closed, its cgroup removed, its stderr tail kept for `logs`. `kill_now` is
the synchronous last resort. `Stopping` is a base class of `Instances`, whose
state it works on (declared below), on the trio thread.
"""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
import trio

from supervisor.core.registry import Reason
from supervisor.engine.stalls import STEP_BUDGET_S
from supervisor.engine.running import RunningInstance
from supervisor.procs import process
from supervisor.procs.stderr import StderrTail
from supervisor.procs.tree import StopOutcome, signal_member, stop_tree

if TYPE_CHECKING:
    from supervisor.core.registry import Registry
    from supervisor.engine.metrics import Metrics
    from supervisor.engine.staterecord import RecordKeeper
    from supervisor.engine.stdiostore import StdioStore
    from supervisor.procs.cgroup import CgroupManager
    from supervisor.procs.stderrfile import StderrFiles
    from supervisor.procs.subreaper import ChildReaper

log = structlog.get_logger()

# The stderr tails of this many finished instances stay readable through `logs`
# after their tree is gone: enough to debug a crash, bounded for a long-lived
# daemon.
FINISHED_LOGS_KEPT = 64

# A stop is bounded by the adapter's stop_timeout plus this: the SIGKILL grace,
# waiting for the root's status, and slack for a busy host.
STOP_MARGIN_S = 5.0

# Stop tasks started per turn of the stop starter (`Instances._start_stops`),
# which also ends a turn once it has taken STEP_BUDGET_S. Each started stop's
# first step (its tree's first signals) runs in the scheduler's next batch,
# before any waiting request: a release_job or a shutdown of thousands of trees
# must reach them a few dozen at a time, not all in one batch.
STOPS_PER_TURN = 32


class Stopping:
    """The stopping of trees, as part of `Instances` (see the module docstring)."""

    # Set up by `Instances.__init__`.
    pid: int
    running: dict[str, RunningInstance]
    registry: Registry
    reaper: ChildReaper
    cgroups: CgroupManager | None
    stdio: StdioStore
    stderr_files: StderrFiles
    record: RecordKeeper
    metrics: Metrics
    finished_logs: collections.OrderedDict[str, StderrTail]
    finished_owners: dict[str, int | None]
    generation: int
    _nursery: trio.Nursery | None
    _spawning: dict[str, trio.Event]
    _to_stop: collections.deque[tuple[str, Reason]]
    _stop_wanted: trio.Event
    _stop_starter: bool
    kill_awaiting_exec: Callable[[], int]

    def stop(self, instance_id: str, reason: Reason) -> None:
        """Stop the instance's tree in a task of its own: stop_signal to every
        member, stop_timeout of grace, then SIGKILL. The task is started by the
        stop starter in its next turn (so that thousands of stops decided at
        once are started a few at a time)."""
        assert self._nursery is not None, "attach() first"
        if not self._stop_starter:
            # The starter was cancelled (the engine is going): start it now.
            self._nursery.start_soon(self._stop, instance_id, reason)
            return
        self._to_stop.append((instance_id, reason))
        self._stop_wanted.set()

    async def _start_stops(self) -> None:
        """The one task that starts the stop tasks, in order: at most
        STOPS_PER_TURN per turn, and a turn ends once it has taken
        STEP_BUDGET_S. Runs until cancelled, but never drops a stop already
        asked for: a cancelled starter still starts every one (their tasks
        are shielded), then ends."""
        assert self._nursery is not None
        queue = self._to_stop
        try:
            while True:
                if not queue:
                    self._stop_wanted = trio.Event()
                    await self._stop_wanted.wait()
                    continue
                turn_began = time.perf_counter()
                for _ in range(STOPS_PER_TURN):
                    if not queue or time.perf_counter() - turn_began > STEP_BUDGET_S:
                        break
                    instance_id, reason = queue.popleft()
                    self._nursery.start_soon(self._stop, instance_id, reason)
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._stop_starter = False

    async def _stop(self, instance_id: str, reason: Reason) -> None:
        running = self.running.get(instance_id)
        outcome = StopOutcome()
        if running is not None:
            adapter = running.adapter
            if running.stop_began is None:
                running.stop_began = time.time()
            # What is left of the grace of a stop an earlier image began.
            grace = max(0.0, adapter.stop_timeout - max(0.0, time.time() - running.stop_began))
            # Its exit is reaped by pid, not found by a walk of every child.
            self.reaper.expected.add(running.root.pid)
            try:
                # Bounded and shielded: a stop that was begun is always finished,
                # even while the daemon shuts down.
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(grace + STOP_MARGIN_S) as bound:
                        try:
                            outcome = await stop_tree(
                                running.tree,
                                stop_signal=int(adapter.stop_signal),
                                stop_timeout=grace,
                                reap=self.reaper.reap_children,
                                child_exited=self.reaper.child_exited,
                            )
                        except OSError as exc:
                            log.error("tree.stop_failed", instance=instance_id, error=str(exc))
                            outcome = self.kill_now(instance_id, running)
                        if not running.root_reaped.is_set():
                            with trio.move_on_after(1):
                                await running.root_reaped.wait()
                    if bound.cancelled_caught:
                        # The stop overran its bound (a starved worker thread, a
                        # process stuck in the kernel): never forget a tree alive.
                        outcome = self.kill_now(instance_id, running)
            finally:
                self.reaper.expected.discard(running.root.pid)
            self._forget(instance_id, running)
            self.metrics.reaps.inc(adapter.name, reason.value)
        log.info(
            "tree.reaped" if outcome.clean else "tree.reap_incomplete",
            instance=instance_id,
            reason=reason.value,
            signalled=len(outcome.signalled),
            killed=len(outcome.killed),
            survivors=[m.pid for m in outcome.survivors],
        )
        self.report(self.registry.tree_gone(instance_id, now=self.now()))

    def _forget(self, instance_id: str, running: RunningInstance) -> None:
        """A tree is gone (or given up on): close its pipes, keep its stderr tail."""
        if running.root.stdin_fd is not None or running.root.stdout_fd is not None:
            self.stdio.forget(instance_id)
        running.root.close_stdio()
        if not running.root_reaped.is_set():
            # The root outlived its stop (the report says so). subprocess must
            # never poll it on its own: the reaper still owns its status.
            running.root.reaped(-signal.SIGKILL)
        self.remove_cgroup(instance_id)
        if running.stderr is not None:
            self.stderr_files.remove(running.stderr)  # its reader drains it, then closes it
        self.finished_logs[instance_id] = running.root.stderr_tail
        instance = self.registry.instances.get(instance_id)
        self.finished_owners[instance_id] = instance.uid if instance is not None else None
        while len(self.finished_logs) > FINISHED_LOGS_KEPT:
            gone, tail = self.finished_logs.popitem(last=False)
            tail.release()
            self.finished_owners.pop(gone, None)
        del self.running[instance_id]
        self.set_rss(running, 0)
        running.stopped.set()
        self.record.mark_dirty()
        self.generation += 1

    def kill_now(self, instance_id: str, running: RunningInstance) -> StopOutcome:
        """SIGKILL a tree at once, synchronously; the members still there are survivors."""
        if self.cgroups is not None:
            try:
                self.cgroups.kill(instance_id)
            except OSError as exc:
                log.error("cgroup.kill_failed", instance=instance_id, error=str(exc))
        members = {running.root.id, *running.tree.known}
        killed = [m for m in members if signal_member(m, signal.SIGKILL)]
        return StopOutcome(killed=killed, survivors=[m for m in members if not _surely_gone(m, self.pid)])

    def kill_everything_now(self) -> None:
        """Last resort when the daemon is dying of a bug: SIGKILL every tracked
        tree at once, synchronously, so that no adapter outlives its owner
        (roots still awaiting their exec too)."""
        for instance_id, running in self.running.items():
            self.kill_now(instance_id, running)
        self.kill_awaiting_exec()

    async def wait_all_stopped(self) -> None:
        """Wait for every spawn in flight to report in, then for every tree to
        be gone. Cancellation: returns early; nothing is left half-done."""
        for spawning in list(self._spawning.values()):
            await spawning.wait()
        for running in list(self.running.values()):
            await running.stopped.wait()


def _surely_gone(member: process.ProcessId, our_pid: int) -> bool:
    """`process.is_gone`, where a process that cannot be looked at (EMFILE)
    counts as still there: a sweep will look again."""
    try:
        return process.is_gone(member, our_pid=our_pid)
    except OSError:
        return False
