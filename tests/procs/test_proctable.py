"""proctable: the process table kept between looks, with real processes.

The test process plays the daemon (`daemon_pid`): its children are "ours",
and every other process on the host (pid 1 among them) is a stranger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import trio

from supervisor.procs import process, proctable
from supervisor.procs.proctable import ProcessTable, TableScanner, refresh

SLEEP = ["/bin/sleep", "600"]


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], *, tag: str | None = None) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if tag is not None:
            env[process.INSTANCE_ENV] = tag
        # A group of its own: the cleanup kills its children too (a shell's
        # `sleep 600 &` would outlive the shell otherwise).
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, process_group=0)
        started.append(proc)
        running(proc.pid, argv[0])
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def running(pid: int, program: str) -> None:
    """Wait until `pid` runs `program` (past its exec: a look in between may
    read a process with no pages and an environment in flux)."""
    name = os.path.basename(program)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        cmdline = process.read_cmdline(pid)
        stat = process.read_stat(pid)
        if cmdline and os.path.basename(cmdline[0]) == name and stat is not None and stat.rss_bytes > 0:
            return
        time.sleep(0.002)
    raise AssertionError(f"pid {pid} never ran {program}")


def with_child(spawn, tag: str | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """A shell (of ours) with a sleeping child; returns it and the child's pid."""
    shell = spawn(["/bin/sh", "-c", "sleep 600 & echo $!; wait"], tag=tag)
    child = int(shell.stdout.readline())
    running(child, "sleep")
    return shell, child


def test_ours_are_the_daemons_descendants_with_their_tags_and_strangers_are_not(spawn) -> None:
    shell, grandchild = with_child(spawn, tag="i-a")
    untagged = spawn(SLEEP)
    table = refresh(ProcessTable(), daemon_pid=os.getpid())
    assert {shell.pid, grandchild, untagged.pid} <= table.ours
    assert 1 not in table.ours and os.getpid() not in table.ours
    assert table.tags[shell.pid] == table.tags[grandchild] == "i-a"
    assert untagged.pid not in table.tags
    root = process.identify(shell.pid)
    assert {s.pid for s in table.members(root, (), "i-a")} == {shell.pid, grandchild}
    # Known by tag alone, a member is found with its descendants.
    assert {s.pid for s in table.members(process.ProcessId(1, -1), (), "i-a")} == {shell.pid, grandchild}
    assert [s.pid for s in table.members(process.identify(untagged.pid), (), "i-b")] == [untagged.pid]


def test_a_second_look_reads_only_what_is_new(spawn) -> None:
    # pid_max is 32768 on some hosts and a test suite goes through pids fast:
    # if the counter wraps between the two looks (then the second lists /proc,
    # as it must), look again from the start.
    for _ in range(3):
        first = refresh(ProcessTable(), daemon_pid=os.getpid())
        assert 1 in first.read and first.stats[1].start_time == process.identify(1).start_time
        late = spawn(SLEEP, tag="i-late")
        second = refresh(first, daemon_pid=os.getpid())
        if first.last_pid is not None and second.last_pid is not None and second.last_pid >= first.last_pid:
            break
    assert late.pid in second.read and late.pid in second.ours and second.tags[late.pid] == "i-late"
    # Everything else read again is a pid handed out since the first look
    # (new, or maybe reused): never a process the first look already knew
    # and the counter did not pass.
    assert first.last_pid is not None and second.last_pid is not None
    for pid in second.read:
        assert pid not in first.stats or first.last_pid < pid <= second.last_pid
    assert 1 not in second.read
    # That look did not even list /proc: it probed the pids handed out since.
    assert second.unlisted_looks == 1
    assert set(second.read) <= set(range(first.last_pid + 1, second.last_pid + 1))
    gone = spawn(SLEEP)
    table = refresh(second, daemon_pid=os.getpid())
    assert gone.pid in table.ours
    gone.kill()
    gone.wait()
    # A process that exited is forgotten by the next look that lists /proc:
    # one in LIST_EVERY.
    for _ in range(proctable.LIST_EVERY):
        table = refresh(table, daemon_pid=os.getpid())
        if table.unlisted_looks == 0:
            break
    assert table.unlisted_looks == 0
    assert gone.pid not in table.stats and gone.pid not in table.ours


def test_a_pid_reused_since_the_last_look_is_read_again(spawn) -> None:
    # A stranger's pid, once freed, handed to a new child of ours: the table
    # must see a new process there, of ours, not the stranger it knew.
    try:
        with open(proctable.NS_LAST_PID, "r+b"):
            pass
    except OSError:
        pytest.skip("ns_last_pid is not writable here (needs CAP_SYS_ADMIN)")
    for _ in range(5):
        stranger = subprocess.Popen(["/bin/sh", "-c", "sleep 600 & echo $!"], stdout=subprocess.PIPE)
        pid = int(stranger.stdout.readline())
        stranger.wait()  # the sleep is re-parented away from us: a stranger
        subprocess.run(["/bin/true"])  # the counter moves on past the stranger
        table = refresh(ProcessTable(), daemon_pid=os.getpid())
        assert pid in table.stats and pid not in table.ours
        os.kill(pid, 9)
        assert eventually_gone(pid)
        # The counter comes round to the stranger's pid again (as it does
        # after a wrap; written here instead of forking pid_max processes).
        with open(proctable.NS_LAST_PID, "w") as counter:
            counter.write(str(pid - 1))
        ours = spawn(SLEEP, tag="i-reuse")
        if ours.pid != pid:
            continue  # another process on the host took the pid first; try again
        after = refresh(table, daemon_pid=os.getpid())
        assert pid in after.read and pid in after.ours and after.tags[pid] == "i-reuse"
        assert after.stats[pid].start_time == process.identify(pid).start_time
        return
    pytest.skip("the host kept taking the freed pid first")


def eventually_gone(pid: int, timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_an_anchor_and_its_descendants_are_ours_without_descending_from_the_daemon(spawn) -> None:
    # An adopted tree's root: not the daemon's child, but known to be ours.
    shell, grandchild = with_child(spawn)
    anchors = frozenset({process.identify(shell.pid)})
    table = refresh(ProcessTable(), daemon_pid=1, anchors=anchors)
    assert {shell.pid, grandchild} <= table.ours


def test_reread_gives_fresh_figures_of_known_processes(spawn) -> None:
    child = spawn([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"])
    child.stdout.readline()
    table = refresh(ProcessTable(), daemon_pid=os.getpid())
    assert child.pid in table.ours
    same = refresh(table, daemon_pid=os.getpid(), reread=[child.pid])
    assert child.pid in same.read and same.stats[child.pid].start_time == table.stats[child.pid].start_time


async def test_one_refresh_serves_every_caller_waiting_at_once(spawn, monkeypatch) -> None:
    looks: list[int] = []
    real_refresh = proctable.refresh

    def counted(*args, **kwargs):
        looks.append(1)
        return real_refresh(*args, **kwargs)

    monkeypatch.setattr(proctable, "refresh", counted)
    child = spawn(SLEEP)
    async with trio.open_nursery() as nursery:
        scanner = TableScanner(os.getpid(), frozenset)
        scanner.attach(nursery)
        tables: list[ProcessTable] = []

        async def ask() -> None:
            tables.append(await scanner.refreshed())

        for _ in range(50):
            nursery.start_soon(ask)
    assert len(tables) == 50 and len(looks) == 1
    assert all(table is tables[0] for table in tables) and child.pid in tables[0].ours
    # A caller asking after that refresh gets a new one.
    async with trio.open_nursery() as nursery:
        scanner.attach(nursery)
        later = await scanner.refreshed()
    assert later is not tables[0] and len(looks) == 2
