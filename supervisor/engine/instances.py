"""Instance life in the shell: spawning roots, watching them, stopping trees.

`Instances` keeps what the registry cannot: each spawned root with its pipes
and tree (`RunningInstance`, `running.py`), the acquires parked on a spawn
(`PendingSpawn`), the stderr tails of trees stopped lately. This module spawns
and watches roots; stopping trees is `stopping.py`, and trees adopted after a
crash or handed over by an upgrade are `treehandover.py` (base classes of
`Instances`, on the same state). It reports every outcome back to the
registry (`spawned`, `spawn_failed`, `root_exited`, `tree_gone`) and hands the
registry's answer to `report`, the engine's way of carrying out actions. All
of it runs on the trio thread; a spawn that must not (the subprocess spawner)
runs in a worker thread that touches no state.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import msgspec
import structlog
import trio

from supervisor.core.config import AdapterConfig
from supervisor.core.errors import InvalidParams, LimitReached, SpawnFailed, UnknownAdapter
from supervisor.core.identity import Credentials, credentials_of
from supervisor.core.registry import Action, Reason, Registry
from supervisor.engine.metrics import Metrics
from supervisor.engine.running import PendingSpawn, RunningInstance, record_root_exit
from supervisor.engine.staterecord import RecordKeeper
from supervisor.engine.stdiostore import StdioStore
from supervisor.engine.stopping import Stopping
from supervisor.engine.treehandover import HANDED, TreeHandover
from supervisor.procs import process, subreaper
from supervisor.procs.cgroup import CgroupManager
from supervisor.procs.proctable import TableScanner
from supervisor.procs.sparecgroups import SpareCgroups
from supervisor.procs.spawner import RootProcess, Spawner, SpawnRequest
from supervisor.procs.stderr import StderrTail, TailBudget, capture_stderr
from supervisor.procs.stderrfile import FollowedFile, StderrFiles
from supervisor.procs.subreaper import ChildReaper
from supervisor.procs.tree import InstanceTree

log = structlog.get_logger()

# How the root settler first sees a root spawned here (`Instances._settle_roots`;
# a root handed over is seen as `treehandover.HANDED`).
SPAWNED = "spawned"

# How often the roots that had not exec'd when their spawn returned are
# looked at (`Instances._watch_execs`): every EXEC_POLL_S (trio sleeps in
# whole milliseconds, and such a root waits that long for a time slice
# already) for their first EXEC_BACKOFF_AFTER_S, then ever less often, up to
# EXEC_POLL_MAX_S: one that takes longer is stuck (a frozen cgroup, a hung file
# system), and looking at many such every millisecond would take the thread.
EXEC_POLL_S = 0.001
EXEC_BACKOFF_AFTER_S = 0.01
EXEC_POLL_MAX_S = 0.1


# How long the credentials of a client's uid, looked up off the trio thread
# for the "@peer" instances it acquires, are used before they are looked up
# again (a change of the user's groups reaches its spawns after this), and how
# many uids are kept.
PEER_CREDENTIALS_TTL_S = 60.0
PEER_CREDENTIALS_KEPT = 1024


class _AwaitedExec(msgspec.Struct):
    """A root awaiting its exec, what registering it takes, and when
    `_watch_execs` looks at it next."""

    adapter: AdapterConfig
    root: RootProcess
    spawned_after: float
    stderr: FollowedFile
    next_look: float = 0.0
    interval: float = 0.0


# Work for after a reply: plain callables, run in order by whoever sends it
# (`run_after`).
AfterReply = list[Callable[[], None]]


def run_after(work: AfterReply | tuple[()]) -> None:
    """Run after-reply work now, in order, and empty the list (so that it
    runs once however often this is called). A piece that fails is logged
    and does not stop the others; nothing is raised."""
    if not work:
        return
    assert isinstance(work, list)
    pieces = list(work)
    work.clear()
    for fn in pieces:
        try:
            fn()
        except Exception:
            log.exception("after_reply.failed", work=repr(fn))


class Instances(TreeHandover, Stopping):
    """Every spawned root of one daemon, from its spawn until its tree is gone."""

    def __init__(
        self,
        *,
        registry: Registry,
        adapters: Mapping[str, AdapterConfig],
        spawner: Spawner,
        cgroups: CgroupManager | None,
        spares: SpareCgroups | None,
        reaper: ChildReaper,
        stderr_files: StderrFiles,
        record: RecordKeeper,
        metrics: Metrics,
        now: Callable[[], float],
        report: Callable[[Iterable[Action]], None],
        stdio: StdioStore | None = None,
        table: TableScanner | None = None,
    ) -> None:
        """`table`: the shared process table, in process-table mode."""
        self.registry = registry
        self.adapters = adapters
        self.spawner = spawner
        self.cgroups = cgroups
        self.spares = spares
        self.reaper = reaper
        self.stderr_files = stderr_files
        self.record = record
        self.metrics = metrics
        self.now = now
        self.report = report
        # Where the roots' stdin/stdout pipes are kept through a crash.
        self.stdio = stdio if stdio is not None else StdioStore(None)
        self.table = table
        self.pid = os.getpid()
        self.running: dict[str, RunningInstance] = {}
        # The sum of `running[i].rss_bytes` per adapter name (for the metrics,
        # which must not walk every tree at each scrape).
        self.rss_by_adapter: collections.Counter[str] = collections.Counter()
        # The stderr tails of instances stopped lately: the deques themselves,
        # which their readers may still be filling with the last lines.
        self.finished_logs: collections.OrderedDict[str, StderrTail] = collections.OrderedDict()
        # What every tail, live and finished, holds together.
        self.tail_budget = TailBudget()
        # Their instances' uids (`Instance.uid`): who may read them.
        self.finished_owners: dict[str, int | None] = {}
        # Grows by one whenever a tree is spawned or stopped: scans taken
        # before are out of date.
        self.generation = 0
        # Roots this daemon spawned, each one new pid (the limit watch's
        # PidsGate leaves them out of the pids the host handed out).
        self.roots_spawned = 0
        self._pending: dict[str, PendingSpawn] = {}
        # The (uid, gid) of the client whose acquire created an instance of a
        # "@peer" adapter, until its spawn: who its tree runs as.
        self._peers: dict[str, tuple[int, int]] = {}
        # Spawns in flight in a worker thread: shutdown waits for them.
        self._spawning: dict[str, trio.Event] = {}
        # (uid, gid) of clients -> their credentials and when they were looked up.
        self._credentials: dict[tuple[int, int], tuple[Credentials, float]] = {}
        # Roots that had not exec'd when their spawn returned (`_await_exec`),
        # and whether `_watch_execs` runs.
        self._awaiting_exec: dict[str, _AwaitedExec] = {}
        self._watching_execs = False
        # Set when a root is added to them (the watcher may sleep longer).
        self._exec_awaited = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Roots for the settler to look at: just spawned or handed over
        # (first look), or reaped since (see `_settle_roots`).
        self._to_settle: collections.deque[tuple[str, RunningInstance, str | None]] = collections.deque()
        self._settle_wanted = trio.Event()
        # Stops decided but not started yet (see `_start_stops`).
        self._to_stop: collections.deque[tuple[str, Reason]] = collections.deque()
        self._stop_wanted = trio.Event()
        # Whether the stop starter takes stops (until it is cancelled).
        self._stop_starter = True

    def attach(self, nursery: trio.Nursery) -> None:
        """Where the tasks of roots and stops run: the engine's nursery."""
        self._nursery = nursery
        nursery.start_soon(self._settle_roots)
        nursery.start_soon(self._start_stops)

    def set_rss(self, running: RunningInstance, rss_bytes: int) -> None:
        """A tree's RSS as a scan found it (0 once it is gone)."""
        name = running.adapter.name
        self.rss_by_adapter[name] += rss_bytes - running.rss_bytes
        running.rss_bytes = rss_bytes
        if not self.rss_by_adapter[name]:
            del self.rss_by_adapter[name]

    # -- spawning ----------------------------------------------------------------

    def spawn(self, instance_id: str, after: AfterReply | None) -> list[Action]:
        """Start the instance's root. With an inline spawner the root is
        started and registered right here, and the registry's answer is
        returned (the caller carries it out); its stderr reader and watcher
        are appended to `after` (or started now if `after` is None). Otherwise
        a task spawns it in a worker thread and reports back itself, and this
        returns no action."""
        if self.spawner.inline:
            return self._spawn_here(instance_id, after)
        assert self._nursery is not None, "attach() first"
        self._nursery.start_soon(self._spawn_in_thread, instance_id)
        return []

    def spawn_as_peer(self, instance_id: str, *, uid: int, gid: int) -> None:
        """The instance (of a "@peer" adapter, not yet spawned) runs as this
        client's uid and gid. Forgets those of instances gone unspawned."""
        for gone in [known for known in self._peers if known not in self.registry.instances]:
            del self._peers[gone]
        self._peers[instance_id] = (uid, gid)

    def known_credentials(self, uid: int, gid: int) -> Credentials | None:
        """The credentials of a client's uid and gid as `look_up_credentials`
        found them less than PEER_CREDENTIALS_TTL_S ago, or None."""
        known = self._credentials.get((uid, gid))
        if known is None or trio.current_time() - known[1] > PEER_CREDENTIALS_TTL_S:
            return None
        return known[0]

    async def look_up_credentials(self, uid: int, gid: int) -> None:
        """Look up the supplementary groups of a client's uid (the passwd and
        group databases: a directory service may take seconds) in a worker
        thread, for the spawns of "@peer" instances it acquires
        (`known_credentials`). A failed lookup is left to the spawn, which
        says what failed. Cancellation: raises Cancelled; the lookup is
        abandoned."""
        try:
            found = await trio.to_thread.run_sync(credentials_of, uid, gid, abandon_on_cancel=True)
        except (OSError, ValueError):
            return
        if len(self._credentials) >= PEER_CREDENTIALS_KEPT:
            self._credentials.clear()  # (a cache: the next lookups fill it again)
        self._credentials[uid, gid] = (found, trio.current_time())

    def _peer_credentials(self, instance_id: str) -> Credentials:
        """Who a "@peer" instance runs as: the acquiring client's uid and gid
        with the supplementary groups of its passwd entry (as looked up off
        the trio thread lately, else now). One whose client was not recorded
        (a spawn handed over by an upgrade while it waited) runs as the uid
        that owns it, with that user's passwd gid (its uid as gid without a
        passwd entry)."""
        recorded = self._peers.pop(instance_id, None)
        if recorded is not None:
            return self.known_credentials(*recorded) or credentials_of(*recorded)
        uid = self.registry.instances[instance_id].uid
        uid = os.geteuid() if uid is None else uid
        try:
            return credentials_of(uid)
        except ValueError:
            return credentials_of(uid, uid)

    def pending(self, instance_id: str) -> PendingSpawn:
        """What acquires parked on a STARTING instance wait for."""
        return self._pending.setdefault(instance_id, PendingSpawn())

    def _spawn_here(self, instance_id: str, after: AfterReply | None) -> list[Action]:
        request = self._request(instance_id)
        if request is None:
            return self._adapter_gone(instance_id)
        try:
            request, stderr = self._with_stderr_file(request)
        except OSError as exc:
            return self._spawn_failed(instance_id, exc)
        spawned_after = trio.current_time()
        try:
            root = self.spawner.spawn(request, spare_cgroup=self._claim_spare(instance_id))
        except (SpawnFailed, InvalidParams, OSError) as exc:
            self._drop_stderr(stderr)
            return self._spawn_failed(instance_id, exc)
        if root.pending is not None:
            self._await_exec(instance_id, _AwaitedExec(request.adapter, root, spawned_after, stderr))
            return []
        return self._root_started(instance_id, request.adapter, root, spawned_after, after, stderr)

    def _await_exec(self, instance_id: str, awaited: _AwaitedExec) -> None:
        """A root that had not exec'd when its spawn returned: watched by
        `_watch_execs` until it has (or failed before exec), then reported
        as a spawn in a thread is. Until then it is not the reaper's
        (`others`): a root that failed is reaped by its settling."""
        assert self._nursery is not None, "attach() first"
        self.metrics.spawns_awaited.inc(awaited.adapter.name)
        awaited.interval = EXEC_POLL_S
        awaited.next_look = trio.current_time() + EXEC_POLL_S
        self._awaiting_exec[instance_id] = awaited
        self._spawning[instance_id] = trio.Event()
        self.reaper.spawns_in_flight += 1
        self.reaper.others.add(awaited.root.pid)
        if not self._watching_execs:
            self._nursery.start_soon(self._watch_execs)
            self._watching_execs = True
        self._exec_awaited.set()

    async def _watch_execs(self) -> None:
        """Look at each root awaiting its exec when it is due (see
        EXEC_POLL_S), one task for them all, until none is left. Shielded:
        every such root is registered or reaped, never lost."""
        try:
            with trio.CancelScope(shield=True):
                while self._awaiting_exec:
                    self._exec_awaited = trio.Event()
                    with trio.move_on_at(min(awaited.next_look for awaited in self._awaiting_exec.values())):
                        await self._exec_awaited.wait()  # a newcomer, due sooner
                    now = trio.current_time()
                    for instance_id, awaited in list(self._awaiting_exec.items()):
                        if awaited.next_look > now:
                            continue
                        failure = None
                        try:
                            if not awaited.root.exec_settled():
                                if now - awaited.spawned_after > EXEC_BACKOFF_AFTER_S:
                                    awaited.interval = min(awaited.interval * 2, EXEC_POLL_MAX_S)
                                awaited.next_look = now + awaited.interval
                                continue
                        except SpawnFailed as exc:
                            failure = exc
                        del self._awaiting_exec[instance_id]
                        self._exec_settled(instance_id, awaited, failure)
        finally:
            self._watching_execs = False

    def kill_awaiting_exec(self) -> int:
        """SIGKILL every root still awaiting its exec (our unreaped children:
        their pids cannot have been reused), for a daemon that stops and will
        not wait for them; `_watch_execs` then settles them as they die (one
        in an uninterruptible sleep only once that ends). Returns how many
        there were."""
        for awaited in self._awaiting_exec.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(awaited.root.pid, signal.SIGKILL)
        return len(self._awaiting_exec)

    def _exec_settled(self, instance_id: str, awaited: _AwaitedExec, failure: SpawnFailed | None) -> None:
        root = awaited.root
        self.reaper.others.discard(root.pid)
        try:
            if failure is not None:
                self._drop_stderr(awaited.stderr)
                self.report(self._spawn_failed(instance_id, failure))
            else:
                if not root.id.start_time:
                    # /proc could not tell at the spawn (out of fds): without
                    # its start time no check would take the root for itself.
                    # Still our unreaped child, so the pid is still its.
                    with contextlib.suppress(OSError):
                        root.id = process.identify(root.pid) or root.id
                self.report(self._root_started(instance_id, awaited.adapter, root, awaited.spawned_after, None,
                                               awaited.stderr))
                # A root that exited at once is a zombie the reaper left
                # alone while it was `others`: reaped (and routed) now.
                self.reaper.reap_children([root.pid])
        finally:
            self.reaper.spawn_settled()
            self._spawning.pop(instance_id).set()

    async def _spawn_in_thread(self, instance_id: str) -> None:
        """Spawn in a worker thread, then report to the registry on the trio
        thread. Cancellation: the thread always runs to completion and its
        root is always registered, so it is never lost."""
        done = self._spawning[instance_id] = trio.Event()
        self.reaper.spawns_in_flight += 1
        try:
            request = self._request(instance_id)
            if request is None:
                self.report(self._adapter_gone(instance_id))
                return
            try:
                request, stderr = self._with_stderr_file(request)
            except OSError as exc:
                self.report(self._spawn_failed(instance_id, exc))
                return
            spare = self._claim_spare(instance_id)
            spawned_after = trio.current_time()
            try:
                root = await trio.to_thread.run_sync(partial(self.spawner.spawn, request, spare_cgroup=spare))
            except (SpawnFailed, InvalidParams, OSError) as exc:
                self._drop_stderr(stderr)
                self.report(self._spawn_failed(instance_id, exc))
                return
            self.report(self._root_started(instance_id, request.adapter, root, spawned_after, None, stderr))
        finally:
            self.reaper.spawn_settled()
            del self._spawning[instance_id]
            done.set()

    def _request(self, instance_id: str) -> SpawnRequest | None:
        """The spawn of a registered instance, or None if its adapter was
        removed by a reload while it waited for its predecessor."""
        instance = self.registry.instances[instance_id]
        adapter = self.adapters.get(instance.adapter)
        if adapter is None:
            self._peers.pop(instance_id, None)
            return None
        peer = self._peer_credentials(instance_id) if adapter.runs_as_peer else None
        return SpawnRequest(
            adapter=adapter, instance_id=instance_id, job=instance.job, params=dict(instance.params), peer=peer
        )

    def _with_stderr_file(self, request: SpawnRequest) -> tuple[SpawnRequest, FollowedFile]:
        """The request with a new stderr file for the root, and the file
        followed. Raises OSError (nothing is left open)."""
        followed = self.stderr_files.take()
        return msgspec.structs.replace(request, stderr=followed.fd), followed

    def _drop_stderr(self, stderr: FollowedFile) -> None:
        """The stderr file of a root that never started."""
        self.stderr_files.remove(stderr)
        stderr.close()

    def _adapter_gone(self, instance_id: str) -> list[Action]:
        adapter = self.registry.instances[instance_id].adapter
        self.pending(instance_id).error = UnknownAdapter(f"adapter {adapter!r} is no longer configured")
        return self.registry.spawn_failed(instance_id)

    def _spawn_failed(self, instance_id: str, exc: SpawnFailed | InvalidParams | OSError) -> list[Action]:
        instance = self.registry.instances[instance_id]
        exhausted = _exhausted(exc)
        if isinstance(exc, OSError):
            exc = SpawnFailed(f"could not prepare the cgroup or the stderr file of instance {instance_id}: {exc}")
        pending = self.pending(instance_id)
        pending.error = exc if isinstance(exc, SpawnFailed) else SpawnFailed(exc.message)
        if exhausted is not None:
            # Not the adapter's fault: the daemon is out of a resource (1004).
            pending.error = LimitReached(
                f"{pending.error.message}; the daemon is out of {exhausted}: release instances or raise its limits"
            )
        log.warning("adapter.spawn_failed", instance=instance_id, job=instance.job,
                    adapter=instance.adapter, error=pending.error.message)
        self.metrics.spawn_failures.inc(instance.adapter)
        self.remove_cgroup(instance_id)
        return self.registry.spawn_failed(instance_id)

    def _root_started(
        self,
        instance_id: str,
        adapter: AdapterConfig,
        root: RootProcess,
        spawned_after: float,
        after: AfterReply | None,
        stderr: FollowedFile | None,
    ) -> list[Action]:
        """Register a root just spawned. Nothing here waits: the root is
        registered, and watched for by the reaper, before any other task can
        run. Its reader and watcher tasks go to `after` when given: they change
        nothing a reply says."""
        tree = InstanceTree(instance_id=instance_id, root=root.id, cgroup=self.cgroups, daemon_pid=self.pid,
                            table=self.table)
        tree.known.add(root.id)
        # Nothing was read yet: the tail counts in the daemon's budget from the start.
        root.stderr_tail = StderrTail(root.stderr_tail, budget=self.tail_budget)
        running = RunningInstance(adapter=adapter, root=root, tree=tree, stderr=stderr)
        self.running[instance_id] = running
        self.stdio.keep(instance_id, root.stdin_fd, root.stdout_fd)
        self.reaper.watch_root(
            root.pid, partial(self._root_reaped, instance_id, running), spawned_after=spawned_after
        )
        self.generation += 1
        self.roots_spawned += 1
        start_tasks = partial(self._start_root_tasks, instance_id, running)
        if after is None:
            start_tasks()
        else:
            after.append(start_tasks)
        return self.registry.spawned(instance_id, pid=root.pid, now=self.now())

    def _start_root_tasks(self, instance_id: str, running: RunningInstance) -> None:
        """The tasks of a root just registered. They get the object, not the
        id: the instance may be stopped and forgotten before they first run.
        The stderr reader owns the pipe's read end, so this must always run."""
        assert self._nursery is not None
        self._nursery.start_soon(self._read_stderr, instance_id, running)
        self._settle_soon(instance_id, running, SPAWNED)
        self.metrics.spawns.inc(running.adapter.name)

    async def _read_stderr(self, instance_id: str, running: RunningInstance) -> None:
        """Follow the tree's stderr until its end (the tree is gone and the
        file drained), then close it. Cancellation: stops reading, closes."""
        stderr = running.stderr
        try:
            await capture_stderr(
                running.root, partial(_stderr_line, instance_id), partial(_stderr_dropped, instance_id),
                receive=stderr.receive if stderr is not None else None,
            )
        finally:
            if stderr is not None:
                stderr.close()

    def _root_reaped(self, instance_id: str, running: RunningInstance, returncode: int) -> None:
        """The reaper's word that a root (spawned or handed over) exited."""
        record_root_exit(running, returncode)
        self._settle_soon(instance_id, running, None)

    def _settle_soon(self, instance_id: str, running: RunningInstance, first_look: str | None) -> None:
        """Have the settler look at a root: for the first time (`SPAWNED` or
        `HANDED`), or again (None) once it is reaped."""
        self._to_settle.append((instance_id, running, first_look))
        self._settle_wanted.set()

    async def _settle_roots(self) -> None:
        """The one task that follows every root the daemon is the parent of
        (one task per root would cost each instance kilobytes): in a turn of
        its own after the spawn (or the handover), log it, catch a root that
        exited before the reaper heard of it, and, once the root is reaped,
        report its exit to the registry, once. Runs until cancelled."""
        while True:
            if not self._to_settle:
                await self._settle_wanted.wait()
                self._settle_wanted = trio.Event()
                continue
            instance_id, running, first_look = self._to_settle.popleft()
            if first_look is not None:
                self._first_look(instance_id, running, first_look)
            if running.settled and running.root_reaped.is_set() and not running.exit_reported:
                running.exit_reported = True
                log.info("adapter.root_exited", instance=instance_id, pid=running.root.pid,
                         returncode=running.returncode)
                self.report(self.registry.root_exited(instance_id, returncode=running.returncode, now=self.now()))
            await trio.lowlevel.checkpoint()

    def _first_look(self, instance_id: str, running: RunningInstance, how: str) -> None:
        running.settled = True
        if how == HANDED:
            # A root that exited during the exec is waitable now.
            self.reaper.reap()
            return
        instance = self.registry.instances.get(instance_id)
        log.info("adapter.spawned", instance=instance_id, job=instance.job if instance else None,
                 adapter=running.adapter.name, pid=running.root.pid)
        self.record.mark_dirty()
        # A root that died before the SIGCHLD receiver ran is caught here too.
        # One peek at this child first: a reap looks at every child of the
        # daemon in the kernel (one per instance), this only at the root.
        if not running.root_reaped.is_set() and subreaper.child_has_exited(running.root.pid):
            self.reaper.reap()

    def settled(self, instance_id: str, *, running: bool) -> None:
        """The registry settled an instance's spawn: wake its parked acquires,
        and forget what an instance that will never have a root left behind."""
        if not running and instance_id not in self.running:
            self._close_spare(instance_id)
            self.remove_cgroup(instance_id)
        pending = self._pending.pop(instance_id, None)
        if pending is not None:
            pending.settled.set()

    def settle_vanished_roots(self) -> None:
        """A root that has exited although its watcher never heard of it (one
        WNOWAIT peek per root): routed as if the reaper had seen it."""
        for instance_id, running in list(self.running.items()):
            if running.adopted:
                continue  # not our child (adopted after a crash): its pidfd tells
            if running.root_reaped.is_set() or not subreaper.child_has_exited(running.root.pid):
                continue
            self.reaper.reap()
            if not running.root_reaped.is_set():
                log.warning("adapter.root_vanished", instance=instance_id, pid=running.root.pid)
                self._root_reaped(instance_id, running, -1)

    def anchors(self) -> frozenset[process.ProcessId]:
        """The root and every known member of every tree: what the process
        table counts as ours, with their descendants (process-table mode)."""
        roots = [running.root.id for running in self.running.values()]
        return frozenset(roots).union(*[running.tree.known for running in self.running.values()])

    # -- what a request may read -------------------------------------------------

    def stderr_tail(self, instance_id: str) -> StderrTail | None:
        """The stderr tail of a running or lately stopped instance, if any."""
        running = self.running.get(instance_id)
        if running is not None:
            return running.root.stderr_tail
        return self.finished_logs.get(instance_id)

    def stdio_duplicates(self, instance_id: str) -> tuple[int, int] | None:
        """New duplicates of the instance's stdin (write end) and stdout (read
        end), owned by the caller; None if it has no pipes (stdio = "null", or
        it is stopping). Duplicates, because the instance may stop and close
        its own ends while the caller still holds these."""
        running = self.running.get(instance_id)
        if running is None or running.root.stdin_fd is None or running.root.stdout_fd is None:
            return None
        return os.dup(running.root.stdin_fd), os.dup(running.root.stdout_fd)

    # -- cgroups -----------------------------------------------------------------

    def _claim_spare(self, instance_id: str) -> int | None:
        """The open directory of the spare cgroup `instance_id` is named after, if any."""
        return self.spares.claim(instance_id) if self.spares is not None else None

    def _close_spare(self, instance_id: str) -> None:
        fd = self._claim_spare(instance_id)
        if fd is not None:
            os.close(fd)

    def remove_cgroup(self, instance_id: str) -> None:
        """Remove an instance's cgroup if there is one; a failure is logged."""
        if self.cgroups is not None:
            try:
                self.cgroups.remove(instance_id)
            except OSError as exc:
                log.warning("cgroup.remove_failed", instance=instance_id, error=str(exc))


# What an acquire fails on for want of the daemon's own resources (1004).
_EXHAUSTION = {
    errno.EMFILE: "file descriptors (its RLIMIT_NOFILE)",
    errno.ENFILE: "file descriptors (the system's file table)",
    errno.ENOMEM: "memory",
    errno.EAGAIN: "processes or threads (RLIMIT_NPROC or pid_max)",
}


def _exhausted(exc: BaseException) -> str | None:
    """Which resource of the daemon's `exc` (or its cause) says ran out, if any."""
    for error in (exc, exc.__cause__):
        if isinstance(error, OSError) and error.errno in _EXHAUSTION:
            return _EXHAUSTION[error.errno]
    return None


def _stderr_line(instance_id: str, line: str) -> None:
    log.info("adapter.stderr", instance=instance_id, line=line)


def _stderr_dropped(instance_id: str, lines: int) -> None:
    log.warning("adapter.stderr_dropped", instance=instance_id, lines=lines,
                reason="over the stderr log budget; only the last lines are kept, for `logs`")
