"""The limit watch (`engine/limitwatch.py`): its verdicts as a table, and the
watch itself over a real registry and real processes (in process-table mode,
in this process: nothing here needs the daemon's subreaper)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import trio

from supervisor.core.config import parse_config
from supervisor.core.registry import Reason, Registry, StopTree
from supervisor.engine import limitwatch, stalls
from supervisor.engine.limitwatch import WATCH_INTERVAL_S, LimitWatch, Look, PidsGate, Watched, look_at, verdicts
from supervisor.procs import process
from supervisor.procs.tree import InstanceTree
from supervisor.procs.treelimits import TreeFigures

MIB = 2**20


def watched(memory_limit: int | None = None, max_pids: int | None = None, kernel: frozenset[str] = frozenset()) -> Watched:
    return Watched("i1", memory_limit, max_pids, want_rss=True, kernel=kernel)


def look(pids: int, rss_mib: int, kernel_hit: str | None = None) -> dict[str, Look]:
    return {"i1": Look(TreeFigures(pids=pids, rss_bytes=rss_mib * MIB), kernel_hit)}


@pytest.mark.parametrize(
    ("tree", "found", "expected"),
    [
        (watched(memory_limit=100 * MIB), look(3, 100), None),  # at the limit is within it
        (watched(memory_limit=100 * MIB), look(3, 101), (Reason.MEMORY_LIMIT, 101 * MIB)),
        (watched(max_pids=64), look(64, 900), None),
        (watched(max_pids=64), look(65, 1), (Reason.PIDS_LIMIT, 65)),
        # Over both: the processes are the cause to name.
        (watched(memory_limit=MIB, max_pids=2), look(3, 50), (Reason.PIDS_LIMIT, 3)),
        # The kernel enforces memory: RSS alone (page cache aside) decides nothing.
        (watched(memory_limit=MIB, kernel=frozenset({"memory"})), look(1, 50), None),
        (watched(memory_limit=MIB, kernel=frozenset({"memory"})), look(1, 0, "memory"), (Reason.MEMORY_LIMIT, 0)),
        (watched(max_pids=8, kernel=frozenset({"pids"})), look(8, 0, "pids"), (Reason.PIDS_LIMIT, 8)),
        (watched(), look(10_000, 10_000), None),
        (watched(max_pids=1), {}, None),  # not reached by the look: judged by the next
    ],
)
def test_verdicts(tree: Watched, found: dict[str, Look], expected) -> None:
    got = [(v.reason, v.found) for v in verdicts([tree], found)]
    assert got == ([] if expected is None else [expected])


def test_the_pids_gate_counts_first_then_once_the_host_handed_out_the_headroom() -> None:
    gate = PidsGate(pid_max=32768)
    assert gate.due(1000)  # nothing counted yet
    gate.counted(headroom=100)
    assert not gate.due(1050)
    assert not gate.due(1099)
    assert gate.due(1100)  # 100 pids since the count: a tree may have grown by that
    gate.counted(headroom=100)
    # Across the wrap of the counter: 32700 -> 30 is 98 pids, then 2 more.
    gate.due(32700)
    gate.counted(headroom=100)
    assert not gate.due(30)
    assert gate.due(32)


def test_the_pids_gate_counts_at_every_look_without_the_counter_and_after_a_reload() -> None:
    gate = PidsGate(pid_max=32768)
    gate.due(10)
    gate.counted(headroom=1000)
    assert gate.due(None) and gate.due(11)  # unreadable, then no previous value
    gate.counted(headroom=1000)
    assert not gate.due(12)
    gate.invalidate()
    assert gate.due(13)
    gate.counted(headroom=0)
    assert gate.due(13)  # a tree at its max_pids: every look counts


def test_the_pids_gate_leaves_out_the_roots_the_daemon_spawned_but_not_those_under_way_at_the_count() -> None:
    gate = PidsGate(pid_max=32768)
    gate.due(1000, spawned=0)
    gate.counted(headroom=100, spawned=0, spawning=0)
    # 400 pids, every one a root of our own, each a tree of its own: no
    # counted tree can have grown.
    assert not gate.due(1400, spawned=400)
    # 100 more from elsewhere (an adapter forking, the host): now one may have.
    assert not gate.due(1499, spawned=400)
    assert gate.due(1500, spawned=400)
    # Two spawns under way at the count may have taken their pids before its
    # reading of the counter: the first two roots finished after it are not
    # left out.
    gate.counted(headroom=100, spawned=400, spawning=2)
    assert not gate.due(1599, spawned=402)
    assert gate.due(1600, spawned=402)
    gate.counted(headroom=100, spawned=402, spawning=0)
    assert not gate.due(1700, spawned=403)  # 99 from elsewhere, 1 root of ours
    assert gate.due(1701, spawned=403)


@pytest.fixture
def shell() -> Iterator[subprocess.Popen[bytes]]:
    """A shell with three sleeping children (four processes), in a process group of its own."""
    popen = subprocess.Popen(["/bin/sh", "-c", "sleep 60 & sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        yield popen
    finally:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()


class World:
    """A registry and the shell's view of its running trees, and the watch over both."""

    def __init__(self, tmp_path, adapters: str, daemon: str = "") -> None:
        self.config = parse_config(f'[daemon]\nstate_dir = "{tmp_path}"\n{daemon}\n{adapters}')
        self.registry = Registry()
        self.instances = SimpleNamespace(running={}, roots_spawned=0, spawns_in_flight=0)
        self.executed: list[object] = []
        self.over_memory: list[str] = []
        self.watch = LimitWatch(
            config=lambda: self.config, registry=self.registry, instances=self.instances, cgroups=None,
            execute=self.executed.extend, stopped_over_memory=self.over_memory.append,
        )

    def add_tree(self, adapter: str, root_pid: int) -> tuple[str, SimpleNamespace]:
        """A running instance of `adapter` whose tree is rooted at `root_pid`."""
        acquired = self.registry.acquire(
            job=f"j{len(self.instances.running)}", adapter=adapter, connection=1, uid=0, now=0.0,
            params={}, detach=False, ttl=None, linger=0.0, max_instances=None,
        )
        instance_id = acquired.instance.id
        self.registry.spawned(instance_id, pid=root_pid, now=0.0)
        root = process.identify(root_pid)
        tree = InstanceTree(instance_id=instance_id, root=root)
        tree.known.add(root)
        running = SimpleNamespace(adapter=self.config.adapters[adapter], root=SimpleNamespace(id=root), tree=tree)
        self.instances.running[instance_id] = running
        return instance_id, running


def adapter(name: str, lines: str) -> str:
    return f'[adapters.{name}]\ncommand = ["/bin/sh"]\n{lines}\n'


async def wait_children(pid: int, count: int) -> None:
    """Until `pid` has `count` children running sleep (past their exec)."""
    while [process.read_cmdline(s.pid) for s in process.scan_processes() if s.ppid == pid] != [["sleep", "60"]] * count:
        await trio.sleep(0.01)


async def test_a_tree_past_its_max_pids_is_ended_with_reason_pids_limit(tmp_path, shell) -> None:
    await wait_children(shell.pid, 3)
    world = World(tmp_path, adapter("tool", "max_pids = 3"))
    instance_id, _ = world.add_tree("tool", shell.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.watch.run)
        with trio.fail_after(10):
            while not world.executed:
                await trio.sleep(WATCH_INTERVAL_S)
        nursery.cancel_scope.cancel()
    assert StopTree(instance_id, Reason.PIDS_LIMIT) in world.executed
    # Never a signal from the watch itself: the stop is the engine's to carry out.
    assert shell.poll() is None


async def test_a_look_teaches_the_tree_its_members(tmp_path, shell) -> None:
    await wait_children(shell.pid, 3)
    world = World(tmp_path, adapter("tool", "max_pids = 8"))
    _, running = world.add_tree("tool", shell.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.watch.run)
        with trio.fail_after(10):
            while world.watch.looks < 1:
                await trio.sleep(WATCH_INTERVAL_S)
        nursery.cancel_scope.cancel()
    assert world.executed == []
    children = {s.pid for s in process.scan_processes() if s.ppid == shell.pid}
    assert {m.pid for m in running.tree.known} == {shell.pid, *children}


async def test_without_limits_the_watch_sleeps_until_a_limited_tree_is_spawned(tmp_path, shell) -> None:
    await wait_children(shell.pid, 3)
    world = World(tmp_path, adapter("free", "max_pids = 0") + adapter("tool", "max_pids = 8"))
    world.add_tree("free", shell.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.watch.run)
        await trio.sleep(WATCH_INTERVAL_S * 4)
        world.watch.wake()  # a spawn of the same unlimited kind
        await trio.sleep(WATCH_INTERVAL_S * 2)
        assert world.watch.looks == 0
        world.add_tree("tool", shell.pid)
        world.watch.wake()
        with trio.fail_after(10):
            while world.watch.looks == 0:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_memory_budget_has_every_tree_watched(tmp_path, shell) -> None:
    await wait_children(shell.pid, 3)
    world = World(tmp_path, adapter("free", "max_pids = 0"), daemon='memory_budget = "1KiB"')
    world.add_tree("free", shell.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.watch.run)
        with trio.fail_after(10):
            while not world.watch.over_budget:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert world.executed == []  # over the budget, nothing is stopped


async def test_a_tree_released_while_the_look_ran_is_not_ended_again(tmp_path, shell) -> None:
    await wait_children(shell.pid, 3)
    world = World(tmp_path, adapter("tool", 'memory_limit = "1KiB"'))
    instance_id, _ = world.add_tree("tool", shell.pid)
    tree = await world.watch._watched(count_pids=True)
    looks = look_at(tree, None)
    assert [v.reason for v in verdicts(tree, looks)] == [Reason.MEMORY_LIMIT]
    lease = next(iter(world.registry.instances[instance_id].leases))
    world.registry.release(lease, connection=1, uid=0, now=0.0)  # stopping now
    await world.watch._act(tree, looks)
    assert world.executed == [] and world.over_memory == []


async def test_a_look_that_gets_no_thread_is_lost_not_the_watch(tmp_path, shell, monkeypatch) -> None:
    # The one stand-in here: a daemon at its thread limit cannot be made on
    # purpose as root (RLIMIT_NPROC does not bind root).
    await wait_children(shell.pid, 3)
    world = World(tmp_path, adapter("tool", "max_pids = 8"))
    world.add_tree("tool", shell.pid)
    real = trio.to_thread.run_sync
    refused: list[bool] = []

    async def first_refused(*args, **kwargs):
        if not refused:
            refused.append(True)
            raise RuntimeError("can't start new thread")
        return await real(*args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", first_refused)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.watch.run)
        with trio.fail_after(10):
            while world.watch.looks == 0:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert refused == [True]


async def test_trees_held_only_to_max_pids_are_not_counted_again_while_the_host_is_quiet(tmp_path, shell) -> None:
    # A headroom larger than this host will hand out in the test: after the
    # first count, no look is due however long the watch runs; a reload
    # makes one due again.
    await wait_children(shell.pid, 3)
    world = World(tmp_path, adapter("tool", "max_pids = 1000000"))
    for _ in range(3):
        world.add_tree("tool", shell.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.watch.run)
        await trio.sleep(WATCH_INTERVAL_S * 6)
        assert (world.watch.looks, world.watch.pids_counts) == (1, 1)
        world.watch.reloaded()
        with trio.fail_after(10):
            while world.watch.pids_counts < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_the_trio_threads_walks_of_many_watched_trees_let_other_tasks_run(tmp_path, shell, monkeypatch) -> None:
    # Every chunk of TREES_PER_LOOK trees in a turn of its own (a budget of
    # nothing): a walk of thousands of trees never holds the thread whole.
    monkeypatch.setattr(stalls, "STEP_BUDGET_S", 0.0)
    await wait_children(shell.pid, 3)
    world = World(tmp_path, adapter("tool", 'memory_limit = "1KiB"\nmax_pids = 2'))
    trees = 5 * limitwatch.TREES_PER_LOOK
    for _ in range(trees):
        world.add_tree("tool", shell.pid)
    steps = 0

    async def probe() -> None:
        nonlocal steps
        while True:
            await trio.lowlevel.checkpoint()
            steps += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        await trio.lowlevel.checkpoint()
        steps = 0
        tree = await world.watch._watched(count_pids=True)
        assert len(tree) == trees and steps >= 4
        looks = {t.instance_id: Look(TreeFigures(pids=4, rss_bytes=MIB)) for t in tree}
        steps = 0
        assert await world.watch._headroom(tree, looks) == 0
        assert steps >= 4
        steps = 0
        await world.watch._act(tree, looks)
        assert steps >= 4
        nursery.cancel_scope.cancel()
    # Every tree was over max_pids: each ended once, as one walk would have.
    assert sorted(a.instance_id for a in world.executed if isinstance(a, StopTree)) == sorted(world.instances.running)


def test_a_looks_records_are_not_for_the_collector_to_walk() -> None:
    # A look at 10,000 trees makes 10,000 of each; tracked, every collection
    # during the look would walk them (and a worker thread's collection holds
    # the GIL the trio thread waits for).
    watched = Watched("i", 1 << 30, 512, True, frozenset({process.ProcessId(1, 2)}), frozenset({"memory"}))
    look = Look(TreeFigures(pids=3, rss_bytes=4096))
    assert not gc.is_tracked(watched) and not gc.is_tracked(look)
