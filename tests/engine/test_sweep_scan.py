"""sweep: finding orphans (`scan`) and reaping them (`reap_candidates`), with real processes.

What counts as proof that a process is the daemon's (the module docstring): a
cgroup of no live instance, descent from the daemon, the daemon's tag in the
environment (deep sweeps only), or a (pid, start time) from the durable record.
Process-table trees run under a stand-in daemon (`tests/standin.py`), a child
subreaper whose pid plays `daemon_pid`; strangers are started by the test
process, so they never descend from it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import trio

from supervisor.engine.staterecord import daemon_key
from supervisor.engine.sweep import Candidate, ScanResult, age_seconds, reap_candidates, scan, scan_table, zombie_orphan
from supervisor.procs import process, subreaper
from supervisor.procs.cgroup import CgroupManager, CgroupUnavailable
from supervisor.procs.process import ProcessId
from supervisor.procs.proctable import ProcessTable
from supervisor.procs.tree import InstanceTree, signal_member
from tests.conftest import PYTHON, TREE, eventually, read_pidfile
from tests.standin import StandIn, start_standin

TREE_ROLES = ("root", "child", "grandchild")

# Ignores SIGTERM, says so on stdout, then sleeps.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(3600)"

# Prints "ready", then the name of every SIGUSR1 it receives. A SIGKILL already
# sent is handled first, so a marker SIGUSR1 answered proves no SIGKILL came.
REPORTER = (
    "import signal\n"
    "signal.signal(signal.SIGUSR1, lambda n, f: print(signal.Signals(n).name, flush=True))\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    signal.pause()\n"
)


@pytest.fixture
def key(tmp_path: Path) -> str:
    """This test's daemon key: no other process on the host carries it."""
    return daemon_key(str(tmp_path))


def tags(key: str, instance: str, *, job: str = "job-9", adapter: str = "tree") -> dict[str, str]:
    return {
        process.INSTANCE_ENV: instance, process.JOB_ENV: job, process.ADAPTER_ENV: adapter, process.DAEMON_ENV: key,
    }


def tree_command(pidfile: Path, *args: str) -> list[str]:
    return [PYTHON, TREE, "--pidfile", str(pidfile), "--no-escapee", *args]


def no_reap(pids: Iterable[int] = ()) -> None:
    """`reap` under the stand-in daemon: it reaps its own children."""


def live_trees(daemon: StandIn, **roots: ProcessId) -> dict[str, tuple[InstanceTree, frozenset[ProcessId]]]:
    return {
        instance: (InstanceTree(instance_id=instance, root=root, daemon_pid=daemon.pid), frozenset())
        for instance, root in roots.items()
    }


def scan_under(daemon: StandIn, key: str, *, trees=None, deep: bool = False, recorded=(),
               table: ProcessTable | None = None) -> ScanResult:
    """A periodic process-table scan: the full one (`scan`), or, given a
    table, the incremental one (`scan_table`) from that table."""
    trees = trees or {}
    if table is not None:
        anchors = frozenset(tree.root for tree, _ in trees.values())
        tracked = {instance: (tree.root, known) for instance, (tree, known) in trees.items()}
        return scan_table(table, anchors=anchors, live=frozenset(trees), measured=trees, tracked=tracked,
                          daemon_pid=daemon.pid)
    return scan(
        trees=trees, live=frozenset(trees), cgroups=None, daemon_pid=daemon.pid, daemon_key=key, deep=deep,
        recorded=recorded,
    )


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start children of the test process; each is killed and reaped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def spawn_ready(spawn, argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], ProcessId]:
    """A child that prints "ready" once set up; returns it and its identity."""
    child = spawn(argv, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
    assert child.stdout.readline() == b"ready\n"
    return child, process.identify(child.pid)


# -- scan, process-table mode --------------------------------------------------------


@pytest.fixture(params=["full", "table"])
def table(request) -> ProcessTable | None:
    """Which periodic process-table scan a test runs: the full scan, or the
    incremental one from an empty table (what a daemon's first sweep has)."""
    return ProcessTable() if request.param == "table" else None


def test_a_tagged_process_of_no_live_instance_is_a_candidate_and_a_live_member_is_not(
    tmp_path: Path, key: str, table: ProcessTable | None
) -> None:
    pidfile = tmp_path / "live"
    with start_standin(
        ([PYTHON, TREE, "--pidfile", str(pidfile)], tags(key, "i-live")),
        (["sleep", "3600"], tags(key, "i-dead")),
        (["sleep", "3600"], {}),
    ) as daemon:
        live = read_pidfile(pidfile)
        assert daemon.adopted(live["escapee"].pid)
        _, orphan, untagged = daemon.children
        result = scan_under(daemon, key, trees=live_trees(daemon, **{"i-live": live["root"]}), table=table)

        by_pid = {c.stat.pid: c for c in result.candidates}
        assert set(by_pid) == {orphan, untagged}
        found = by_pid[orphan]
        assert found.proof == "descendant" and found.stat.ppid == daemon.pid
        assert (found.instance, found.job, found.adapter) == ("i-dead", "job-9", "tree")
        assert found.cmdline == ["sleep", "3600"]
        # Descent from the daemon is proof enough, tag or not.
        assert by_pid[untagged].proof == "descendant" and by_pid[untagged].instance is None
        members = {s.pid for s in result.members["i-live"] if s.state not in process.EXITED_STATES}
        assert members == {m.pid for m in live.values()}
        assert result.scanned >= len(live) + 3 and result.stale_cgroups == []
        if table is not None:
            # The incremental scan hands back what the tree did not know, so
            # that the record holds it should the escapee drop its tag.
            assert set(result.learned["i-live"]) == {m for role, m in live.items() if role != "root"}


ZOMBIE_PARENT = r"""
import os, sys, time
zombie = os.fork()
if zombie == 0:
    os._exit(0)
while open(f"/proc/{zombie}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
    time.sleep(0.001)
with open(sys.argv[1], "w") as f:
    f.write(str(zombie))
time.sleep(3600)
"""


def test_a_zombie_descendant_is_left_to_the_reaper(tmp_path: Path, key: str, table: ProcessTable | None) -> None:
    marker = tmp_path / "zombie"
    with start_standin(([PYTHON, "-c", ZOMBIE_PARENT, str(marker)], tags(key, "i-dead"))) as daemon:
        assert eventually(marker.exists)
        zombie = int(marker.read_text())
        result = scan_under(daemon, key, table=table)
        assert {c.stat.pid for c in result.candidates} == {daemon.children[0]}
        assert process.read_stat(zombie).state == "Z"


def test_the_incremental_scan_reads_again_only_what_is_new_and_finds_a_newcomer(tmp_path: Path, key: str) -> None:
    pidfile, go, forked = tmp_path / "live", tmp_path / "go", tmp_path / "forked"
    # A process of no live instance that forks a newcomer once told to.
    forker = (
        "import os, subprocess, sys, time\n"
        "while not os.path.exists(sys.argv[1]):\n"
        "    time.sleep(0.01)\n"
        "child = subprocess.Popen(['sleep', '3600'])\n"
        "open(sys.argv[2], 'w').write(str(child.pid))\n"
        "child.wait()\n"
    )
    with start_standin(
        ([PYTHON, TREE, "--pidfile", str(pidfile), "--no-escapee"], tags(key, "i-live")),
        ([PYTHON, "-c", forker, str(go), str(forked)], tags(key, "i-gone")),
    ) as daemon:
        live = read_pidfile(pidfile, TREE_ROLES)
        trees = live_trees(daemon, **{"i-live": live["root"]})
        first = scan_under(daemon, key, trees=trees, table=ProcessTable())
        shell = daemon.children[1]
        assert [c.stat.pid for c in first.candidates] == [shell] and 1 in first.table.read
        go.touch()
        assert eventually(lambda: forked.exists() and forked.read_text().strip())
        newcomer = int(forked.read_text())
        second = scan_under(daemon, key, trees=trees, table=first.table)
        assert sorted(c.stat.pid for c in second.candidates) == sorted([shell, newcomer])
        assert newcomer in second.table.read
        # Neither the host nor the tracked tree was read again.
        assert 1 not in second.table.read and live["child"].pid not in second.table.read
        members = {s.pid for s in second.members["i-live"]}
        assert members == {m.pid for m in live.values()}


def test_a_stranger_with_a_copied_daemon_tag_is_a_candidate_of_deep_sweeps_only(key: str, spawn) -> None:
    # The daemon's tag in the environment is proof by itself: a deep sweep
    # reaps whatever carries it, whoever its parent. The instance tag alone, or
    # another daemon's tag, proves nothing.
    copycat = spawn(["sleep", "3600"], env={**os.environ, **tags(key, "i-dead")})
    instance_only = spawn(["sleep", "3600"], env={**os.environ, process.INSTANCE_ENV: "i-dead"})
    other_daemon = spawn(["sleep", "3600"], env={**os.environ, **tags("0123456789abcdef", "i-dead")})
    for child in (copycat, instance_only, other_daemon):
        assert eventually(lambda: process.read_environ_tag(child.pid) == "i-dead")
    with start_standin() as daemon:
        assert scan_under(daemon, key).candidates == []
        deep = scan_under(daemon, key, deep=True)
        assert [(c.stat.pid, c.proof, c.instance) for c in deep.candidates] == [(copycat.pid, "tag", "i-dead")]


def test_a_recorded_process_is_a_candidate_only_while_its_start_time_matches(tmp_path: Path, key: str, spawn) -> None:
    stranger = spawn(["sleep", "3600"])
    recorded = process.identify(stranger.pid)
    pidfile = tmp_path / "live"
    with start_standin((tree_command(pidfile), tags(key, "i-live"))) as daemon:
        live = read_pidfile(pidfile, roles=TREE_ROLES)
        trees = live_trees(daemon, **{"i-live": live["root"]})

        result = scan_under(daemon, key, trees=trees, recorded=[recorded, live["root"]])
        assert [(c.stat.pid, c.proof) for c in result.candidates] == [(recorded.pid, "record")]
        assert result.candidates[0].instance is None
        # Another incarnation of that pid is a stranger.
        reused = ProcessId(recorded.pid, recorded.start_time + 1)
        assert scan_under(daemon, key, trees=trees, recorded=[reused]).candidates == []


def test_a_recorded_zombie_is_not_a_candidate(key: str, spawn) -> None:
    dead = spawn(["true"])
    recorded = process.identify(dead.pid)
    assert eventually(lambda: process.read_stat(dead.pid).state == "Z")
    with start_standin() as daemon:
        assert scan_under(daemon, key, recorded=[recorded]).candidates == []


# -- scan and reap, cgroup mode --------------------------------------------------------


@pytest.fixture
def cgroups() -> Iterator[CgroupManager]:
    try:
        manager = CgroupManager.detect(name=f"test-{secrets.token_hex(6)}")
    except CgroupUnavailable as exc:
        pytest.skip(f"no writable cgroup v2 hierarchy: {exc.reason}")
    try:
        yield manager
    finally:
        for name in manager.instances():
            manager.kill(name)
            eventually(lambda: not manager.populated(name))
            manager.remove(name)
        manager.remove_base()


def spawn_in(cgroups: CgroupManager, instance: str, spawn, argv: list[str], env: dict[str, str] | None = None):
    cgroups.create(instance)
    child, identity = spawn_ready(spawn, argv, env)
    cgroups.add(instance, child.pid)
    return child, identity


def test_a_periodic_cgroup_scan_reads_only_the_instance_cgroups(cgroups: CgroupManager, key: str, spawn) -> None:
    _, live = spawn_in(cgroups, "i-live", spawn, [PYTHON, "-c", STUBBORN])
    _, orphan = spawn_in(cgroups, "i-dead", spawn, [PYTHON, "-c", STUBBORN])
    tree = InstanceTree(instance_id="i-live", root=live, cgroup=cgroups)
    result = scan(
        trees={"i-live": (tree, frozenset())}, live=frozenset({"i-live"}), cgroups=cgroups,
        daemon_pid=os.getpid(), daemon_key=key, deep=False,
    )
    assert [s.pid for s in result.members["i-live"]] == [live.pid]
    assert [(c.stat.pid, c.proof, c.instance) for c in result.candidates] == [(orphan.pid, "cgroup", "i-dead")]
    assert result.stale_cgroups == ["i-dead"]
    # Not one /proc entry beyond the two cgroups' members was read.
    assert result.scanned == 2


async def test_a_cgroup_candidate_that_outlives_its_grace_is_killed_with_its_whole_cgroup(
    cgroups: CgroupManager, key: str, spawn
) -> None:
    _, stubborn = spawn_in(cgroups, "i-dead", spawn, [PYTHON, "-c", STUBBORN])
    result = scan(trees={}, live=frozenset(), cgroups=cgroups, daemon_pid=os.getpid(), daemon_key=key, deep=False)
    # Joined after the scan: not a candidate, but the cgroup kill takes it too.
    late = spawn(["sleep", "3600"])
    cgroups.add("i-dead", late.pid)
    reaper = subreaper.ChildReaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        orphans = await reap_candidates(
            result.candidates, our_pid=os.getpid(), grace=0.1, reap=reaper.reap_children, child_exited=reaper.child_exited,
            kill_cgroup=cgroups.kill,
        )
        nursery.cancel_scope.cancel()
    assert [(o.pid, o.action, o.result) for o in orphans] == [(stubborn.pid, "killed", "gone")]
    assert eventually(lambda: not cgroups.populated("i-dead"))


async def test_killing_a_cgroup_candidate_never_kills_another_instances_cgroup(
    cgroups: CgroupManager, key: str, spawn
) -> None:
    reporter, live = spawn_in(cgroups, "i-live", spawn, [PYTHON, "-c", REPORTER])
    spawn_in(cgroups, "i-dead", spawn, [PYTHON, "-c", STUBBORN], env={process.INSTANCE_ENV: "i-live"})
    tree = InstanceTree(instance_id="i-live", root=live, cgroup=cgroups)
    result = scan(
        trees={"i-live": (tree, frozenset())}, live=frozenset({"i-live"}), cgroups=cgroups,
        daemon_pid=os.getpid(), daemon_key=key, deep=False,
    )
    reaper = subreaper.ChildReaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        await reap_candidates(
            result.candidates, our_pid=os.getpid(), grace=0.1, reap=reaper.reap_children, child_exited=reaper.child_exited,
            kill_cgroup=cgroups.kill,
        )
        nursery.cancel_scope.cancel()
    signal_member(live, signal.SIGUSR1)
    assert reporter.stdout.readline() == b"SIGUSR1\n", "the live instance was killed"


# -- reap_candidates, process-table mode --------------------------------------------------


async def test_orphans_that_obey_sigterm_are_reported_terminated(tmp_path: Path, key: str) -> None:
    pidfile = tmp_path / "orphan"
    with start_standin((tree_command(pidfile), tags(key, "i-dead", job="job-7", adapter="ad"))) as daemon:
        members = read_pidfile(pidfile, roles=TREE_ROLES)
        candidates = scan_under(daemon, key).candidates
        assert {c.stat.process_id for c in candidates} == set(members.values())
        orphans = await reap_candidates(
            candidates, our_pid=daemon.pid, grace=10.0, reap=no_reap, child_exited=trio.sleep_forever
        )
        by_pid = {o.pid: o for o in orphans}
        assert set(by_pid) == {m.pid for m in members.values()}
        for orphan in orphans:
            assert (orphan.action, orphan.result) == ("terminated", "gone")
            assert (orphan.instance, orphan.job, orphan.adapter) == ("i-dead", "job-7", "ad")
            assert orphan.age_s >= 0 and orphan.rss_bytes > 0
        root = by_pid[members["root"].pid]
        assert root.ppid == daemon.pid and root.cmdline == tree_command(pidfile)
        assert all(process.is_gone(m, our_pid=daemon.pid) for m in members.values())


async def test_orphans_that_ignore_sigterm_are_killed_after_the_grace(tmp_path: Path, key: str) -> None:
    pidfile = tmp_path / "orphan"
    with start_standin((tree_command(pidfile, "--ignore-term"), tags(key, "i-dead"))) as daemon:
        members = read_pidfile(pidfile, roles=TREE_ROLES)
        candidates = scan_under(daemon, key).candidates
        started = trio.current_time()
        orphans = await reap_candidates(
            candidates, our_pid=daemon.pid, grace=0.2, reap=no_reap, child_exited=trio.sleep_forever
        )
        assert trio.current_time() - started >= 0.2
        assert {(o.pid, o.action, o.result) for o in orphans} == {(m.pid, "killed", "gone") for m in members.values()}
        assert all(process.is_gone(m, our_pid=daemon.pid) for m in members.values())


def own_child_candidate(child: subprocess.Popen[bytes]) -> Candidate:
    stat = process.read_stat(child.pid)
    return Candidate(stat=stat, cmdline=process.read_cmdline(child.pid), instance=None, job=None, adapter=None, proof="descendant")


async def test_an_orphan_that_is_our_child_is_gone_once_the_reaper_collects_it(spawn) -> None:
    child = spawn(["sleep", "3600"])
    candidate = own_child_candidate(child)
    reaper = subreaper.ChildReaper()
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        orphans = await reap_candidates(
            [candidate], our_pid=os.getpid(), grace=10.0, reap=reaper.reap_children, child_exited=reaper.child_exited
        )
        nursery.cancel_scope.cancel()
    assert [(o.pid, o.ppid, o.action, o.result) for o in orphans] == [(child.pid, os.getpid(), "terminated", "gone")]
    assert (child.pid, -signal.SIGTERM) in reaper.take_adopted()


async def test_an_orphan_left_our_zombie_is_reported_failed(spawn) -> None:
    # Nobody reaps: it died of SIGTERM but is still in the process table.
    child = spawn(["sleep", "3600"])
    orphans = await reap_candidates(
        [own_child_candidate(child)], our_pid=os.getpid(), grace=0.05, reap=no_reap, child_exited=trio.sleep_forever
    )
    assert [(o.action, o.result) for o in orphans] == [("terminated", "failed")]
    assert child.wait(timeout=5) == -signal.SIGTERM


# -- report lines ----------------------------------------------------------------------------


def test_a_reaped_zombie_is_reported_with_what_is_left_of_it() -> None:
    orphan = zombie_orphan(4242, 17)
    assert (orphan.pid, orphan.ppid, orphan.action, orphan.result) == (4242, 17, "reaped_zombie", "gone")
    assert orphan.cmdline == [] and orphan.rss_bytes == 0 and orphan.instance is None


def test_age_seconds_counts_from_the_start_time_and_never_goes_negative() -> None:
    me = process.identify(os.getpid())
    assert age_seconds(me.start_time) > 0
    assert age_seconds(process.uptime_ticks() + 100 * process.CLOCK_TICKS) == 0.0
