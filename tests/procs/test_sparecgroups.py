"""Spare instance cgroups: made ahead, handed out oldest first, never mistaken
for stale ones, gone at shutdown. Real cgroups under a throwaway base."""

from __future__ import annotations

import itertools
import json
import os
import socket
from pathlib import Path

import trio

from supervisor.procs.cgroup import CgroupManager
from supervisor.procs.sparecgroups import CLAIMABLE, SPARES, SpareCgroups
from tests.conftest import eventually, read_pidfile, tree_adapter
from tests.procs.test_cgroup import manager  # noqa: F401  (fixture)


async def ready_spares(manager: CgroupManager, count: int, nursery: trio.Nursery) -> SpareCgroups:  # noqa: F811
    """Spares named spare0, spare1, ..., running in `nursery`, once `count` are ready."""
    ids = (f"spare{n}" for n in itertools.count())
    spares = SpareCgroups(manager, lambda: next(ids), spares=count)
    nursery.start_soon(spares.run)
    with trio.fail_after(5):
        while len(spares.names()) < count:
            await trio.sleep(0.01)
    return spares


async def test_spares_are_kept_topped_up_handed_out_oldest_first_and_removed(manager: CgroupManager) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        spares = await ready_spares(manager, 3, nursery)
        assert spares.names() == {"spare0", "spare1", "spare2"}
        assert set(manager.instances()) == {"spare0", "spare1", "spare2"}
        assert spares.take() == "spare0"
        with trio.fail_after(5):
            while len(spares.names()) < 3:
                await trio.sleep(0.01)
        assert spares.names() == {"spare1", "spare2", "spare3"}
        # A taken spare is the caller's: close() leaves it alone.
        spares.close()
        nursery.cancel_scope.cancel()
    assert manager.instances() == ["spare0"]
    assert spares.take() is None


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_a_taken_spare_hands_over_its_open_directory_once_and_no_fd_is_left(manager: CgroupManager) -> None:  # noqa: F811
    before = open_fds()
    async with trio.open_nursery() as nursery:
        spares = await ready_spares(manager, 2, nursery)
        name = spares.take()
        assert name == "spare0"
        fd = spares.claim(name)
        assert fd is not None
        try:
            assert os.path.samestat(os.fstat(fd), os.stat(manager.base / name))
        finally:
            os.close(fd)
        assert spares.claim(name) is None
        assert spares.claim("never-a-spare") is None
        # Taken and never claimed (an instance released before its spawn): only
        # the newest CLAIMABLE fds are kept, the older ones are closed.
        taken = []
        for _ in range(CLAIMABLE + 3):
            with trio.fail_after(5):
                while not spares.names():
                    await trio.sleep(0.01)
            taken.append(spares.take())
        assert [spares.claim(n) for n in taken[:3]] == [None, None, None]
        spares.close()
        nursery.cancel_scope.cancel()
    for name in [*taken, "spare0"]:
        manager.remove(name)
    assert open_fds() == before


def test_a_cold_acquire_takes_a_spare_cgroup_and_sweeps_leave_spares_alone(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(tree_adapter("tree", pidfile=tmp_path / "pids"), cgroup="auto")
    client = daemon.client()
    base = client.call("status")["daemon"]["cgroup_base"]

    def cgroups() -> set[str]:
        return {entry.name for entry in os.scandir(base) if entry.is_dir()}

    assert eventually(lambda: len(cgroups()) == SPARES)
    spares = cgroups()
    lease = client.call("acquire", {"job": "j", "adapter": "tree"})
    assert lease["instance"] in spares
    for deep in (False, True):
        report = client.call("sweep", {"deep": deep})
        assert report["orphans"] == []
    # The spares not taken are still there, and one more was made.
    assert eventually(lambda: cgroups() > spares)
    assert len(cgroups()) == SPARES + 1
    client.call("release", {"lease": lease["lease"]})
    daemon.stop()
    assert not os.path.exists(base)



def test_an_instance_released_before_its_spawn_leaves_no_cgroup(start_daemon, tmp_path: Path) -> None:
    # The first instance ignores SIGTERM, so after its release it is stopping
    # for stop_timeout. A second acquire of the same pair makes an instance,
    # named after a spare cgroup, that waits for it; released (release_job)
    # before it ever spawned, its cgroup must go with it.
    adapter = tree_adapter("slow", pidfile=tmp_path / "pids", args=("--ignore-term",), stop_timeout=3.0)
    daemon = start_daemon(adapter, cgroup="auto")
    client = daemon.client()
    base = client.call("status")["daemon"]["cgroup_base"]

    def cgroups() -> set[str]:
        return {entry.name for entry in os.scandir(base) if entry.is_dir()}

    def waiting_instance() -> str | None:
        rows = client.call("status", {"job": "j"})["instances"]
        starting = [row["instance"] for row in rows if row["state"] == "starting"]
        return starting[0] if starting else None

    first = client.call("acquire", {"job": "j", "adapter": "slow"})
    read_pidfile(tmp_path / "pids")  # up, and ignoring SIGTERM
    client.call("release", {"lease": first["lease"]})
    waiter = socket.socket(socket.AF_UNIX)
    waiter.connect(daemon.socket)
    try:
        waiter.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "acquire", "params": {"job": "j", "adapter": "slow"}}\n')
        assert eventually(lambda: waiting_instance() is not None)
        unspawned = waiting_instance()
        assert unspawned in cgroups()  # named after a spare, whose cgroup exists
        client.call("release_job", {"job": "j"})
        answer = json.loads(waiter.makefile("rb").readline())
        assert answer["error"]["code"] == 1002  # released before its adapter started
        assert unspawned not in cgroups()
    finally:
        waiter.close()
    client.close()
    daemon.stop()
    assert not os.path.exists(base)
