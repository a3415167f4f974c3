"""The clone3 spawner: real children, born where and how the daemon asks.

Each test starts real processes with `clonespawn.spawn` and looks at them from
outside (/proc) or through what they print. Cgroup tests use a throwaway base
(see tests/test_cgroup.py) that is removed whatever the outcome.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from supervisor.procs import clonespawn
from supervisor.procs import process
from supervisor.procs.cgroup import CgroupManager
from tests.procs.test_cgroup import manager  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(clonespawn.load() is None, reason="the clone3 spawner was not built (no C compiler)")


@pytest.fixture
def null() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def run(argv: list[str], *, null: int, env: dict[str, str] | None = None, cwd: str | None = None,
        cgroup_fd: int | None = None, stdin: int | None = None) -> tuple[int, str]:
    """Spawn `argv`, wait for it, and return (exit status, what it wrote to stdout)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        pid, _ = clonespawn.spawn(
            argv, env=dict(os.environ) if env is None else env, cwd=cwd,
            stdio=(null if stdin is None else stdin, write_end, null), cgroup_fd=cgroup_fd,
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as out:
        output = out.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def python(code: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", code]


def no_child_left() -> bool:
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return True


def test_the_child_gets_exactly_the_given_argv_env_cwd_and_stdio(null: int, tmp_path) -> None:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.write(write_end, b"from stdin")
    os.close(write_end)
    code = (
        "import os, sys, json\n"
        "print(json.dumps([sys.argv[1:], dict(os.environ), os.getcwd(), sys.stdin.read()]))\n"
    )
    env = {"ONLY": "this", "PATH": "/usr/bin:/bin"}
    try:
        status, output = run([*python(code), "a b", ""], null=null, env=env, cwd=str(tmp_path), stdin=read_end)
    finally:
        os.close(read_end)
    assert status == 0
    argv, child_env, cwd, stdin = json.loads(output)
    assert argv == ["a b", ""]
    assert {k: v for k, v in child_env.items() if k != "LC_CTYPE"} == env
    assert cwd == str(tmp_path)
    assert stdin == "from stdin"


def test_a_prepared_environment_gives_each_spawn_its_own_values_over_the_shared_ones(null: int, tmp_path) -> None:
    script = tmp_path / "show-env"
    script.write_text("#!/bin/sh\necho \"$SHARED $MINE $OTHER\"\n")
    script.chmod(0o755)
    environment = clonespawn.Environment(
        {"PATH": f"/nonexistent:{tmp_path}", "SHARED": "s", "MINE": "from shared", "LC_ALL": "C"},
        own=("MINE", "OTHER"),
    )
    outputs = []
    for values in (("1", "a"), ("2", "b")):
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            # Looked up in the prepared PATH, as a plain environment's would be.
            pid, _ = clonespawn.spawn(["show-env"], env=environment, env_values=values, cwd=None,
                                      stdio=(null, write_end, null), cgroup_fd=None)
        finally:
            os.close(write_end)
        with os.fdopen(read_end, "rb") as out:
            outputs.append(out.read().decode())
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert outputs == ["s 1 a\n", "s 2 b\n"]


def test_a_prepared_environment_refuses_what_it_cannot_honour(null: int) -> None:
    # Executables are looked up in the shared PATH once; values are for an Environment's own keys.
    with pytest.raises(ValueError, match="PATH"):
        clonespawn.Environment({"PATH": "/bin"}, own=("PATH",))
    with pytest.raises(ValueError, match="plain mapping"):
        clonespawn.spawn(["/bin/true"], env={}, env_values=("x",), cwd=None, stdio=(null, null, null),
                         cgroup_fd=None)
    assert no_child_left()


def test_the_child_starts_clean_new_session_only_stdio_open_default_signals(null: int) -> None:
    # The parent holds an inheritable extra fd, a blocked signal, and Python's
    # SIGPIPE ignore: none of them may reach the child.
    extra = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(extra, True)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        _, fds = run(["/bin/ls", "/proc/self/fd"], null=null)
        _, status_text = run(["/bin/cat", "/proc/self/status"], null=null)
        _, session = run(["/bin/sh", "-c", 'echo "$$ $(cut -d" " -f6 /proc/$$/stat)"'], null=null)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(extra)
    # 0, 1, 2 and the directory ls itself opened.
    assert fds.split() == ["0", "1", "2", "3"]
    status = dict(line.split(":\t", 1) for line in status_text.splitlines())
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1)) == 0
    pid, sid = session.split()
    assert pid == sid


def test_a_child_gets_only_its_stdio_however_many_fds_the_parent_holds_and_the_slots_let_go(null: int) -> None:
    # The child shares the parent's fd table until it takes its own with only
    # the fds below the slots: what lies above them must not reach it, and
    # after the spawn the slots hold nothing of the child's (else the parent
    # would keep a pipe's write end open, and never see its end).
    slots = clonespawn.stdio_slots()
    extras = [os.open(os.devnull, os.O_RDONLY) for _ in range(1500)]
    try:
        for extra in extras:
            os.set_inheritable(extra, True)
        assert max(extras) > slots.keep_below
        _, fds = run(["/bin/ls", "/proc/self/fd"], null=null)
        _, target = run(["/bin/readlink", "/proc/self/fd/1"], null=null)
    finally:
        for extra in extras:
            os.close(extra)
    assert fds.split() == ["0", "1", "2", "3"]
    assert target.startswith("pipe:")
    assert slots.usable and slots.in_use == 0
    for slot in [fd for fds in slots.sets for fd in fds]:
        assert os.readlink(f"/proc/self/fd/{slot}") == os.devnull


def test_without_the_shared_table_a_spawn_still_closes_every_other_fd(null: int, monkeypatch) -> None:
    # What a kernel without CLOSE_RANGE_UNSHARE (< 5.9) gets: the copied table.
    monkeypatch.setattr(clonespawn.stdio_slots(), "usable", False)
    extra = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(extra, True)
    try:
        status, fds = run(["/bin/ls", "/proc/self/fd"], null=null)
    finally:
        os.close(extra)
    assert status == 0 and fds.split() == ["0", "1", "2", "3"]


def test_a_program_is_looked_up_in_the_childs_path_not_the_daemons(null: int, tmp_path) -> None:
    script = tmp_path / "only-here"
    script.write_text("#!/bin/sh\necho found\n")
    script.chmod(0o755)
    status, output = run(["only-here"], null=null, env={"PATH": f"/nonexistent:{tmp_path}"})
    assert (status, output) == (0, "found\n")
    with pytest.raises(FileNotFoundError):
        run(["only-here"], null=null, env={"PATH": "/usr/bin:/bin"})


def test_the_start_time_reported_is_the_one_proc_shows_or_zero(null: int) -> None:
    # Worked out from the clock around clone3: exact when the call stays
    # within one clock tick, 0 (for the caller to read /proc) when it does not.
    pids = []
    try:
        for _ in range(20):
            pids.append(clonespawn.spawn(["/bin/sleep", "30"], env={}, cwd=None, stdio=(null, null, null),
                                         cgroup_fd=None))
        reported = [(pid, start_time) for pid, start_time in pids if start_time != 0]
        assert reported, "every spawn straddled a clock tick"
        for pid, start_time in reported:
            assert process.identify(pid) == process.ProcessId(pid, start_time)
    finally:
        for pid, _ in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


@pytest.mark.parametrize(
    "argv, cwd, error, filename",
    [
        (["/nonexistent/binary"], None, errno.ENOENT, "/nonexistent/binary"),
        (["/bin/true"], "/nonexistent/dir", errno.ENOENT, "/nonexistent/dir"),
        (["/etc/passwd"], None, errno.EACCES, "/etc/passwd"),
        (["/etc"], None, errno.EACCES, "/etc"),
    ],
)
def test_a_failed_spawn_raises_the_step_errno_and_leaves_no_child(null: int, argv, cwd, error, filename) -> None:
    with pytest.raises(OSError) as raised:
        clonespawn.spawn(argv, env=dict(os.environ), cwd=cwd, stdio=(null, null, null), cgroup_fd=None)
    assert not isinstance(raised.value, clonespawn.Unsupported)
    assert (raised.value.errno, raised.value.filename) == (error, filename)
    assert no_child_left()


def test_a_child_is_born_in_the_cgroup_and_so_is_all_it_forks_at_once(null: int, manager: CgroupManager) -> None:  # noqa: F811
    manager.create("born-here")
    cgroup_fd = manager.dir_fd("born-here")
    # The child forks in its first instruction of Python and reports both pids:
    # a join after the fact would miss a process forked this early.
    code = (
        "import os\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    os.read(0, 1)\n"
        "    os._exit(0)\n"
        "cgroups = [[l for l in open(f'/proc/{p}/cgroup').read().splitlines() if l.startswith('0::')][0] for p in (os.getpid(), child)]\n"
        "os.kill(child, 9)\n"
        "os.waitpid(child, 0)\n"
        "print('|'.join(cgroups))\n"
    )
    try:
        status, output = run(python(code), null=null, cgroup_fd=cgroup_fd)
    finally:
        os.close(cgroup_fd)
    assert status == 0
    root_cgroup, child_cgroup = output.strip().split("|")
    assert root_cgroup == child_cgroup
    assert root_cgroup.startswith("0::/") and root_cgroup.endswith(f"/{manager.base.name}/born-here")


def test_a_bad_cgroup_fd_fails_the_spawn_without_a_child(null: int, tmp_path) -> None:
    not_a_cgroup = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as raised:
            clonespawn.spawn(["/bin/true"], env={}, cwd=None, stdio=(null, null, null), cgroup_fd=not_a_cgroup)
    finally:
        os.close(not_a_cgroup)
    assert raised.value.errno == errno.EBADF
    assert no_child_left()


# -- launch: a bounded wait for exec -----------------------------------------------


@contextlib.contextmanager
def frozen_cgroup(manager: CgroupManager, name: str) -> Iterator[tuple[int, Callable[[], None]]]:  # noqa: F811
    """A cgroup whose processes are frozen (cgroup v2 `cgroup.freeze`): a child
    born there does not run a single instruction until `thaw()`. Yields its
    directory fd and `thaw`."""
    path = manager.create(name)
    (path / "cgroup.freeze").write_text("1")
    cgroup_fd = manager.dir_fd(name)

    def thaw() -> None:
        (path / "cgroup.freeze").write_text("0")

    try:
        yield cgroup_fd, thaw
    finally:
        thaw()
        os.close(cgroup_fd)


def settled_within(launched: clonespawn.Launch, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not launched.settle(wait_ns=10_000_000):
        if time.monotonic() > deadline:
            return False
    return True


def test_a_launch_still_pending_after_its_wait_settles_once_the_child_execs(null: int, manager: CgroupManager) -> None:  # noqa: F811
    # Frozen from birth, the child cannot exec: the launch returns after its
    # wait with the child pending. Meanwhile its Environment array and its
    # stdio slots stay its own: a spawn of the same Environment gets a copy,
    # with its own values, and a set of slots of its own.
    environment = clonespawn.Environment({"SHARED": "both", "PATH": os.environ["PATH"]}, own=["OWN"])
    code = "import os; print(os.environ['SHARED'], os.environ['OWN'], os.getcwd())"
    slots = clonespawn.stdio_slots()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    with frozen_cgroup(manager, "frozen") as (cgroup_fd, thaw):
        try:
            began = time.monotonic()
            pid, _, launched = clonespawn.launch(
                python(code), env=environment, env_values=["first"], cwd="/tmp", stdio=(null, write_end, null),
                cgroup_fd=cgroup_fd, wait_ns=20_000_000,
            )
        finally:
            os.close(write_end)
        assert time.monotonic() - began < 5
        assert launched is not None and launched.pid == pid
        assert not launched.settle() and not launched.settle(wait_ns=5_000_000)
        assert slots.in_use == 1
        status, output = run(["/usr/bin/env"], null=null, env=dict(os.environ))
        assert status == 0
        second_read, second_write = os.pipe2(os.O_CLOEXEC)
        try:
            second, _ = clonespawn.spawn(python(code), env=environment, env_values=["second"], cwd=None,
                                         stdio=(null, second_write, null), cgroup_fd=None)
        finally:
            os.close(second_write)
        with os.fdopen(second_read, "rb") as out:
            assert out.read().decode().split()[:2] == ["both", "second"]
        assert os.waitstatus_to_exitcode(os.waitpid(second, 0)[1]) == 0
        thaw()
        assert settled_within(launched)
    assert slots.in_use == 0
    with os.fdopen(read_end, "rb") as out:
        assert out.read().decode().split() == ["both", "first", "/tmp"]
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_a_pending_launch_that_fails_before_exec_raises_at_settle_and_is_reaped(
    null: int, manager: CgroupManager  # noqa: F811
) -> None:
    with frozen_cgroup(manager, "doomed") as (cgroup_fd, thaw):
        pid, _, launched = clonespawn.launch(
            ["/nonexistent/binary"], env={}, cwd=None, stdio=(null, null, null), cgroup_fd=cgroup_fd, wait_ns=1_000_000,
        )
        assert launched is not None and not launched.settle()
        thaw()
        with pytest.raises(FileNotFoundError) as raised:
            settled_within(launched)
    assert raised.value.filename == "/nonexistent/binary"
    assert launched.settled
    assert not os.path.exists(f"/proc/{pid}")
    assert no_child_left()


def test_with_every_set_of_slots_held_a_spawn_copies_the_table_and_closes_the_rest(
    null: int, manager: CgroupManager  # noqa: F811
) -> None:
    slots = clonespawn.stdio_slots()
    with frozen_cgroup(manager, "held") as (cgroup_fd, thaw):
        launches = []
        for _ in range(len(slots.sets)):
            _, _, launched = clonespawn.launch(["/bin/true"], env={}, cwd=None, stdio=(null, null, null),
                                               cgroup_fd=cgroup_fd, wait_ns=0)
            assert launched is not None
            launches.append(launched)
        assert slots.in_use == len(slots.sets)
        extra = os.open(os.devnull, os.O_RDONLY)
        os.set_inheritable(extra, True)
        try:
            status, fds = run(["/bin/ls", "/proc/self/fd"], null=null)
            # A launch too, settled or pending, copies the table.
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            pid, _, unfrozen = clonespawn.launch(["/bin/ls", "/proc/self/fd"], env={}, cwd=None,
                                                 stdio=(null, write_end, null), cgroup_fd=None, wait_ns=1_000_000_000)
            os.close(write_end)
        finally:
            os.close(extra)
        assert unfrozen is None or settled_within(unfrozen)
        with os.fdopen(read_end, "rb") as out:
            assert out.read().decode().split() == ["0", "1", "2", "3"]
        os.waitpid(pid, 0)
        assert status == 0 and fds.split() == ["0", "1", "2", "3"]
        thaw()
        assert all(settled_within(launched) for launched in launches)
    for launched in launches:
        os.waitpid(launched.pid, 0)
    assert slots.in_use == 0
    assert no_child_left()


def test_a_pending_launch_its_caller_dropped_still_execs_what_it_was_given(
    null: int, manager: CgroupManager  # noqa: F811
) -> None:
    # The child reads its argv and environment from memory the Launch keeps:
    # a caller that loses the Launch must not free it under the child (the
    # module keeps every unsettled Launch).
    marker = "M" * 45
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    with frozen_cgroup(manager, "dropped") as (cgroup_fd, thaw):
        try:
            pid, _, launched = clonespawn.launch(["/bin/echo", marker], env={"K": "V" * 45}, cwd=None,
                                                 stdio=(null, write_end, null), cgroup_fd=cgroup_fd, wait_ns=0)
        finally:
            os.close(write_end)
        assert launched is not None
        del launched
        gc.collect()
        # Blocks of the sizes just freed, were they freed, would be reused by these.
        churn = [bytes([0x41 + i % 20]) * 45 for i in range(20000)] + [bytearray(32) for _ in range(20000)]
        thaw()
        [kept] = [pending for pending in clonespawn._unsettled if pending.pid == pid]
        assert settled_within(kept)
    del churn
    with os.fdopen(read_end, "rb") as out:
        assert out.read() == (marker + "\n").encode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert clonespawn.stdio_slots().in_use == 0
