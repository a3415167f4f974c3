"""Measuring trees against their limits (`procs/treelimits.py`): real
processes for the looks, plain text for the kernel's event files."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.procs import process, treelimits
from supervisor.procs.cgroup import CgroupManager, CgroupUnavailable
from tests.conftest import eventually
from tests.procs.test_cgroup import remove_base


@pytest.fixture
def sleepers() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A shell with three sleeping children, its own process group; and the
    number of children."""
    shell = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 60 & sleep 60 & sleep 60 & wait"], start_new_session=True
    )
    try:
        # Each child runs sleep, not a forked shell still on its way to exec.
        assert eventually(lambda: [process.read_cmdline(pid) for pid in children_of(shell.pid)] == [["sleep", "60"]] * 3)
        yield shell, 3
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


@pytest.fixture
def cgroups() -> Iterator[CgroupManager]:
    """A cgroup v2 base of this test's own, removed with all it holds."""
    try:
        found = CgroupManager.detect(name=f"test-limits-{os.getpid()}")
    except CgroupUnavailable as exc:
        pytest.skip(f"no writable cgroup v2 hierarchy: {exc.reason}")
    try:
        yield found
    finally:
        remove_base(found)


def children_of(pid: int) -> list[int]:
    return [s.pid for s in process.scan_processes() if s.ppid == pid and s.state not in process.EXITED_STATES]


def test_a_tree_is_its_anchors_and_their_descendants(sleepers) -> None:
    shell, count = sleepers
    assert eventually(lambda: len(children_of(shell.pid)) == count)
    root = process.identify(shell.pid)
    figures = treelimits.measure_descendants([root], limit=None)
    assert figures.pids == count + 1 and not figures.truncated
    assert sorted(s.pid for s in figures.seen) == sorted([shell.pid, *children_of(shell.pid)])
    rss = sum(process.read_stat(pid).rss_bytes for pid in [shell.pid, *children_of(shell.pid)])
    assert figures.rss_bytes > 0 and abs(figures.rss_bytes - rss) < rss // 2


def test_a_look_stops_one_process_past_the_limit(sleepers) -> None:
    shell, count = sleepers
    assert eventually(lambda: len(children_of(shell.pid)) == count)
    figures = treelimits.measure_descendants([process.identify(shell.pid)], limit=2)
    assert figures.pids == 3 and figures.truncated and figures.seen is None
    exact = treelimits.measure_descendants([process.identify(shell.pid)], limit=count + 1)
    assert exact.pids == count + 1 and not exact.truncated


def test_an_anchor_whose_pid_now_names_another_process_is_no_member(sleepers) -> None:
    shell, count = sleepers
    assert eventually(lambda: len(children_of(shell.pid)) == count)
    root = process.identify(shell.pid)
    stranger = process.ProcessId(root.pid, root.start_time + 1)
    figures = treelimits.measure_descendants([stranger], limit=None)
    assert figures.pids == 0 and figures.seen == ()


def test_children_are_read_from_every_thread_of_a_process(sleepers) -> None:
    shell, count = sleepers
    assert eventually(lambda: len(children_of(shell.pid)) == count)
    assert sorted(treelimits.read_children(shell.pid)) == sorted(children_of(shell.pid))
    assert sorted(treelimits.read_children(shell.pid, threads=1)) == sorted(children_of(shell.pid))
    assert treelimits.read_children(2**22 + 1) == []  # past any pid_max: no such process


def test_a_cgroup_look_counts_what_is_listed_and_reads_rss_only_when_asked(sleepers) -> None:
    shell, count = sleepers
    assert eventually(lambda: len(children_of(shell.pid)) == count)
    listed = [shell.pid, *children_of(shell.pid)]
    counted = treelimits.measure_cgroup(listed, limit=8, rss=False)
    assert (counted.pids, counted.rss_bytes, counted.truncated) == (count + 1, 0, False)
    measured = treelimits.measure_cgroup(listed, limit=8, rss=True)
    assert measured.pids == count + 1 and measured.rss_bytes > 0 and not measured.truncated
    # Past max_pids no RSS is read: the tree is stopped for its processes.
    bomb = treelimits.measure_cgroup(listed, limit=2, rss=True)
    assert (bomb.pids, bomb.rss_bytes, bomb.truncated) == (count + 1, 0, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n",
         {"low": 0, "high": 0, "max": 12, "oom": 1, "oom_kill": 1, "oom_group_kill": 1}),
        ("max 0\n", {"max": 0}),
        ("", {}),
        ("max lots\nbroken\nmax.imum 3\n", {"max.imum": 3}),
    ],
)
def test_event_files_parse_to_counters(text: str, expected: dict[str, int]) -> None:
    assert treelimits.parse_events(text) == expected


@pytest.mark.parametrize(
    ("memory", "pids", "verdict"),
    [
        (None, None, None),
        ({"max": 40, "oom": 0, "oom_kill": 0}, {"max": 0}, None),  # reclaimed at memory.max, nothing killed
        ({"oom_kill": 1, "oom_group_kill": 0}, None, "memory"),
        ({"oom_kill": 0, "oom_group_kill": 1}, None, "memory"),
        (None, {"max": 3}, "pids"),
        ({"oom_kill": 0}, {"max": 1}, "pids"),
        ({"oom_group_kill": 2}, {"max": 1}, "memory"),
    ],
)
def test_the_kernel_verdict_follows_the_event_counters(memory, pids, verdict) -> None:
    assert treelimits.kernel_verdict(memory, pids) == verdict


def test_kernel_limits_are_written_only_for_enabled_controllers(tmp_path: Path) -> None:
    for name in ("memory.max", "memory.oom.group", "pids.max"):
        (tmp_path / name).write_text("max\n")
    applied = treelimits.apply_kernel_limits(
        tmp_path, controllers=frozenset({"memory", "pids"}), memory_limit=2**30, max_pids=64
    )
    assert applied == {"memory", "pids"}
    assert (tmp_path / "memory.max").read_text().startswith(str(2**30))
    assert (tmp_path / "memory.oom.group").read_text().startswith("1")
    assert (tmp_path / "pids.max").read_text().startswith("64")
    # No pids controller enabled, and no memory.max to write: nothing enforced.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert treelimits.apply_kernel_limits(
        empty, controllers=frozenset({"memory"}), memory_limit=2**30, max_pids=64
    ) == frozenset()


def test_events_are_read_for_the_enforcing_controllers_only(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("oom 1\noom_kill 1\n")
    (tmp_path / "pids.events").write_text("max 4\n")
    assert treelimits.read_kernel_events(tmp_path, frozenset({"memory"})) == ({"oom": 1, "oom_kill": 1}, None)
    assert treelimits.read_kernel_events(tmp_path, frozenset({"pids"})) == (None, {"max": 4})
    assert treelimits.read_kernel_events(tmp_path / "gone", frozenset({"memory", "pids"})) == (None, None)


def test_no_controller_is_offered_by_a_cgroup_that_has_none(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    assert treelimits.enable_controllers(tmp_path) == frozenset()
    assert (tmp_path / "cgroup.subtree_control").read_text() == ""
    assert treelimits.enable_controllers(tmp_path / "missing") == frozenset()


def test_this_hosts_v2_hierarchy_offers_what_its_root_lists() -> None:
    # The real detection: on a hybrid host v2 has no memory or pids controller
    # and the watch measures; on a pure v2 host they are there to be used.
    root = Path("/sys/fs/cgroup/unified")
    if not (root / "cgroup.controllers").exists():
        root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").exists():
        pytest.skip("no cgroup v2 hierarchy is mounted here")
    offered = set((root / "cgroup.controllers").read_text().split())
    enabled = set((root / "cgroup.subtree_control").read_text().split())
    found = treelimits.enable_controllers(root) if not (offered - enabled) & {"memory", "pids"} else None
    if found is None:
        pytest.skip("enabling controllers at this hierarchy's root would change the host")
    assert found == frozenset(offered & {"memory", "pids"})


def test_a_cgroup_lists_its_members_and_those_of_its_sub_cgroups(cgroups: CgroupManager) -> None:
    manager = cgroups
    path = manager.create("inst")
    sub = path / "worker"
    sleeps = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        manager.add("inst", sleeps[0].pid)
        assert treelimits.cgroup_pids(path) == [sleeps[0].pid]
        sub.mkdir()
        (sub / "cgroup.procs").write_text(str(sleeps[1].pid))
        assert sorted(treelimits.cgroup_pids(path)) == sorted(p.pid for p in sleeps)
        assert treelimits.read_rss(sleeps[1].pid) > 0
    finally:
        for sleep in sleeps:
            sleep.kill()
            sleep.wait()
    assert eventually(lambda: treelimits.cgroup_pids(path) == [])
    assert treelimits.read_rss(sleeps[0].pid) is None
    sub.rmdir()
    manager.remove("inst")
    assert treelimits.cgroup_pids(path) == []


def test_a_look_without_fds_raises_rather_than_reporting_members_gone(sleepers) -> None:
    shell, count = sleepers
    assert eventually(lambda: len(children_of(shell.pid)) == count)
    root = process.identify(shell.pid)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with pytest.raises(OSError) as error:
            treelimits.measure_descendants([root], limit=None)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert error.value.errno == errno.EMFILE
    assert treelimits.measure_descendants([root], limit=None).pids == count + 1
