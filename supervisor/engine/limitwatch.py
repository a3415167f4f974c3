"""The limit watch: trees over their memory_limit or max_pids are stopped
within about a second, whatever sweep_interval is (`LimitWatch`).

Every WATCH_INTERVAL_S the watch looks at the running trees that have a limit
(and at every tree while a memory_budget is set): it reads, in a worker thread
that returns data only, what `procs/treelimits.py` offers for each (the
members and, where a memory figure is needed, their RSS; the kernel's event
counters where the kernel enforces a limit), then decides on the trio thread
(`verdicts`, pure) and ends each tree over a limit through the registry, as a
sweep would: its holders get `adapter_exited` with reason `memory_limit` or
`pids_limit`, and the tree is stopped like a release stops it.

Cost: one look costs the processes of the watched trees, never the host's; with
no tree to watch (no adapter with a limit, no memory_budget) the watch sleeps
until a tree is spawned and costs nothing. Trees held only to max_pids (every
adapter's, by default) are counted only when they could have passed it: the
kernel's pid counter says how many processes the host started since they were
last counted, and no tree can have grown by more than that (`PidsGate`). On
a host that is not forking hundreds of processes a second, watching max_pids
costs one read of that counter per look, however many trees there are.

memory_budget: the watch sums the RSS of every tree at the same cadence. Going
over the budget stops nothing (no tree is at fault on its own: each is held to
its own memory_limit); it is logged once when crossed and once when back
under, and meanwhile acquires that would start a new instance get 1004.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec
import structlog
import trio

from supervisor.core.config import Config
from supervisor.core.registry import Action, Reason, Registry, State
from supervisor.engine.instances import Instances
from supervisor.engine.running import RunningInstance
from supervisor.engine.stalls import TurnClock, present_in_turns
from supervisor.procs import process, proctable, treelimits
from supervisor.procs.cgroup import CgroupManager
from supervisor.procs.treelimits import TreeFigures

log = structlog.get_logger()

# How often the watched trees are looked at. A tree over its limit is stopped
# within about a second of crossing it: half of that for the look to come
# round, the rest for a slow look on a loaded host and for the stop to begin.
# Each look costs every watched tree's processes (about 13 % of a core at
# 1000 limited instances every 0.25 s, half that at 0.5 s: docs/performance.md).
WATCH_INTERVAL_S = 0.5

# Trees handled between two looks at the clock in the trio thread's walks of
# the watched trees, which let other tasks run once a turn has taken
# STEP_BUDGET_S: a few hundred microseconds past the budget at most.
TREES_PER_LOOK = 64

# The headroom when no adapter has a max_pids: no count is ever due.
WATCH_HEADROOM_UNLIMITED = 2**62

# The states in which a tree is held to its limits (one stopping is going anyway).
WATCHED_STATES = (State.RUNNING, State.LINGERING)


class PidsGate:
    """Says when the trees held to max_pids must be counted again: only once
    the host has handed out as many pids since their last count as the
    smallest headroom (max_pids minus the processes counted) of any tree, a
    new tree's included (it starts with one process). The roots this daemon
    spawned since are left out: each took one pid, for a tree of its own, so
    a daemon filling up with instances does not make every tree be counted
    again every headroom's worth of spawns. Fed, at each look, the kernel's
    last pid (without it, unreadable, every look counts) and how many roots
    the daemon has spawned so far. Pure."""

    def __init__(self, pid_max: int) -> None:
        self._pid_max = pid_max
        self._last_pid: int | None = None
        # Pids handed out since the last count; None: a count is due.
        self._handed: int | None = None
        self._headroom = 0
        # Roots spawned when the trees were last counted, plus the spawns
        # under way then: only roots spawned after it are left out.
        self._spawned_at_count = 0

    def due(self, last_pid: int | None, spawned: int = 0) -> bool:
        """Whether the trees must be counted at this look, given the last pid
        the kernel handed out now (None if it could not be read) and the
        roots the daemon has spawned so far (a running total)."""
        previous, self._last_pid = self._last_pid, last_pid
        if last_pid is None or previous is None or self._handed is None:
            self._handed = None
            return True
        # The counter wraps at pid_max; more than pid_max new processes
        # between two looks would need more pids than the host has.
        self._handed += (last_pid - previous) % self._pid_max
        own = max(0, spawned - self._spawned_at_count)
        return self._handed - own >= self._headroom

    def counted(self, headroom: int, spawned: int = 0, spawning: int = 0) -> None:
        """The trees were just counted: `headroom` is the least any of them,
        or a tree spawned from now on, may still grow by; `spawned` the roots
        spawned so far, and `spawning` the spawns under way (whose pids may
        predate the count's reading of the counter, so they are not left out)."""
        self._handed = 0
        self._headroom = headroom
        self._spawned_at_count = spawned + spawning

    def invalidate(self) -> None:
        """Count at the next look (the limits changed: a reload)."""
        self._handed = None


class Watched(msgspec.Struct, frozen=True, gc=False):
    """An immutable view of one tree for a look in a worker thread. Not
    tracked by the collector (strings, numbers and frozensets of them: no
    cycle can go through it): a look at 10,000 trees makes 10,000 of them."""

    instance_id: str
    memory_limit: int | None
    max_pids: int | None
    # Whether its RSS must be read (a memory_limit the kernel does not enforce,
    # or a memory_budget to sum).
    want_rss: bool
    # Process-table mode: the root and the known members to start from.
    anchors: frozenset[process.ProcessId] = frozenset()
    # The kernel controllers enforcing its limits ("memory", "pids").
    kernel: frozenset[str] = frozenset()


class Look(msgspec.Struct, frozen=True, gc=False):
    """What one look found of one tree (untracked, as `Watched`)."""

    figures: TreeFigures
    # Which kernel limit the tree hit ("memory", "pids"), if any.
    kernel_hit: str | None = None


class Verdict(msgspec.Struct, frozen=True):
    """A tree over a limit: why, what was found and the limit it passed."""

    instance_id: str
    reason: Reason
    found: int
    limit: int | None


def verdicts(watched: Iterable[Watched], looks: dict[str, Look]) -> list[Verdict]:
    """The trees over one of their limits, from what a look found (pure).
    A kernel-enforced limit the kernel says was hit counts first; then more
    processes than max_pids; then more RSS than memory_limit. A tree the look
    did not reach is judged by the next one."""
    over = []
    for tree in watched:
        look = looks.get(tree.instance_id)
        if look is None:
            continue
        figures = look.figures
        if look.kernel_hit == "pids":
            over.append(Verdict(tree.instance_id, Reason.PIDS_LIMIT, figures.pids, tree.max_pids))
        elif look.kernel_hit == "memory":
            over.append(Verdict(tree.instance_id, Reason.MEMORY_LIMIT, figures.rss_bytes, tree.memory_limit))
        elif tree.max_pids is not None and figures.pids > tree.max_pids:
            over.append(Verdict(tree.instance_id, Reason.PIDS_LIMIT, figures.pids, tree.max_pids))
        elif (
            tree.memory_limit is not None and "memory" not in tree.kernel
            and figures.rss_bytes > tree.memory_limit
        ):
            over.append(Verdict(tree.instance_id, Reason.MEMORY_LIMIT, figures.rss_bytes, tree.memory_limit))
    return over


def look_at(
    watched: Iterable[Watched], cgroups: CgroupManager | None, failures: list[str] | None = None
) -> dict[str, Look]:
    """Blocking: one look at each watched tree (see `procs/treelimits.py`).
    For a worker thread: reads only, returns data. A tree whose cgroup cannot
    be read is left out (the next look, or the sweep, tries again), with why
    appended to `failures` for the caller to log."""
    looks: dict[str, Look] = {}
    for tree in watched:
        try:
            if cgroups is not None:
                figures = treelimits.measure_cgroup(
                    treelimits.cgroup_pids(cgroups.base / tree.instance_id), limit=tree.max_pids, rss=tree.want_rss
                )
                hit = None
                if tree.kernel:
                    memory, pids = treelimits.read_kernel_events(cgroups.base / tree.instance_id, tree.kernel)
                    hit = treelimits.kernel_verdict(memory, pids)
                looks[tree.instance_id] = Look(figures, hit)
            else:
                looks[tree.instance_id] = Look(treelimits.measure_descendants(tree.anchors, limit=tree.max_pids))
        except OSError as exc:
            if failures is not None:
                failures.append(f"{tree.instance_id}: {exc}")
    return looks


class LimitWatch:
    """Holds every running tree to its memory_limit and max_pids, every
    WATCH_INTERVAL_S, and sums them against the memory_budget."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        registry: Registry,
        instances: Instances,
        cgroups: CgroupManager | None,
        execute: Callable[[Iterable[Action]], None],
        stopped_over_memory: Callable[[str], None],
    ) -> None:
        """`config` answers the current config (it changes on reload);
        `stopped_over_memory(instance_id)` is told of each tree stopped for
        its memory_limit (the next sweep report lists it)."""
        self._config = config
        self._registry = registry
        self._instances = instances
        self._cgroups = cgroups
        self._execute = execute
        self._stopped_over_memory = stopped_over_memory
        self._wake = trio.Event()
        # The kernel controllers enabled for the instance cgroups, and those
        # enforcing each instance's limits (set once, when first watched).
        self._controllers: frozenset[str] = frozenset()
        self._kernel: dict[str, frozenset[str]] = {}
        self.over_budget = False
        # Looks taken so far (for tests and the bench: the watch is alive),
        # and those that counted the trees held only to max_pids.
        self.looks = 0
        self.pids_counts = 0
        self._pids_gate = PidsGate(proctable.read_pid_max())

    def wake(self) -> None:
        """Trees may have been spawned: a sleeping watch looks again."""
        self._wake.set()

    def reloaded(self) -> None:
        """The config changed: count every tree at the next look (an
        adapter's max_pids may be lower now)."""
        self._pids_gate.invalidate()
        self._wake.set()

    async def run(self) -> None:
        """Watch until cancelled. Sleeps, costing nothing, while no tree is to
        be watched. Cancellation: a look under way in its thread is abandoned
        (it changes nothing)."""
        if self._cgroups is not None:
            self._controllers = treelimits.enable_controllers(self._cgroups.base)
            if self._controllers:
                log.info("limits.kernel", controllers=sorted(self._controllers))
        while True:
            if not self._instances.running:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            count_pids = self._pids_gate.due(proctable.read_last_pid(), self._instances.roots_spawned)
            spawning = self._instances.spawns_in_flight
            watched = await self._watched(count_pids)
            if not watched:
                await trio.sleep(WATCH_INTERVAL_S)
                continue
            failures: list[str] = []
            try:
                looks = await trio.to_thread.run_sync(look_at, watched, self._cgroups, failures)
            except RuntimeError as exc:
                # No thread could be started (the daemon is at its thread or
                # memory limit): this look is lost, the watch is not.
                log.error("limits.look_failed", error=str(exc))
                await trio.sleep(WATCH_INTERVAL_S)
                continue
            self.looks += 1
            if failures:
                log.debug("limits.look_failed", trees=failures)
            await self._act(watched, looks)
            if count_pids:
                self.pids_counts += 1
                headroom = 0 if failures else await self._headroom(watched, looks)
                self._pids_gate.counted(headroom, self._instances.roots_spawned, spawning)
                log.debug("limits.pids_counted", trees=len(watched), headroom=headroom)
            await trio.sleep(WATCH_INTERVAL_S)

    async def _headroom(self, watched: list[Watched], looks: dict[str, Look]) -> int:
        """The least any tree counted, or one spawned from now on (a single
        process), may grow by before it passes its max_pids. In turns (see
        `TurnClock`)."""
        rooms = [a.max_pids - 1 for a in self._config().adapters.values() if a.max_pids is not None]
        clock = TurnClock()
        for start in range(0, len(watched), TREES_PER_LOOK):
            await clock.tick()
            for tree in watched[start:start + TREES_PER_LOOK]:
                look = looks.get(tree.instance_id)
                if tree.max_pids is not None:
                    rooms.append(tree.max_pids - look.figures.pids if look is not None else 0)
        return max(0, min(rooms, default=WATCH_HEADROOM_UNLIMITED))

    async def _watched(self, count_pids: bool) -> list[Watched]:
        """The trees to look at now (trio thread, in turns: see `TurnClock`):
        those with a memory_limit (every tree while a memory_budget is set),
        and if `count_pids` those held to max_pids. Walks no tree when there
        are none to look at. A tree stopped between two turns is left out."""
        config = self._config()
        budget = config.daemon.memory_budget is not None
        if not (count_pids or budget or any(a.memory_limit is not None for a in config.adapters.values())):
            return []
        instances = self._registry.instances
        running_now = self._instances.running
        watched = []
        async for piece in present_in_turns(running_now, TREES_PER_LOOK):
            for instance_id, running in piece:
                adapter = running.adapter
                if adapter.memory_limit is None and not budget and not (count_pids and adapter.max_pids is not None):
                    continue
                instance = instances.get(instance_id)
                if instance is None or instance.state not in WATCHED_STATES:
                    continue
                kernel = self._kernel_for(instance_id, running)
                want_rss = budget or (adapter.memory_limit is not None and "memory" not in kernel)
                anchors = (
                    frozenset() if self._cgroups is not None else frozenset({running.root.id, *running.tree.known})
                )
                watched.append(Watched(instance_id, adapter.memory_limit, adapter.max_pids, want_rss, anchors, kernel))
        if len(self._kernel) > len(self._instances.running):
            self._kernel = {i: k for i, k in self._kernel.items() if i in self._instances.running}
        return watched

    def _kernel_for(self, instance_id: str, running: RunningInstance) -> frozenset[str]:
        """The kernel controllers enforcing this tree's limits, set up the
        first time it is watched (where the host offers them)."""
        kernel = self._kernel.get(instance_id)
        if kernel is None:
            kernel = frozenset()
            if self._controllers and self._cgroups is not None:
                adapter = running.adapter
                kernel = treelimits.apply_kernel_limits(
                    self._cgroups.base / instance_id, controllers=self._controllers,
                    memory_limit=adapter.memory_limit, max_pids=adapter.max_pids,
                )
            self._kernel[instance_id] = kernel
        return kernel

    async def _act(self, watched: list[Watched], looks: dict[str, Look]) -> None:
        """Trio thread, in turns (see `TurnClock`): end the trees over a
        limit, remember what a look learned of a tree's members, check the
        budget."""
        running = self._instances.running
        clock = TurnClock()
        for start in range(0, len(watched), TREES_PER_LOOK):
            await clock.tick()
            trees = watched[start:start + TREES_PER_LOOK]
            for tree in trees:
                look = looks.get(tree.instance_id)
                held = running.get(tree.instance_id)
                if look is not None and held is not None and look.figures.seen is not None:
                    held.tree.remember(list(look.figures.seen), tree.anchors)
            for verdict in verdicts(trees, looks):
                self._end(verdict)
        budget = self._config().daemon.memory_budget
        if budget is None:
            self.over_budget = False
            return
        total = sum(look.figures.rss_bytes for look in looks.values())
        if total > budget and not self.over_budget:
            log.warning("memory.over_budget", rss_bytes=total, memory_budget=budget,
                        consequence="no new instance starts until the trees are under it again; none is stopped")
        elif total <= budget and self.over_budget:
            log.info("memory.within_budget", rss_bytes=total, memory_budget=budget)
        self.over_budget = total > budget

    def _end(self, verdict: Verdict) -> None:
        """End a tree a look found over a limit, unless it is ending already."""
        instance = self._registry.instances.get(verdict.instance_id)
        if verdict.instance_id not in self._instances.running or instance is None or instance.state not in WATCHED_STATES:
            return  # released or ended while the look ran: its stop is under way
        if verdict.reason is Reason.PIDS_LIMIT:
            log.warning("adapter.over_pids", instance=verdict.instance_id, pids=verdict.found,
                        max_pids=verdict.limit, reason="the tree holds more processes than its max_pids")
        else:
            log.warning("adapter.over_memory", instance=verdict.instance_id, rss_bytes=verdict.found,
                        memory_limit=verdict.limit)
            self._stopped_over_memory(verdict.instance_id)
        self._execute(self._registry.terminate(verdict.instance_id, reason=verdict.reason))
