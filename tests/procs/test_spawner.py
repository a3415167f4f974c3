"""Spawning a root: environment tags, session, spawn errors, stderr capture."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import trio

from supervisor.procs import clonespawn
from supervisor.procs import process
from supervisor.procs import spawner
from supervisor.core.config import parse_config
from supervisor.core.errors import SpawnFailed
from supervisor.procs.spawner import (
    STDERR_DROPS_REPORT_S,
    STDERR_LINE_BYTES,
    STDERR_LINES,
    STDERR_LOG_BURST,
    LineBudget,
    capture_stderr,
    spawn_root,
)

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
    assert spawner.decode_tail(root.stderr_tail, STDERR_LINES) == lines


def test_the_line_budget_gives_a_burst_then_a_steady_rate_and_reports_drops_at_intervals() -> None:
    budget = LineBudget(0.0, burst=10, per_s=100.0)
    assert budget.take(4, 0.0) == 4
    assert budget.take(10, 0.0) == 6  # the rest of the burst
    assert budget.dropped_to_report(0.0) == 0, "a report before STDERR_DROPS_REPORT_S"
    assert budget.take(5, 0.03) == 3  # 30 ms at 100 a second
    assert budget.take(1, 1.0) == 1
    assert budget.take(100, 1.0) == 9  # refilled to the burst, no further
    assert budget.dropped_to_report(STDERR_DROPS_REPORT_S) == 4 + 2 + 91
    assert budget.dropped_to_report(STDERR_DROPS_REPORT_S) == 0, "reported twice"
    assert budget.take(3, STDERR_DROPS_REPORT_S + 0.001) == 0
    assert budget.dropped_to_report(STDERR_DROPS_REPORT_S + 0.001) == 0, "the next report is not due yet"
    assert budget.dropped_to_report(STDERR_DROPS_REPORT_S + 0.001, final=True) == 3


async def test_a_flood_of_stderr_is_logged_up_to_the_budget_and_every_line_is_accounted_for() -> None:
    total = 20 * STDERR_LOG_BURST
    script = f"import sys\nsys.stderr.write(''.join('line %d\\n' % i for i in range({total})))\n"
    root = spawn_root(adapter([sys.executable, "-c", script]), instance_id="i", job="j", params={}, daemon_key="k")
    logged: list[str] = []
    dropped: list[int] = []
    started = trio.current_time()
    try:
        with trio.fail_after(20):
            await capture_stderr(root, logged.append, dropped.append)
    finally:
        assert wait_for(root) == 0
        root.close_stdio()
    elapsed = trio.current_time() - started
    assert STDERR_LOG_BURST <= len(logged) <= STDERR_LOG_BURST + spawner.STDERR_LOG_PER_S * elapsed + 1
    assert logged[:STDERR_LOG_BURST] == [f"line {i}" for i in range(STDERR_LOG_BURST)]
    numbers = [int(line.split()[1]) for line in logged]
    assert numbers == sorted(set(numbers)), "lines logged twice or out of order"
    assert dropped and len(logged) + sum(dropped) == total
    assert spawner.decode_tail(root.stderr_tail, STDERR_LINES) == [f"line {i}" for i in range(total - STDERR_LINES, total)]


async def test_a_read_both_logged_in_part_and_kept_whole_in_the_tail() -> None:
    # One read of 1100 lines (written at once into an empty pipe): the first
    # STDERR_LOG_BURST are logged, the last STDERR_LINES kept, and those two
    # overlap.
    root, write_end = pipe_root()
    count = STDERR_LOG_BURST + 100
    os.write(write_end, "".join(f"line {i}\n" for i in range(count)).encode())
    os.close(write_end)
    logged: list[str] = []
    dropped: list[int] = []
    with trio.fail_after(5):
        await capture_stderr(root, logged.append, dropped.append)
    assert logged == [f"line {i}" for i in range(STDERR_LOG_BURST)]
    assert dropped == [100]
    assert spawner.decode_tail(root.stderr_tail, STDERR_LINES) == [f"line {i}" for i in range(count - STDERR_LINES, count)]


def pipe_root() -> tuple[spawner.RootProcess, int]:
    """A RootProcess whose stderr is a pipe this test writes: (root, write end)."""
    read_end, write_end = os.pipe()
    return spawner.RootProcess(id=process.ProcessId(os.getpid(), 0), stdin_fd=None, stdout_fd=None, stderr_fd=read_end), write_end


async def test_lines_dropped_before_a_quiet_spell_are_reported_during_it(nursery) -> None:
    root, write_end = pipe_root()
    dropped: list[int] = []
    nursery.start_soon(capture_stderr, root, lambda line: None, dropped.append)
    os.write(write_end, "".join(f"line {i}\n" for i in range(STDERR_LOG_BURST + 100)).encode())
    with trio.fail_after(STDERR_DROPS_REPORT_S + 5):
        while not dropped:
            await trio.sleep(0.05)
    assert dropped == [100], "the count waited for more input"
    os.close(write_end)


async def test_a_reader_cancelled_mid_flood_still_reports_what_it_dropped() -> None:
    root, write_end = pipe_root()
    logged: list[str] = []
    dropped: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(capture_stderr, root, logged.append, dropped.append)
        os.write(write_end, "".join(f"line {i}\n" for i in range(STDERR_LOG_BURST + 100)).encode())
        with trio.fail_after(5):
            while len(logged) < STDERR_LOG_BURST:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()  # before the next report is due
    assert dropped == [100]
    os.close(write_end)


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
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(SpawnFailed) as error:
        spawn_root(adapter(command, **extra), instance_id="i", job="j", params={}, daemon_key="k", clone3=clone3)
    assert reason in error.value.message
    assert set(os.listdir("/proc/self/fd")) <= before


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
