"""Spawning a root: environment tags, session, spawn errors, its stderr pipe."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time

import pytest
import trio

from supervisor.procs import clonespawn
from supervisor.procs import process
from supervisor.procs import spawner
from supervisor.procs.cgroup import CgroupManager, CgroupUnavailable
from supervisor.core.config import parse_config
from supervisor.core.errors import SpawnFailed
from supervisor.procs.spawner import spawn_root
from supervisor.procs.stderr import STDERR_LINE_BYTES, STDERR_LINES, capture_stderr, decode_tail
from tests.conftest import eventually

# Both ways of starting a root: subprocess, and the clone3 spawner where built.
SPAWNERS = [pytest.param(False, id="subprocess"), pytest.param(
    True, id="clone3", marks=pytest.mark.skipif(clonespawn.load() is None, reason="the clone3 spawner was not built"),
)]


def wait_for(root) -> int:
    """Reap a root spawned by either spawner and return its exit status."""
    _, status = os.waitpid(root.pid, 0)
    root.reaped(os.waitstatus_to_exitcode(status))
    return os.waitstatus_to_exitcode(status)


def adapter(command: list[str], **extra: str) -> object:
    lines = [f"command = {json.dumps(command)}"] + [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return parse_config("[adapters.a]\n" + "\n".join(lines) + "\n").adapters["a"]


@pytest.mark.parametrize("clone3", SPAWNERS)
async def test_a_root_runs_in_its_own_session_with_the_tags_and_its_stderr_is_captured(clone3: bool) -> None:
    script = (
        "import os, sys\n"
        "sys.stderr.write('x' * 10000 + '\\n')\n"
        "sys.stderr.write(os.environ['ADAPTER_SUPERVISOR_INSTANCE'] + ' ' + str(os.getsid(0) == os.getpid()) + '\\n')\n"
        "sys.stderr.write('no newline at the end')\n"
    )
    root = spawn_root(
        adapter([sys.executable, "-c", script]), instance_id="inst-1", job="j", params={}, daemon_key="k", clone3=clone3,
    )
    lines: list[str] = []
    try:
        with trio.fail_after(10):
            await capture_stderr(root, lines.append)
    finally:
        assert wait_for(root) == 0
        root.close_stdio()
    long_pieces = [line for line in lines if set(line) == {"x"}]
    assert [len(piece) for piece in long_pieces] == [STDERR_LINE_BYTES, STDERR_LINE_BYTES, 10000 - 2 * STDERR_LINE_BYTES]
    assert lines[-2:] == ["inst-1 True", "no newline at the end"]
    assert decode_tail(root.stderr_tail, STDERR_LINES) == lines


@pytest.mark.parametrize("clone3", SPAWNERS)
def test_a_roots_identity_is_its_pid_and_the_start_time_proc_shows(clone3: bool) -> None:
    # The identity every later kill is checked against; the clone3 spawner's
    # start time comes from the clock, or from /proc when the clock cannot tell.
    roots = []
    try:
        for _ in range(10):
            roots.append(spawn_root(adapter(["/bin/sleep", "30"]), instance_id="i", job="j", params={},
                                    daemon_key="k", clone3=clone3))
        for root in roots:
            assert root.id.start_time > 0
            assert process.identify(root.pid) == root.id
    finally:
        for root in roots:
            os.kill(root.pid, signal.SIGKILL)
            wait_for(root)
            root.close_stdio()
            os.close(root.stderr_fd)


@pytest.mark.parametrize(
    "command, extra, reason",
    [
        (["/nonexistent/binary"], {}, "not found"),
        (["/bin/true"], {"cwd": "/nonexistent/dir"}, "does not exist"),
        (["/etc/passwd"], {}, "permission denied"),
    ],
)
@pytest.mark.parametrize("clone3", SPAWNERS)
def test_spawn_failures_name_the_os_reason_and_leave_no_fd_open(command, extra, reason, clone3: bool) -> None:
    if clone3:
        # Opened once per process at the first clone3 spawn, by design: not
        # something a failed spawn leaves behind.
        spawner._devnull()
        clonespawn.stdio_slots()
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(SpawnFailed) as error:
        spawn_root(adapter(command, **extra), instance_id="i", job="j", params={}, daemon_key="k", clone3=clone3)
    assert reason in error.value.message
    # A leaked fd stays; one another thread of the test process opens and
    # closes meanwhile does not.
    assert eventually(lambda: set(os.listdir("/proc/self/fd")) <= before, timeout=1.0)


@pytest.mark.skipif(clonespawn.load() is None, reason="the clone3 spawner was not built")
def test_a_prepared_adapter_environment_is_the_instance_environment() -> None:
    spec = parse_config(
        '[adapters.a]\ncommand = ["/bin/sleep", "5"]\nenv = { FROM_ADAPTER = "yes", HOME = "/adapter-home" }\n'
    ).adapters["a"]
    # The daemon's environment may carry tags of its own (a daemon started by
    # an adapter): the instance's win, in both ways of building it.
    base = {**os.environ, process.INSTANCE_ENV: "outer", process.JOB_ENV: "outer-job"}
    environment = spawner.adapter_environment(spec, daemon_key="key-7", base=base)
    roots = []
    try:
        for instance_id in ("inst-1", "inst-2"):
            roots.append(spawn_root(spec, instance_id=instance_id, job=f"job-{instance_id}", params={},
                                    daemon_key="key-7", clone3=True, environment=environment))
        for root, instance_id in zip(roots, ("inst-1", "inst-2")):
            entries = []
            for _ in range(200):  # until exec has laid out the new environment
                with open(f"/proc/{root.pid}/environ", "rb") as environ:
                    entries = environ.read().split(b"\0")[:-1]
                if entries:
                    break
                time.sleep(0.01)
            expected = spawner.instance_environment(spec, instance_id=instance_id, job=f"job-{instance_id}",
                                                    daemon_key="key-7", base=base)
            assert sorted(entries) == sorted(f"{k}={v}".encode() for k, v in expected.items())
    finally:
        for root in roots:
            os.kill(root.pid, signal.SIGKILL)
            wait_for(root)
            os.close(root.stderr_fd)


@pytest.mark.parametrize("clone3", SPAWNERS)
def test_the_daemon_tag_is_in_the_environment(clone3: bool) -> None:
    root = spawn_root(
        adapter(["/bin/sleep", "5"]), instance_id="inst-2", job="j", params={}, daemon_key="key-7", clone3=clone3,
    )
    try:
        env = {}
        for _ in range(200):
            env = process.read_supervisor_env(root.pid)
            if env:
                break
            time.sleep(0.01)
        assert env == {
            process.INSTANCE_ENV: "inst-2", process.JOB_ENV: "j", process.ADAPTER_ENV: "a", process.DAEMON_ENV: "key-7",
        }
    finally:
        os.kill(root.pid, signal.SIGKILL)
        wait_for(root)
        os.close(root.stderr_fd)


# -- programs a spawn would not find -----------------------------------------------


def test_command_warnings_name_each_adapter_whose_program_a_spawn_would_not_run(tmp_path) -> None:
    not_executable = tmp_path / "plain.sh"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tool").write_text("#!/bin/sh\n")
    (bin_dir / "tool").chmod(0o755)
    (tmp_path / "work").mkdir()
    config = parse_config(
        '[adapters.absent]\ncommand = ["/no/such/binary"]\n'
        '[adapters.off-path]\ncommand = ["adapter-supervisor-no-such-program"]\n'
        f'[adapters.plain]\ncommand = ["{not_executable}"]\n'
        '[adapters.on-path]\ncommand = ["sh", "-c", "true"]\n'
        f'[adapters.own-path]\ncommand = ["tool"]\nenv = {{ PATH = "{bin_dir}" }}\n'
        '[adapters.own-path-lacks-sh]\ncommand = ["sh"]\nenv = { PATH = "/nonexistent" }\n'
        f'[adapters.relative]\ncommand = ["../bin/tool"]\ncwd = "{tmp_path / "work"}"\n'
        '[adapters.relative-absent]\ncommand = ["./tool"]\ncwd = "/"\n',
        str(tmp_path / "supervisor.toml"),
    )
    warnings = {w.key: w.message for w in spawner.command_warnings(config, {"PATH": "/usr/bin:/bin"})}
    assert set(warnings) == {
        "adapters.absent.command", "adapters.off-path.command", "adapters.plain.command",
        "adapters.own-path-lacks-sh.command", "adapters.relative-absent.command",
    }
    assert warnings["adapters.absent.command"] == "program '/no/such/binary' not found (no such file); a spawn will fail"
    assert "not found in PATH (/usr/bin:/bin)" in warnings["adapters.off-path.command"]
    assert "in PATH (/nonexistent)" in warnings["adapters.own-path-lacks-sh.command"]
    assert f"({not_executable}) is not executable" in warnings["adapters.plain.command"]
    assert all(str(w).startswith(f"{tmp_path / 'supervisor.toml'}: adapters.") for w in spawner.command_warnings(config, {}))


@pytest.mark.skipif(clonespawn.load() is None, reason="the clone3 spawner was not built (no C compiler)")
def test_a_pending_root_reaches_the_caller_even_when_proc_cannot_tell_its_start(monkeypatch) -> None:
    # Whatever goes wrong after a launch left the root pending, the caller
    # gets the root (and with it the Launch that owns the child's memory):
    # here /proc cannot be read (out of fds) when the start time is needed.
    try:
        cgroups = CgroupManager.detect(name=f"test-{secrets.token_hex(6)}")
    except CgroupUnavailable as exc:
        pytest.skip(f"no writable cgroup v2 hierarchy: {exc.reason}")
    real_launch = clonespawn.launch

    def launch_without_start_time(*args, **kwargs):
        pid, _, launched = real_launch(*args, **kwargs)
        return pid, 0, launched  # as when the clock crossed a tick around clone3

    def identify(pid: int) -> process.ProcessId | None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(clonespawn, "launch", launch_without_start_time)
    monkeypatch.setattr(process, "identify", identify)
    frozen = cgroups.create("frozen")
    (frozen / "cgroup.freeze").write_text("1")
    cgroup_fd = cgroups.dir_fd("frozen")
    root = None
    try:
        root = spawn_root(adapter(["/bin/true"]), instance_id="i", job="j", params={}, daemon_key="k", clone3=True,
                          cgroup_fd=cgroup_fd, exec_wait_ns=1_000_000)
        assert root.pending is not None and root.id == process.ProcessId(root.pid, 0)
        (frozen / "cgroup.freeze").write_text("0")
        assert eventually(lambda: root.exec_settled(wait_ns=10_000_000), timeout=10)
        assert os.waitstatus_to_exitcode(os.waitpid(root.pid, 0)[1]) == 0
    finally:
        (frozen / "cgroup.freeze").write_text("0")
        os.close(cgroup_fd)
        if root is not None and root.stderr_fd is not None:
            os.close(root.stderr_fd)
        cgroups.remove("frozen")
        cgroups.remove_base()
