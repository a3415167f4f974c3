"""Trees this daemon did not spawn in this image: adopted after a crash
(`adopt`, the root seen through a pidfd), or handed over by the previous
image of an in-place upgrade (`export_trees` before the exec, `restore_tree`
after it, the stderr tails of stopped instances alike). `TreeHandover` is a
base class of `Instances`, whose state it works on (declared below), on the
trio thread.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio

from supervisor.core.config import AdapterConfig
from supervisor.engine.handoff import HandedTree
from supervisor.engine.running import RunningInstance
from supervisor.procs import process
from supervisor.procs.spawner import RootProcess
from supervisor.procs.stderr import StderrTail, TailBudget
from supervisor.procs.stderrfile import FollowedFile
from supervisor.procs.tree import InstanceTree

if TYPE_CHECKING:
    from supervisor.core.registry import Registry
    from supervisor.engine.stdiostore import StdioStore
    from supervisor.procs.cgroup import CgroupManager
    from supervisor.procs.proctable import TableScanner
    from supervisor.procs.stderrfile import StderrFiles
    from supervisor.procs.subreaper import ChildReaper

log = structlog.get_logger()

# How the root settler first sees a root handed over (`Instances._settle_roots`).
HANDED = "handed"


class TreeHandover:
    """Adoption and the in-place upgrade's trees, as part of `Instances`
    (see the module docstring)."""

    # Set up by `Instances.__init__`.
    pid: int
    running: dict[str, RunningInstance]
    registry: Registry
    reaper: ChildReaper
    cgroups: CgroupManager | None
    table: TableScanner | None
    stdio: StdioStore
    stderr_files: StderrFiles
    tail_budget: TailBudget
    finished_logs: collections.OrderedDict[str, StderrTail]
    generation: int
    _nursery: trio.Nursery | None
    _spawning: dict[str, trio.Event]

    # -- adoption -----------------------------------------------------------------

    def adopt(
        self,
        instance_id: str,
        adapter: AdapterConfig,
        root: process.ProcessId,
        members: Iterable[process.ProcessId],
        pidfd: int,
        stderr: FollowedFile | None,
    ) -> None:
        """Take over the running tree of an instance a previous incarnation
        started (the registry has adopted it already). The root is not the
        daemon's child: its exit is seen through `pidfd` (which this owns),
        with no return code. Its stdin and stdout pipes are those systemd's
        file-descriptor store passed back, if it kept them (else they died
        with the previous incarnation); its stderr file is followed on."""
        stdin_fd, stdout_fd = self.stdio.take(instance_id)
        tree = InstanceTree(instance_id=instance_id, root=root, cgroup=self.cgroups, daemon_pid=self.pid,
                            table=self.table)
        tree.known.update(members)
        tree.known.add(root)
        running = RunningInstance(
            adapter=adapter,
            root=RootProcess(
                id=root, stdin_fd=stdin_fd, stdout_fd=stdout_fd, stderr_fd=None,
                stderr_tail=StderrTail(budget=self.tail_budget),
            ),
            tree=tree,
            stderr=stderr,
            adopted=True,
        )
        self.running[instance_id] = running
        self.generation += 1
        assert self._nursery is not None, "attach() first"
        if stderr is not None:
            self._nursery.start_soon(self._read_stderr, instance_id, running)
        self._nursery.start_soon(self._watch_adopted_root, instance_id, running, pidfd)

    async def _watch_adopted_root(self, instance_id: str, running: RunningInstance, pidfd: int) -> None:
        """Wait for an adopted root to exit (its pidfd turns readable), then
        report it. Cancellation: stops watching; the pidfd is closed."""
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        running.returncode = None
        running.root_reaped.set()
        log.info("adapter.root_exited", instance=instance_id, pid=running.root.pid, returncode=None, adopted=True)
        self.report(self.registry.root_exited(instance_id, returncode=None, now=self.now()))

    # -- an in-place upgrade ------------------------------------------------------

    @property
    def spawns_in_flight(self) -> int:
        """Spawns under way in a worker thread."""
        return self.reaper.spawns_in_flight

    def busy(self) -> str | None:
        """Why the trees cannot be handed over right now (a spawn in a worker
        thread), or None."""
        return f"{len(self._spawning)} spawns in progress" if self._spawning else None

    def export_trees(self) -> tuple[list[HandedTree], list[int]]:
        """Every running tree as the next image needs it, and the fds it must
        keep open (pipes and stderr files). Call only when not `busy`."""
        trees: list[HandedTree] = []
        fds: list[int] = []
        for instance_id, running in self.running.items():
            root = running.root
            stderr = running.stderr
            trees.append(HandedTree(
                instance_id=instance_id, adapter=running.adapter.name,
                root_pid=root.id.pid, root_start_time=root.id.start_time,
                known=sorted((m.pid, m.start_time) for m in running.tree.known),
                stdin_fd=root.stdin_fd, stdout_fd=root.stdout_fd,
                stderr_file=stderr.path.name if stderr is not None else None,
                stderr_fd=stderr.fd if stderr is not None and stderr.fd >= 0 else None,
                stderr_offset=stderr.offset if stderr is not None else 0,
                stderr_tail=list(root.stderr_tail), stop_began=running.stop_began,
                root_reaped=running.root_reaped.is_set(), returncode=running.returncode, adopted=running.adopted,
            ))
            fds += [fd for fd in (root.stdin_fd, root.stdout_fd) if fd is not None]
            if stderr is not None and stderr.fd >= 0:
                fds.append(stderr.fd)
        return trees, fds

    def export_finished_logs(self) -> list[tuple[str, list[bytes]]]:
        """The stderr tails of instances stopped lately, oldest first."""
        return [(instance_id, list(tail)) for instance_id, tail in self.finished_logs.items()]

    def restore_finished_logs(self, logs: list[tuple[str, list[bytes]]]) -> None:
        for instance_id, lines in logs:
            self.finished_logs[instance_id] = StderrTail(lines, budget=self.tail_budget)

    def restore_tree(self, handed: HandedTree, adapter: AdapterConfig) -> RunningInstance:
        """Take back a tree the previous image handed over: the root is still
        this process's child (same pid across execve), so the reaper watches
        it as before; its pipes and stderr file are the fds it names."""
        root_id = process.ProcessId(handed.root_pid, handed.root_start_time)
        tree = InstanceTree(instance_id=handed.instance_id, root=root_id, cgroup=self.cgroups, daemon_pid=self.pid,
                            table=self.table)
        tree.known.update(process.ProcessId(pid, start) for pid, start in handed.known)
        stderr = None
        if handed.stderr_file is not None and handed.stderr_fd is not None:
            stderr = self.stderr_files.adopt_open(handed.stderr_file, handed.stderr_fd, handed.stderr_offset)
        root = RootProcess(
            id=root_id, stdin_fd=handed.stdin_fd, stdout_fd=handed.stdout_fd, stderr_fd=None,
            stderr_tail=StderrTail(handed.stderr_tail, budget=self.tail_budget),
        )
        running = RunningInstance(
            adapter=adapter, root=root, tree=tree, stderr=stderr, adopted=handed.adopted, stop_began=handed.stop_began
        )
        self.running[handed.instance_id] = running
        self.generation += 1
        assert self._nursery is not None, "attach() first"
        if stderr is not None:
            self._nursery.start_soon(self._read_stderr, handed.instance_id, running)
        if handed.root_reaped:
            running.returncode = handed.returncode
            running.root_reaped.set()
        elif handed.adopted and _parent_of(root_id) != self.pid:
            # Adopted after a crash, so not our child: its exit shows on a pidfd.
            pidfd = process.open_pidfd(root_id)
            if pidfd is None:
                running.root_reaped.set()
            else:
                self._nursery.start_soon(self._watch_adopted_root, handed.instance_id, running, pidfd)
                return running
        else:
            self.reaper.watch_root(
                root_id.pid, partial(self._root_reaped, handed.instance_id, running), spawned_after=float("-inf")
            )
        self._settle_soon(handed.instance_id, running, HANDED)
        return running


def _parent_of(proc: process.ProcessId) -> int | None:
    stat = process.read_stat(proc.pid)
    return stat.ppid if stat is not None and stat.start_time == proc.start_time else None
