"""What a production daemon must survive: peers that never read, fd numbers
reused under its feet, sweeps racing spawns, running out of file descriptors."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest
import trio

from supervisor.client import DaemonError
from supervisor.procs import process
from supervisor.procs.stderr import STDERR_LINES, STDERR_LOG_BURST, STDERR_LOG_PER_S
from tests.conftest import PYTHON, eventually, read_pidfile, tree_adapter, wait_all_gone

STOP_TIMEOUT = 0.5


def test_a_peer_that_never_reads_is_dropped_and_the_daemon_lives_on(start_daemon) -> None:
    daemon = start_daemon(send_timeout=0.5)
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(daemon.socket)
    hog.setblocking(False)
    line = b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{}}\n'
    sent = 0
    deadline = time.monotonic() + 10
    # Pipeline requests without ever reading until the daemon stops taking them.
    while time.monotonic() < deadline:
        try:
            sent += hog.send(line * 200)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                hog.send(line)
            except BlockingIOError:
                break
        except (BrokenPipeError, ConnectionResetError):
            break
    daemon.wait_for_event("connection.send_timeout", timeout=5.0)
    assert daemon.popen.poll() is None, "the daemon died of a slow reader"
    assert daemon.client().call("hello")["pid"] == daemon.pid
    hog.close()
    assert sent > 0


def test_fds_passed_with_a_lease_are_pipes_and_the_daemon_keeps_none(start_daemon) -> None:
    adapter = '[adapters.echo]\ncommand = ["/bin/cat"]\nstdio = "pipe"\nstop_timeout = 0.5\n'
    daemon = start_daemon(adapter)
    client = daemon.client()
    client.call("hello")

    def pipes() -> list[str]:
        # Pipes only: the daemon also keeps spare cgroups and stderr files
        # made ahead, whose number moves as they are used and refilled.
        found = []
        for name in os.listdir(f"/proc/{daemon.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{daemon.pid}/fd/{name}")
            except FileNotFoundError:
                continue
            if target.startswith("pipe:"):
                found.append(target)
        return found

    baseline = len(pipes())
    for round_ in range(20):
        result, fds = client.call_with_fds("acquire", {"job": f"job-{round_}", "adapter": "echo", "fds": True})
        assert [stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in fds] == [True, True]
        client.call("release_job", {"job": f"job-{round_}"})
        for fd in fds:
            os.close(fd)
    assert eventually(lambda: client.call("status")["instances"] == [], timeout=3.0)
    # Each response's duplicates were closed after sending; each instance's
    # pipes with its tree.
    assert eventually(lambda: len(pipes()) <= baseline, timeout=3.0), pipes()


async def test_sweeps_racing_spawns_never_kill_a_live_instance(start_daemon) -> None:
    adapter = '[adapters.sleeper]\ncommand = ["/bin/sleep", "3600"]\nstop_timeout = 0.5\nmax_instances = 200\n'
    daemon = start_daemon(adapter, cgroup="off", sweep_interval=0.05)
    stream = await trio.open_unix_socket(daemon.socket)
    buffer = b""

    async def call(request_id: int, method: str, params: dict) -> None:
        line = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        await stream.send_all(json.dumps(line).encode() + b"\n")

    # Sixty spawns pipelined on one connection while periodic and deep sweeps run.
    for number in range(60):
        await call(number, "acquire", {"job": f"job-{number}", "adapter": "sleeper"})
        if number % 10 == 0:
            await call(1000 + number, "sweep", {"deep": True})
    answers: dict[int, dict] = {}
    notifications = []
    with trio.fail_after(30):
        while len(answers) < 66:
            chunk = await stream.receive_some(65536)
            assert chunk, "the daemon closed the connection"
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "id" in message:
                    answers[message["id"]] = message
                else:
                    notifications.append(message)
    await trio.sleep(0.5)  # several more periodic sweeps
    assert all("result" in answers[n] for n in range(60)), [answers[n] for n in range(60) if "error" in answers[n]]
    killed = [n for n in notifications if n.get("method") == "adapter_exited"]
    assert killed == [], "a sweep killed instances it saw being born"
    roots = [process.identify(answers[n]["result"]["pid"]) for n in range(60)]
    assert all(root is not None and process.is_running(root) for root in roots)
    for report_id in range(1000, 1060, 10):
        assert answers[report_id]["result"]["orphans"] == []
    await stream.aclose()


def test_running_out_of_file_descriptors_does_not_crash_the_daemon(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    daemon = start_daemon(
        tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT),
        nofile=64, cgroup="off",
    )
    client = daemon.client()
    lease = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    # Use up the daemon's file descriptors with idle connections.
    hogs = []
    for _ in range(80):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket)
        hogs.append(sock)
    time.sleep(0.3)
    try:
        client.call("release", {"lease": lease["lease"]})
        client.call("sweep")
    finally:
        for sock in hogs:
            sock.close()
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 3.0) == {}
    assert eventually(lambda: daemon.popen.poll() is None and client.call("hello")["pid"] == daemon.pid, timeout=3.0)


def test_roots_that_exit_at_once_are_always_seen_exiting(start_daemon) -> None:
    # The root is spawned in a worker thread; /bin/true may exit, and be reaped,
    # before the daemon watches it. Its status must still reach the instance.
    daemon = start_daemon('[adapters.brief]\ncommand = ["/bin/true"]\nstop_timeout = 0.5\n')
    client = daemon.client()
    for round_ in range(25):
        lease = client.call("acquire", {"job": f"job-{round_}", "adapter": "brief"})
        note = client.next_notification()
        assert note["method"] == "adapter_exited"
        assert note["params"]["instance"] == lease["instance"]
        assert note["params"]["returncode"] == 0 and note["params"]["reason"] == "exited"
        client.call("release", {"lease": lease["lease"]})
    assert eventually(lambda: client.call("status")["instances"] == [], timeout=3.0)


def test_an_adapter_flooding_stderr_is_logged_within_its_budget_and_its_tail_is_whole(start_daemon) -> None:
    # Before the budget, every line went to the daemon's log from the trio
    # thread: a loop writing stderr made `status` 250x slower for everyone.
    total = 30 * STDERR_LOG_BURST
    script = (
        "import sys, time\n"
        f"sys.stderr.write(''.join('line %d\\n' % i for i in range({total})))\n"
        "sys.stderr.flush()\n"
        "time.sleep(60)\n"
    )
    daemon = start_daemon(f"[adapters.chatty]\ncommand = {json.dumps([PYTHON, '-c', script])}\nstop_timeout = 0.5\n")
    client = daemon.client()
    started = time.monotonic()
    lease = client.call("acquire", {"job": "chatty-job", "adapter": "chatty"})

    def tail() -> list[str]:
        return client.call("logs", {"lease": lease["lease"], "lines": STDERR_LINES})["lines"]

    assert eventually(lambda: tail()[-1:] == [f"line {total - 1}"], timeout=15)
    assert tail() == [f"line {i}" for i in range(total - STDERR_LINES, total)]
    client.call("release", {"lease": lease["lease"]})

    def accounted() -> tuple[int, int]:
        events = [e for e in daemon.log_events() if e.get("instance") == lease["instance"]]
        logged = sum(e.get("event") == "adapter.stderr" for e in events)
        dropped = sum(e["lines"] for e in events if e.get("event") == "adapter.stderr_dropped")
        return logged, dropped

    # The last count comes when the pipe's last writer is gone.
    assert eventually(lambda: sum(accounted()) == total, timeout=10), accounted()
    logged, dropped = accounted()
    assert STDERR_LOG_BURST <= logged <= STDERR_LOG_BURST + STDERR_LOG_PER_S * (time.monotonic() - started)
    assert dropped > 0


def test_a_never_ending_stderr_flood_costs_the_daemon_little_cpu(start_daemon) -> None:
    # A line per system call, forever: read as it came, this took a whole core
    # of the daemon; past the log budget it is read a pipe's worth at a time.
    script = "import sys\nwhile True:\n    sys.stderr.write('x' * 80 + '\\n')\n"
    daemon = start_daemon(f"[adapters.flood]\ncommand = {json.dumps([PYTHON, '-c', script])}\nstop_timeout = 0.5\n")
    client = daemon.client()
    lease = client.call("acquire", {"job": "flood-job", "adapter": "flood"})
    daemon.wait_for_event("adapter.stderr_dropped", timeout=10)

    def cpu_seconds() -> float:
        with open(f"/proc/{daemon.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before, started = cpu_seconds(), time.monotonic()
    time.sleep(1.0)
    used = (cpu_seconds() - before) / (time.monotonic() - started)
    assert used < 0.4, f"the daemon spent {used:.2f} of a core reading one adapter's stderr"
    assert client.call("logs", {"lease": lease["lease"], "lines": 1})["lines"] == ["x" * 80]
    client.call("release", {"lease": lease["lease"]})


def test_the_last_words_of_a_flooding_adapter_that_exits_reach_logs(start_daemon) -> None:
    # Past the budget the reader pauses between reads; the tree may be gone
    # (and the instance finished) before it reads the pipe's last lines, which
    # must still land in the tail that `logs` serves.
    script = (
        "import sys\n"
        f"sys.stderr.write(''.join('line %d\\n' % i for i in range({3 * STDERR_LOG_BURST})))\n"
        "sys.stderr.write('FATAL last words\\n')\n"
        "sys.exit(3)\n"
    )
    daemon = start_daemon(f"[adapters.dying]\ncommand = {json.dumps([PYTHON, '-c', script])}\nstop_timeout = 0.5\n")
    client = daemon.client()
    for attempt in range(12):  # the window is a pause of the reader: not hit every time
        lease = client.call("acquire", {"job": f"dying-{attempt}", "adapter": "dying"})
        daemon.wait_for_event("adapter.root_exited", instance=lease["instance"], timeout=10)

        def last_line(instance: str = lease["instance"]) -> list[str]:
            return client.call("logs", {"instance": instance, "lines": 1})["lines"]

        assert eventually(lambda: last_line() == ["FATAL last words"], timeout=5), last_line()


@pytest.mark.parametrize("cgroup", [pytest.param("off", id="process-table"), pytest.param("auto", id="cgroup")])
def test_periodic_sweeps_at_the_fd_limit_neither_crash_nor_leak(start_daemon, tmp_path: Path, cgroup: str) -> None:
    """Instances with pipes and idle connections take every fd the daemon has;
    the periodic sweeps that follow must fail softly (and say so), acquires
    past the limit must be refused with 1004, and everything must still stop."""
    daemon = start_daemon(
        '[adapters.piped]\ncommand = ["/bin/sleep", "60"]\nstdio = "pipe"\nstop_timeout = 0.5\n',
        nofile=64, cgroup=cgroup, sweep_interval=0.2,
    )
    client = daemon.client()
    granted, refused = [], []
    for n in range(30):
        try:
            result, fds = client.call_with_fds("acquire", {"job": f"job-{n}", "adapter": "piped", "fds": True})
        except DaemonError as exc:
            refused.append(exc.code)
            continue
        for fd in fds:
            os.close(fd)
        granted.append(result)
    idle = []
    for _ in range(10):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(daemon.socket)
        except OSError:
            sock.close()
            break
        idle.append(sock)
    try:
        time.sleep(1.5)  # several periodic sweeps at the limit
        assert daemon.popen.poll() is None, daemon.log_path.read_text()[-3000:]
        assert set(refused) <= {1004}, refused
        assert granted, "no acquire succeeded at all"
    finally:
        for sock in idle:
            sock.close()
    pids = [g["pid"] for g in granted]
    client.call("release_job", {"job": "job-0"})
    for g in granted:
        client.call("release", {"lease": g["lease"]}) if g["job"] != "job-0" else None
    assert eventually(lambda: client.call("status")["instances"] == [], timeout=10)
    assert eventually(lambda: not [p for p in pids if (m := process.identify(p)) is not None and process.is_running(m)], timeout=5)
    assert daemon.popen.poll() is None
