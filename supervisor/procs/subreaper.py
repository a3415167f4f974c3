"""Make the daemon the reaper of its adapters' escaped descendants, and reap them.

As a child subreaper (prctl PR_SET_CHILD_SUBREAPER) the daemon, not PID 1, inherits
every process of its adapter trees whose parent dies, including those that called
setsid() and double-forked. That keeps escapees visible as our children and lets us
collect their zombies immediately instead of waiting for init.

Reaping is always by pid. Nothing here calls waitpid(-1) or waitid(P_ALL) without
WNOWAIT, because that would silently steal the exit status of a child some other part
of the program (subprocess, trio) is waiting for. Linux only; no module state apart
from the cached handle on libc. `ChildReaper` is the daemon's single owner of
child statuses.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import signal
from collections.abc import Callable, Iterable

import trio

# From <linux/prctl.h>.
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

# How soon `reap` is tried again when a child another part of the daemon
# waits for was the one waitable (it is reaped by its waiter within
# milliseconds; other children's exits wait this long at most).
BLOCKED_RETRY_S = 0.02

# Adopted children remembered for the next sweep report; past this the oldest
# are dropped (they were logged when reaped).
ADOPTED_KEPT = 1000


@functools.cache
def _libc() -> ctypes.CDLL:
    # The C library is already loaded in every CPython process; CDLL(None) finds it.
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: object) -> None:
    if _libc().prctl(option, arg2, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def become_child_subreaper() -> None:
    """Mark this process as a child subreaper for the rest of its life.

    Orphaned descendants are re-parented to it instead of to PID 1. Raises OSError
    (with the errno from prctl) if the kernel refuses.
    """
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def is_child_subreaper() -> bool:
    """True if this process is a child subreaper. Raises OSError if prctl fails."""
    flag = ctypes.c_int(0)
    _prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag))
    return flag.value != 0


def _returncode(result: os.waitid_result) -> int:
    # Shell/subprocess convention: the exit status, or minus the killing signal.
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


def reap_pid(pid: int) -> int | None:
    """Reap the exited child `pid`, without blocking.

    Returns its return code (exit status, or -signal if a signal killed it) if this
    call reaped it; None if it is still running, or it is not our child, or it was
    already reaped (by us or by whoever else waited for it). A `subprocess.Popen`
    whose child was reaped here copes: its later `wait()`/`poll()` report 0.
    """
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None
    if result is None:
        return None
    return _returncode(result)


def waitable_children() -> list[int]:
    """Return pids of our children that have exited and can be reaped now, without reaping.

    Peeks with waitid(P_ALL, WNOWAIT): the kernel reports one waitable child and leaves
    it in place, so the result holds at most one pid. The caller MUST reap every pid
    returned (with `reap_pid`) before calling again; otherwise the same child is
    returned forever and a loop over this function spins. The usual loop is::

        while pids := waitable_children():
            for pid in pids:
                reap_pid(pid)

    An empty list means no child is waitable (or we have no children at all).
    """
    try:
        result = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return []
    if result is None:
        return []
    return [result.si_pid]


def child_has_exited(pid: int) -> bool:
    """Whether our child `pid` has exited (waitable, or already reaped by
    someone), without reaping it: one WNOWAIT peek, a single system call and
    no /proc read. Never raises."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class ChildReaper:
    """The one place in the daemon that waits for children.

    Every waitable child is reaped by pid. A root's status goes to the callback
    registered for its pid; any other child (an adopted escapee) is counted and
    recorded for the next sweep report. Runs only on the trio thread.
    """

    def __init__(self) -> None:
        self._roots: dict[int, Callable[[int], None]] = {}
        self._exited = trio.Event()
        # Non-root children reaped since the last `take_adopted`: (pid, returncode).
        self._adopted: list[tuple[int, int]] = []
        # Children reaped before anyone watched them, while spawns were in
        # flight (a root spawned in a worker thread can exit and be reaped
        # before `watch_root`): pid -> (returncode, trio time reaped).
        self._unclaimed: dict[int, tuple[int, float]] = {}
        self.spawns_in_flight = 0
        # Children that other code waits for itself (the check of an
        # upgrade's new code, under trio.run_process), while they run: never
        # reaped here, never an orphan.
        self.others: set[int] = set()
        # A child of `others` was waitable at the last `reap`, which had to
        # stop there: reap again soon, without waiting for a SIGCHLD.
        self._blocked = False
        # Children expected to exit soon (the roots of trees being stopped):
        # `reap` tries them by pid before it walks every child, so that a
        # burst of exits costs one walk, not one per exit.
        self.expected: set[int] = set()

    def watch_root(self, pid: int, on_exit: Callable[[int], None], *, spawned_after: float) -> None:
        """Call `on_exit(returncode)` once `pid` (our child) is reaped, at once if
        it already was. `spawned_after` is a trio time before the fork: a status
        reaped earlier belonged to another process that had the same pid.
        Raises what `on_exit` raises when it runs at once."""
        unclaimed = self._unclaimed.pop(pid, None)
        if unclaimed is not None and unclaimed[1] >= spawned_after:
            on_exit(unclaimed[0])
            return
        self._roots[pid] = on_exit

    def spawn_settled(self) -> None:
        """A spawn in flight has finished (and its root, if any, is watched)."""
        self.spawns_in_flight -= 1
        if self.spawns_in_flight == 0:
            self._unclaimed.clear()

    def reap(self) -> None:
        """Reap every waitable child now; never blocks. Raises only what an
        `on_exit` callback raises: that child is reaped and its callback
        dropped, and children not yet reaped wait for the next call.

        The `expected` children first, by pid (one system call each); then
        the rest one at a time, each found by a peek that walks the daemon's
        children in the kernel (milliseconds with ten thousand), so the peeks
        are what an exit nobody expected costs, and the last, empty one."""
        reaped = False
        self._blocked = False
        for pid in [pid for pid in self.expected if pid not in self.others]:
            returncode = reap_pid(pid)
            if returncode is not None:
                reaped = True
                self._route(pid, returncode)
        while True:
            waitable = waitable_children()
            if not waitable:
                break
            if waitable[0] in self.others:
                # Its waiter reaps it; until then the peek shows only it.
                self._blocked = True
                break
            for pid in waitable:
                returncode = reap_pid(pid)
                if returncode is None:
                    continue
                reaped = True
                self._route(pid, returncode)
        if reaped:
            self._exited.set()
            self._exited = trio.Event()

    def reap_children(self, pids: Iterable[int]) -> None:
        """Reap these children, which the caller saw exit, by pid: one
        system call each, where `reap` walks every child of the daemon in the
        kernel (milliseconds with thousands). Statuses are routed as `reap`
        routes them; a pid that is not a waitable child of ours (reaped
        meanwhile) is skipped, and so is one that others wait for. Never
        blocks; raises only what an `on_exit` callback raises."""
        reaped = False
        for pid in pids:
            if pid in self.others:
                continue
            returncode = reap_pid(pid)
            if returncode is None:
                continue
            reaped = True
            self._route(pid, returncode)
        if reaped:
            self._exited.set()
            self._exited = trio.Event()

    def _route(self, pid: int, returncode: int) -> None:
        """A child just reaped: its status to its root's callback, or kept as
        an adopted child's."""
        on_exit = self._roots.pop(pid, None)
        if on_exit is not None:
            on_exit(returncode)
        else:
            self._adopted.append((pid, returncode))
            del self._adopted[:-ADOPTED_KEPT]
            if self.spawns_in_flight:
                self._unclaimed[pid] = (returncode, trio.current_time())

    async def child_exited(self) -> None:
        """Wait until the next time `reap` reaps something. Cancellation raises
        Cancelled and changes nothing."""
        await self._exited.wait()

    def take_adopted(self) -> list[tuple[int, int]]:
        """Adopted children reaped since the last call, oldest first."""
        adopted, self._adopted = self._adopted, []
        return adopted

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reap on every SIGCHLD until cancelled; `started` once the SIGCHLD
        handler is installed and a first `reap` is done. Started before the
        first spawn. Cancellation ends it and restores the previous SIGCHLD
        handler; a child that exits afterwards stays unreaped until `reap` is
        called. Raises what `reap` raises."""
        with trio.open_signal_receiver(signal.SIGCHLD) as sigchld:
            self.reap()
            task_status.started()
            while True:
                # While a child of `others` blocks the peek, look again soon:
                # its waiter reaps it without a SIGCHLD to tell us.
                with trio.move_on_after(BLOCKED_RETRY_S if self._blocked else math.inf):
                    await sigchld.__anext__()
                self.reap()
