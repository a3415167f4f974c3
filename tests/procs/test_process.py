"""procs: identity, liveness, environment tags, pid-reuse-safe signals, tree discovery.

Real processes throughout; every process a test starts is reaped before it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from supervisor.procs import process
from supervisor.procs.process import ProcessId, ProcStat
from tests.conftest import eventually

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)


def test_parse_stat_finds_fields_after_the_last_parenthesis() -> None:
    rest = " ".join(["S", "42"] + ["0"] * 17 + ["123456", "0", "10"] + ["0"] * 20)
    stat = process.parse_stat(f"77 (a) b (c) {rest}\n".encode())
    assert stat == ProcStat(pid=77, ppid=42, state="S", start_time=123456, rss_bytes=10 * process.PAGE_SIZE)


def test_parse_stat_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        process.parse_stat(b"12 no parenthesis here")
    with pytest.raises(ValueError):
        process.parse_stat(b"12 (short) S 1 2")


def test_read_stat_of_a_process_whose_name_has_spaces_and_parentheses(spawn, tmp_path) -> None:
    # The kernel names a process after the file it executed.
    odd = tmp_path / "x) y (z"
    odd.symlink_to(shutil.which("sleep"))
    child = spawn([str(odd), "30"])
    assert eventually(lambda: process.read_cmdline(child.pid))
    with open(f"/proc/{child.pid}/comm") as f:
        assert f.read() == "x) y (z\n"
    # (Right after exec the new image may not have its pages yet: wait for some.)
    stat = eventually(lambda: (s := process.read_stat(child.pid)) is not None and s.rss_bytes > 0 and s)
    assert stat, process.read_stat(child.pid)
    assert (stat.pid, stat.ppid) == (child.pid, os.getpid())
    assert stat.state in {"R", "S"}
    assert stat.rss_bytes > 0


def test_identify_matches_the_kernel_start_time(spawn) -> None:
    child = spawn(["sleep", "30"])
    ident = process.identify(child.pid)
    assert ident is not None and ident.pid == child.pid
    ticks = os.sysconf("SC_CLK_TCK")
    created = psutil.boot_time() + ident.start_time / ticks
    assert abs(created - psutil.Process(child.pid).create_time()) < 0.05
    ours = process.identify(os.getpid())
    assert ours is not None and ours.start_time <= ident.start_time


def test_liveness_of_a_running_process(spawn) -> None:
    child = spawn(["sleep", "30"])
    ident = process.identify(child.pid)
    assert process.is_running(ident)
    assert not process.is_gone(ident)
    assert not process.is_gone(ident, our_pid=os.getpid())


def test_liveness_of_an_exited_and_reaped_process(spawn) -> None:
    child = spawn(["true"])
    ident = process.identify(child.pid) or ProcessId(child.pid, 0)
    child.wait(timeout=5)
    assert not process.is_running(ident)
    assert process.is_gone(ident)
    assert process.is_gone(ident, our_pid=os.getpid())
    assert process.read_stat(child.pid) is None or process.read_stat(child.pid).start_time != ident.start_time
    assert process.signal_process(ident, signal.SIGKILL) is False


def test_a_zombie_child_of_ours_is_not_gone_until_we_reap_it(spawn) -> None:
    child = spawn(["sleep", "0"])
    ident = process.identify(child.pid)
    assert ident is not None
    assert eventually(lambda: process.read_stat(child.pid).state == "Z")
    assert not process.is_running(ident)
    assert not process.is_gone(ident, our_pid=os.getpid())
    # For anyone who is not its parent a zombie is simply dead.
    assert process.is_gone(ident)
    assert process.is_gone(ident, our_pid=1)
    assert process.signal_process(ident, signal.SIGTERM) is False
    child.wait(timeout=5)
    assert process.is_gone(ident, our_pid=os.getpid())


def test_a_wrong_start_time_is_never_signalled(spawn) -> None:
    child = spawn(["sleep", "30"])
    real = process.identify(child.pid)
    impostor = ProcessId(real.pid, real.start_time + 1)
    assert not process.is_running(impostor)
    assert process.is_gone(impostor)
    assert process.signal_process(impostor, signal.SIGKILL) is False
    for nonsense in (0, -1):
        assert process.signal_process(ProcessId(nonsense, real.start_time), signal.SIGKILL) is False
    time.sleep(0.05)
    assert child.poll() is None
    assert process.is_running(real)
    assert process.signal_process(real, signal.SIGTERM) is True
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_signal_process_lets_permission_errors_through(spawn) -> None:
    target = spawn(["sleep", "30"])
    ident = process.identify(target.pid)
    # Import first: the interpreter's files may be unreadable once we are nobody.
    script = (
        "import os, signal, sys\n"
        "from supervisor.procs import process\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "target = process.ProcessId(int(sys.argv[1]), int(sys.argv[2]))\n"
        "try:\n"
        "    process.signal_process(target, signal.SIGKILL)\n"
        "except PermissionError:\n"
        "    print('denied')\n"
        "else:\n"
        "    print('sent')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ident.pid), str(ident.start_time)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert out.stdout.strip() == "denied"
    assert process.is_running(ident)


def test_environment_tags(spawn) -> None:
    env = {**os.environ, process.INSTANCE_ENV: "inst-1", process.JOB_ENV: "job 7", process.ADAPTER_ENV: "echo"}
    env_plain = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_SUPERVISOR_")}
    tagged_child = spawn(["sleep", "30"], env=env)
    plain_child = spawn(["sleep", "30"], env=env_plain)
    # Right after exec the kernel may not have set up the new image's arguments yet.
    assert eventually(lambda: process.read_cmdline(tagged_child.pid) and process.read_cmdline(plain_child.pid))
    assert process.read_environ_tag(tagged_child.pid) == "inst-1"
    assert process.read_supervisor_env(tagged_child.pid) == {
        process.INSTANCE_ENV: "inst-1",
        process.JOB_ENV: "job 7",
        process.ADAPTER_ENV: "echo",
    }
    assert process.read_environ_tag(plain_child.pid) is None
    assert process.read_supervisor_env(plain_child.pid) == {}

    # A process that exited since a scan reads as untagged, not as an error:
    # the sweep and the tree scan read the tags of a table that may be stale.
    tagged_child.kill()
    tagged_child.wait(timeout=5)
    assert process.read_environ_tag(tagged_child.pid) is None
    assert process.read_supervisor_env(tagged_child.pid) == {}


def test_read_cmdline(spawn) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "a b", ""]
    python = spawn(argv)
    assert eventually(lambda: process.read_cmdline(python.pid))
    assert process.read_cmdline(python.pid) == argv
    python.kill()
    python.wait(timeout=5)
    assert process.read_cmdline(python.pid) == []


def test_scan_processes_sees_us_and_our_parent() -> None:
    table = {stat.pid: stat for stat in process.scan_processes()}
    assert table[os.getpid()].ppid == os.getppid()
    assert table[os.getpid()].state in {"R", "S"}
    assert 1 in table


def test_descendants_of_a_synthetic_table() -> None:
    def stat(pid: int, ppid: int) -> ProcStat:
        return ProcStat(pid=pid, ppid=ppid, state="S", start_time=pid, rss_bytes=0)

    table = [stat(10, 1), stat(11, 10), stat(12, 10), stat(13, 11), stat(20, 1), stat(21, 20)]
    assert [s.pid for s in process.descendants(10, table)] == [11, 12, 13]
    assert process.descendants(13, table) == []
    assert process.descendants(99, table) == []


def test_descendants_of_a_real_fork_tree() -> None:
    root = subprocess.Popen(["sh", "-c", 'sh -c "sleep 30 & wait" & wait'])
    try:
        found: list[ProcStat] = []

        def tree_complete() -> bool:
            found[:] = process.descendants(root.pid, process.scan_processes())
            return len(found) == 2 and process.read_cmdline(found[1].pid) == ["sleep", "30"]

        assert eventually(tree_complete)
        middle, leaf = found
        assert middle.ppid == root.pid
        assert leaf.ppid == middle.pid
        assert os.getpid() not in {s.pid for s in found}
        assert [s.pid for s in process.descendants(middle.pid, process.scan_processes())] == [leaf.pid]
    finally:
        # Kill leaves first: each shell's `wait` then returns and its parent reaps it,
        # so nothing is left for PID 1 to collect.
        table = process.scan_processes()
        parents = {stat.ppid for stat in table}
        for stat in process.descendants(root.pid, table):
            if stat.pid not in parents:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stat.pid, signal.SIGKILL)
        try:
            root.wait(timeout=5)
        except subprocess.TimeoutExpired:
            root.kill()
            root.wait()
