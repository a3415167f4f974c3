"""tree: who belongs to an instance's tree, and stopping all of it, with real processes.

Process-table mode throughout (`cgroup=None`). Trees run under a stand-in daemon
(`tests/standin.py`), a child subreaper, so escapees stay its descendants as they
do under the real one; its pid is the tree's `daemon_pid`. Strangers are started
by the test process itself, so they never descend from that stand-in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import trio

from supervisor.procs import process, subreaper
from supervisor.procs.process import ProcessId, ProcStat
from supervisor.procs.tree import InstanceTree, StopOutcome, daemon_tags, scan_trees, signal_member, stop_tree, wait_gone
from tests.conftest import PYTHON, TREE, eventually, read_pidfile
from tests.standin import start_standin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Prints the name of every SIGUSR1/SIGUSR2 it receives, one per line, after a
# first "ready" line (the handlers are installed by then). Signals that arrive
# together are handled in signal-number order, so once the line for a marker
# signal is read, an earlier SIGUSR1 would already have been printed.
REPORTER = r"""
import signal
def report(signum, frame):
    print(signal.Signals(signum).name, flush=True)
signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGUSR2, report)
print("ready", flush=True)
while True:
    signal.pause()
"""


def tagged(instance_id: str) -> dict[str, str]:
    return {process.INSTANCE_ENV: instance_id}


def tree_command(pidfile: Path, *args: str) -> list[str]:
    return [PYTHON, TREE, "--pidfile", str(pidfile), *args]


def running_pids(stats: list[ProcStat]) -> set[int]:
    return {s.pid for s in stats if s.state not in process.EXITED_STATES}


def no_reap(pids: Iterable[int] = ()) -> None:
    """`reap` for trees under the stand-in: it reaps its own children."""


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start children of the test process, each in a session of its own; at
    teardown each session (a whole tree) is killed and each child reaped."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def start_reporter(spawn: Callable[..., subprocess.Popen[bytes]]) -> tuple[subprocess.Popen[bytes], ProcessId]:
    reporter = spawn([PYTHON, "-c", REPORTER], stdout=subprocess.PIPE)
    assert reporter.stdout.readline() == b"ready\n"
    identity = process.identify(reporter.pid)
    assert identity is not None
    return reporter, identity


# -- membership ------------------------------------------------------------------


async def test_members_are_the_root_its_descendants_and_tagged_escapees(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with start_standin((tree_command(pidfile), tagged("i-1"))) as daemon:
        members = read_pidfile(pidfile)
        escapee = members["escapee"]
        # The setsid double-fork re-parented the escapee to the subreaper: only
        # its tag ties it to the instance.
        assert daemon.adopted(escapee.pid)
        table = process.scan_processes()
        assert escapee.pid not in {s.pid for s in process.descendants(members["root"].pid, table)}

        tree = InstanceTree(instance_id="i-1", root=members["root"], daemon_pid=daemon.pid)
        found = await tree.members()
        assert running_pids(found) == {m.pid for m in members.values()}
        # Zombies count too (the escapee's first parent, which the root never reaps).
        assert all(s.ppid == members["root"].pid for s in found if s.state in process.EXITED_STATES)
        # ...and are remembered, so a member that later sheds its tag is still known.
        assert set(members.values()) <= tree.known


def test_a_stranger_is_never_a_member_even_with_a_copied_tag(tmp_path: Path, spawn) -> None:
    pidfile = tmp_path / "pids"
    others = [
        (["sleep", "3600"], {}),  # the daemon's descendant, untagged
        (["sleep", "3600"], tagged("i-other")),  # the daemon's descendant, another instance
    ]
    with start_standin((tree_command(pidfile, "--no-escapee"), tagged("i-1")), *others) as daemon:
        members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
        untagged, other_instance = daemon.children[1:]
        # Not descended from the daemon: neither a copied tag nor the same command line
        # makes these members.
        copycat = spawn(["sleep", "3600"], env={**os.environ, **tagged("i-1")})
        lookalike = spawn(tree_command(tmp_path / "lookalike", "--no-escapee"))
        assert eventually(lambda: process.read_environ_tag(copycat.pid) == "i-1")
        read_pidfile(tmp_path / "lookalike", roles=("root", "child", "grandchild"))

        tree = InstanceTree(instance_id="i-1", root=members["root"], daemon_pid=daemon.pid)
        found = {s.pid for s in tree.scan()}
        assert found == {m.pid for m in members.values()}
        assert not found & {untagged, other_instance, copycat.pid, lookalike.pid}


def test_an_untagged_escapee_is_a_member_only_while_known_by_its_start_time(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with start_standin((tree_command(pidfile, "--untagged-escapee"), tagged("i-1"))) as daemon:
        members = read_pidfile(pidfile)
        escapee = members["escapee"]
        # It exec'd `sleep` with an empty environment, and its first parent is
        # gone: nothing betrays it any more.
        assert eventually(lambda: process.read_cmdline(escapee.pid) == ["sleep", "3600"])
        assert daemon.adopted(escapee.pid)
        assert process.read_environ_tag(escapee.pid) is None
        tree = InstanceTree(instance_id="i-1", root=members["root"], daemon_pid=daemon.pid)

        assert escapee.pid not in {s.pid for s in tree.scan()}
        assert escapee.pid in {s.pid for s in tree.scan(frozenset({escapee}))}
        # The same pid with another start time is another process (pid reuse).
        impostor = ProcessId(escapee.pid, escapee.start_time + 1)
        assert escapee.pid not in {s.pid for s in tree.scan(frozenset({impostor}))}


def test_the_process_holding_a_dead_roots_pid_is_not_a_member(tmp_path: Path, spawn) -> None:
    stranger = spawn(["sleep", "3600"])
    reused = process.identify(stranger.pid)
    # The root was another incarnation of this pid.
    tree = InstanceTree(instance_id="i-1", root=ProcessId(reused.pid, reused.start_time - 1))
    assert tree.scan() == []


def test_the_children_of_a_stranger_that_reused_the_roots_pid_are_not_members(tmp_path: Path, spawn) -> None:
    pidfile = tmp_path / "pids"
    spawn(tree_command(pidfile, "--no-escapee"))
    stranger = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    root = stranger["root"]
    tree = InstanceTree(instance_id="i-1", root=ProcessId(root.pid, root.start_time - 1))
    assert tree.scan() == []


def test_remember_forgets_members_a_later_scan_no_longer_finds() -> None:
    def stat(pid: int, start_time: int) -> ProcStat:
        return ProcStat(pid=pid, ppid=1, state="S", start_time=start_time, rss_bytes=0)

    tree = InstanceTree(instance_id="i-1", root=ProcessId(10, 100), daemon_pid=1)
    tree.remember([stat(10, 100), stat(11, 110)])
    assert tree.known == {ProcessId(10, 100), ProcessId(11, 110)}
    snapshot = frozenset(tree.known)
    # Meanwhile another scan added 12: a scan made from the older snapshot must
    # not forget what it never knew about.
    tree.remember([stat(12, 120)])
    tree.remember([stat(10, 100)], snapshot)
    assert tree.known == {ProcessId(10, 100), ProcessId(12, 120)}


def test_scan_trees_matches_many_trees_against_one_table(tmp_path: Path) -> None:
    assert scan_trees({}) == {}
    with start_standin(
        (tree_command(tmp_path / "a"), tagged("i-a")),
        (tree_command(tmp_path / "b"), tagged("i-b")),
    ) as daemon:
        members = {name: read_pidfile(tmp_path / name) for name in ("a", "b")}
        assert all(daemon.adopted(found["escapee"].pid) for found in members.values())
        trees = {
            f"i-{name}": (InstanceTree(instance_id=f"i-{name}", root=found["root"], daemon_pid=daemon.pid), frozenset())
            for name, found in members.items()
        }
        scanned = scan_trees(trees)
        assert set(scanned) == {"i-a", "i-b"}
        for name, found in members.items():
            assert running_pids(scanned[f"i-{name}"]) == {m.pid for m in found.values()}


def test_daemon_tags_reads_the_tag_of_every_descendant_and_nothing_else(tmp_path: Path, spawn) -> None:
    pidfile = tmp_path / "pids"
    with start_standin((tree_command(pidfile), tagged("i-1")), (["sleep", "3600"], {})) as daemon:
        members = read_pidfile(pidfile)
        untagged = daemon.children[1]
        stranger = spawn(["sleep", "3600"], env={**os.environ, **tagged("i-1")})
        assert eventually(lambda: process.read_environ_tag(stranger.pid) == "i-1")
        tags = daemon_tags(daemon.pid, process.scan_processes())
        assert all(tags[m.pid] == "i-1" for m in members.values())
        assert tags[untagged] is None
        assert stranger.pid not in tags and daemon.pid not in tags


# -- signals -----------------------------------------------------------------------


def test_signal_member_refuses_an_identity_whose_start_time_does_not_match(spawn) -> None:
    reporter, real = start_reporter(spawn)
    # Another incarnation of the same pid (pid reuse): not signalled.
    assert signal_member(ProcessId(real.pid, real.start_time + 1), signal.SIGUSR1) is False
    assert signal_member(ProcessId(real.pid, real.start_time - 1), signal.SIGKILL) is False
    assert signal_member(real, signal.SIGUSR2) is True
    # Had the SIGUSR1 been delivered it would be printed before the marker.
    assert reporter.stdout.readline() == b"SIGUSR2\n"
    assert process.is_running(real)


def test_signal_member_refuses_a_zombie_and_a_nonsense_pid(spawn) -> None:
    child = spawn(["true"])
    identity = process.identify(child.pid)
    assert identity is not None
    assert eventually(lambda: process.read_stat(child.pid).state == "Z")
    assert signal_member(identity, signal.SIGTERM) is False
    assert signal_member(ProcessId(0, identity.start_time), signal.SIGTERM) is False
    assert signal_member(ProcessId(-1, identity.start_time), signal.SIGTERM) is False


def test_a_signal_we_may_not_send_is_logged_and_counted_as_not_delivered(spawn) -> None:
    target = spawn(["sleep", "3600"])
    identity = process.identify(target.pid)
    # Import first: the interpreter's files may be unreadable once we are nobody.
    script = (
        "import os, signal, sys\n"
        "from supervisor.procs import process, tree\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "member = process.ProcessId(int(sys.argv[1]), int(sys.argv[2]))\n"
        "print('delivered' if tree.signal_member(member, signal.SIGKILL) else 'refused', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(identity.pid), str(identity.start_time)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[-1] == "refused"
    assert any("process.signal_failed" in line and str(identity.pid) in line for line in lines)
    assert process.is_running(identity)


# -- waiting -------------------------------------------------------------------------


async def test_wait_gone_holds_a_zombie_child_of_ours_until_it_is_reaped(spawn) -> None:
    child = spawn(["true"])
    identity = process.identify(child.pid)
    assert eventually(lambda: process.read_stat(child.pid).state == "Z")
    tracked = {identity}
    me = os.getpid()
    assert await wait_gone(tracked, our_pid=me, timeout=0.05, reap=no_reap, child_exited=trio.sleep_forever) is False
    # For anyone else a zombie is dead.
    assert await wait_gone(tracked, our_pid=1, timeout=5, reap=no_reap, child_exited=trio.sleep_forever) is True

    def reap(pids: Iterable[int]) -> None:
        assert list(pids) == [child.pid]
        subreaper.reap_pid(child.pid)

    assert await wait_gone(tracked, our_pid=me, timeout=5, reap=reap, child_exited=trio.sleep_forever) is True
    assert process.read_stat(child.pid) is None


async def test_wait_gone_reaps_only_when_a_member_is_an_exited_child_of_ours(spawn) -> None:
    # A reap walks every child of the daemon in the kernel: a stop waiting on
    # a live member must not call it at every look (thousands of stops at a
    # shutdown each did, every 25 ms), only once a member is a zombie child.
    child = spawn(["sleep", "0.3"])
    tracked = {process.identify(child.pid)}
    reaps = 0

    def reap(pids: Iterable[int]) -> None:
        nonlocal reaps
        reaps += 1
        assert list(pids) == [child.pid]  # the member, by pid: never a walk of every child
        subreaper.reap_pid(child.pid)

    me = os.getpid()
    assert await wait_gone(tracked, our_pid=me, timeout=5, reap=reap, child_exited=trio.sleep_forever) is True
    assert reaps == 1, f"{reaps} reaps while the member ran"
    # Gone already: nothing to reap.
    reaps = 0
    assert await wait_gone(tracked, our_pid=me, timeout=5, reap=reap, child_exited=trio.sleep_forever) is True
    assert reaps == 0


async def test_wait_gone_rescans_once_more_before_declaring_a_tree_gone(spawn) -> None:
    # Everything tracked is gone, but the rescan finds a newcomer (a member that
    # forked just before dying): not gone until the newcomer is.
    newcomer = spawn(["sleep", "3600"])
    newcomer_id = process.identify(newcomer.pid)
    tracked: set[ProcessId] = set()
    rescans = 0

    async def rescan() -> None:
        nonlocal rescans
        rescans += 1
        tracked.add(newcomer_id)

    me = os.getpid()
    gone = await wait_gone(tracked, our_pid=me, timeout=0.1, reap=no_reap, child_exited=trio.sleep_forever, rescan=rescan, rescan_interval=60)
    assert gone is False and rescans == 1
    newcomer.kill()
    newcomer.wait()
    gone = await wait_gone(tracked, our_pid=me, timeout=5, reap=no_reap, child_exited=trio.sleep_forever, rescan=rescan, rescan_interval=60)
    assert gone is True


# -- stopping ------------------------------------------------------------------------


async def test_stop_tree_stops_every_member_with_the_stop_signal(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with start_standin((tree_command(pidfile), tagged("i-1"))) as daemon:
        members = read_pidfile(pidfile)
        # The escapee's first parent is a member too, but a zombie once the
        # escapee is adopted: it is not signalled.
        assert daemon.adopted(members["escapee"].pid)
        tree = InstanceTree(instance_id="i-1", root=members["root"], daemon_pid=daemon.pid)
        started = trio.current_time()
        outcome = await stop_tree(
            tree, stop_signal=signal.SIGTERM, stop_timeout=10.0, reap=no_reap, child_exited=trio.sleep_forever
        )
        # SIGTERM ended them: no waiting out the grace, nothing killed.
        assert trio.current_time() - started < 10.0
        assert sorted(outcome.signalled, key=lambda m: m.pid) == sorted(members.values(), key=lambda m: m.pid)
        assert outcome.killed == [] and outcome.survivors == [] and outcome.clean
        assert all(process.is_gone(m, our_pid=daemon.pid) for m in members.values())


async def test_a_tree_that_ignores_the_stop_signal_is_killed_after_stop_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    stop_timeout = 0.3
    with start_standin((tree_command(pidfile, "--ignore-term"), tagged("i-1"))) as daemon:
        members = read_pidfile(pidfile)
        tree = InstanceTree(instance_id="i-1", root=members["root"], daemon_pid=daemon.pid)
        started = trio.current_time()
        outcome = await stop_tree(
            tree, stop_signal=signal.SIGTERM, stop_timeout=stop_timeout, reap=no_reap, child_exited=trio.sleep_forever
        )
        # Every member got SIGTERM, ignored it, and was killed only once the grace ran out.
        assert trio.current_time() - started >= stop_timeout
        assert set(members.values()) <= set(outcome.signalled)
        assert set(members.values()) <= set(outcome.killed)
        assert outcome.survivors == [] and outcome.clean
        assert all(process.is_gone(m, our_pid=daemon.pid) for m in members.values())


NEWCOMER_ROOT = r"""
import os, signal, sys, time
pidfile = sys.argv[1]
def record(role, pid):
    with open(pidfile, "a") as f:
        f.write(f"{role} {pid}\n")
def on_term(signum, frame):
    # Fork a newcomer that ignores SIGTERM (inherited before the fork), then go.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    newcomer = os.fork()
    if newcomer == 0:
        while True:
            time.sleep(3600)
    record("newcomer", newcomer)
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
record("root", os.getpid())
while True:
    time.sleep(3600)
"""


async def test_stop_tree_catches_a_process_forked_while_the_tree_dies(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    with start_standin(([PYTHON, "-c", NEWCOMER_ROOT, str(pidfile)], tagged("i-1"))) as daemon:
        root = read_pidfile(pidfile, roles=("root",))["root"]
        tree = InstanceTree(instance_id="i-1", root=root, daemon_pid=daemon.pid)
        outcome = await stop_tree(
            tree, stop_signal=signal.SIGTERM, stop_timeout=0.3, reap=no_reap, child_exited=trio.sleep_forever
        )
        newcomer = int(pidfile.read_text().split("newcomer ")[1].split()[0])
        assert root in outcome.signalled
        # Found by a rescan while the root died, and SIGKILLed since it ignores SIGTERM.
        assert newcomer in {m.pid for m in outcome.killed}
        assert outcome.survivors == [] and outcome.clean
        assert process.read_stat(newcomer) is None or process.read_stat(newcomer).state in process.EXITED_STATES


WAITING_ROOT = r"""
import os, signal, sys, time
pidfile = sys.argv[1]
def record(role, pid):
    with open(pidfile, "a") as f:
        f.write(f"{role} {pid}\n")
def on_term(signum, frame):
    # Fork a newcomer and live on until it is gone: only a stop that finds
    # the newcomer during the grace ends this tree before the grace runs out.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    newcomer = os.fork()
    if newcomer == 0:
        while True:
            time.sleep(3600)
    record("newcomer", newcomer)
    os.waitpid(newcomer, 0)
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
record("root", os.getpid())
while True:
    time.sleep(3600)
"""


async def test_a_process_forked_during_the_grace_gets_the_stop_signal_too(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    stop_timeout = 10.0
    with start_standin(([PYTHON, "-c", WAITING_ROOT, str(pidfile)], tagged("i-1"))) as daemon:
        root = read_pidfile(pidfile, roles=("root",))["root"]
        tree = InstanceTree(instance_id="i-1", root=root, daemon_pid=daemon.pid)
        started = trio.current_time()
        outcome = await stop_tree(
            tree, stop_signal=signal.SIGTERM, stop_timeout=stop_timeout, reap=no_reap, child_exited=trio.sleep_forever
        )
        newcomer = int(pidfile.read_text().split("newcomer ")[1].split()[0])
        assert trio.current_time() - started < stop_timeout
        assert sorted(m.pid for m in outcome.signalled) == sorted([root.pid, newcomer])
        assert outcome.killed == [] and outcome.clean


async def test_stop_tree_with_the_daemons_child_reaper(tmp_path: Path, spawn) -> None:
    # As the daemon calls it: the root is our own child, the real ChildReaper
    # collects it and tells whoever watches the root.
    pidfile = tmp_path / "pids"
    root_proc = spawn(tree_command(pidfile, "--no-escapee"), env={**os.environ, **tagged("i-1")})
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    reaper = subreaper.ChildReaper()
    exits: list[int] = []
    reaper.watch_root(root_proc.pid, exits.append, spawned_after=float("-inf"))
    tree = InstanceTree(instance_id="i-1", root=members["root"])
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        outcome = await stop_tree(
            tree, stop_signal=signal.SIGTERM, stop_timeout=5.0, reap=reaper.reap_children, child_exited=reaper.child_exited
        )
        nursery.cancel_scope.cancel()
    assert outcome.clean and outcome.killed == []
    assert sorted(outcome.signalled, key=lambda m: m.pid) == sorted(members.values(), key=lambda m: m.pid)
    assert exits == [-signal.SIGTERM]
    assert process.is_gone(members["root"], our_pid=os.getpid())  # reaped, not left a zombie


async def test_a_zombie_child_nobody_reaps_is_reported_as_a_survivor(tmp_path: Path, spawn) -> None:
    # `reap` that never reaps: the root dies but stays our zombie, so the stop
    # is not clean and says who is left.
    pidfile = tmp_path / "pids"
    root_proc = spawn(tree_command(pidfile, "--no-escapee"), env={**os.environ, **tagged("i-1")})
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    tree = InstanceTree(instance_id="i-1", root=members["root"])
    outcome = await stop_tree(
        tree, stop_signal=signal.SIGTERM, stop_timeout=0.05, reap=no_reap, child_exited=trio.sleep_forever
    )
    assert outcome.survivors == [members["root"]] and not outcome.clean
    assert process.read_stat(root_proc.pid).state == "Z"
    assert root_proc.wait(timeout=5) == -signal.SIGTERM


def test_a_stop_outcome_is_clean_only_without_survivors() -> None:
    member = ProcessId(10, 100)
    assert StopOutcome().clean
    assert StopOutcome(signalled=[member], killed=[member]).clean
    assert not StopOutcome(signalled=[member], survivors=[member]).clean
