"""In-place upgrade, against the real daemon: the `upgrade`
method, SIGUSR2 and a refused check; same pid, no connection closed, every
request answered once, adapters and their pipes untouched."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from supervisor.client import DaemonError
from supervisor.procs import process
from tests.conftest import PYTHON, eventually, read_pidfile, tree_adapter, wait_all_gone

MODES = [pytest.param("auto", id="cgroup"), pytest.param("off", id="process-table")]

CHATTY = "import sys, time\ni = 0\nwhile True:\n    sys.stderr.write('tick %d\\n' % i); sys.stderr.flush(); i += 1; time.sleep(0.005)\n"


def adapters(tmp_path: Path) -> str:
    chatty = f"[adapters.chatty]\ncommand = {json.dumps([PYTHON, '-c', CHATTY])}\nstop_timeout = 1.0\n"
    echo = '[adapters.echo]\ncommand = ["/bin/cat"]\nstdio = "pipe"\nstop_timeout = 1.0\n'
    return tree_adapter("tree", pidfile=tmp_path / "{job}.pids", stop_timeout=1.0) + "\n" + chatty + echo


@pytest.mark.parametrize("cgroup", MODES)
def test_an_upgrade_keeps_the_pid_every_connection_lease_adapter_and_pipe(start_daemon, tmp_path: Path, cgroup: str) -> None:
    daemon = start_daemon(adapters(tmp_path), cgroup=cgroup)
    holder = daemon.client()
    before = holder.call("hello")
    bound = holder.call("acquire", {"job": "job-b", "adapter": "tree"})
    members = read_pidfile(tmp_path / "job-b.pids")
    chatty = holder.call("acquire", {"job": "job-s", "adapter": "chatty"})
    echo, (stdin_fd, stdout_fd) = holder.call_with_fds("acquire", {"job": "job-e", "adapter": "echo", "fds": True})
    stdin, stdout = os.fdopen(stdin_fd, "wb", buffering=0), os.fdopen(stdout_fd, "rb", buffering=0)
    stdin.write(b"before\n")
    assert stdout.readline() == b"before\n"
    status_before = {row["job"]: row for row in holder.call("status")["instances"]}

    # A raw client pipelines requests around the upgrade on one connection.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(daemon.socket)
    raw.settimeout(60)
    upgrader = daemon.client(timeout=90)
    answer = upgrader.call("upgrade", {})
    assert answer["pid"] == daemon.pid and answer["generation"] == before["generation"] + 1

    hello = holder.call("hello")
    assert hello["pid"] == daemon.pid and hello["generation"] == before["generation"] + 1
    assert hello["instance_id"] == before["instance_id"], "an upgrade is the same daemon: bound leases live on"
    status_after = {row["job"]: row for row in holder.call("status")["instances"]}
    for job, row in status_before.items():
        assert (status_after[job]["instance"], status_after[job]["pid"], status_after[job]["refcount"]) == (
            row["instance"], row["pid"], row["refcount"]
        )
    assert all(process.is_running(m) for m in members.values())
    # The fds handed out before work after; stderr is still followed.
    stdin.write(b"after\n")
    assert stdout.readline() == b"after\n"
    last = int(holder.call("logs", {"lease": chatty["lease"], "lines": 1})["lines"][0].split()[1])
    assert eventually(lambda: int(holder.call("logs", {"lease": chatty["lease"], "lines": 1})["lines"][0].split()[1]) > last)
    # The raw connection made before the upgrade is served after it.
    raw.sendall(b'{"jsonrpc":"2.0","id":7,"method":"hello","params":{}}\n')
    assert json.loads(raw.makefile("rb").readline())["result"]["generation"] == hello["generation"]
    raw.close()
    # The bound lease is still the holder's: releasing it stops the tree whole.
    assert holder.call("release", {"lease": bound["lease"]}) == {"refcount": 0, "stopping": True}
    assert not wait_all_gone(members, daemon.pid, timeout=3.0)
    # And closing the holder's connection releases what it still holds.
    stdin.close()
    stdout.close()
    holder.close()
    checker = daemon.client()
    assert eventually(lambda: not checker.call("status")["instances"], timeout=5)


def test_sigusr2_upgrades_and_a_refused_check_leaves_the_daemon_serving(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(adapters(tmp_path), cgroup="off")
    client = daemon.client()
    lease = client.call("acquire", {"job": "job-b", "adapter": "tree"})
    generation = client.call("hello")["generation"]
    os.kill(daemon.pid, signal.SIGUSR2)
    daemon.wait_for_event("daemon.upgrading", timeout=30)
    assert eventually(lambda: client.call("hello")["generation"] == generation + 1, timeout=30)
    # The new image says how long serving stopped, where the time went, and
    # the CPU its start took (at most the wall time from execve, as the new
    # image runs one thread until it serves).
    pause = next(e for e in daemon.log_events() if e["event"] == "daemon.upgrade_pause")
    assert pause["total_ms"] >= pause["starting_ms"] > 0 and pause["rebuilding_ms"] > 0
    assert 0 < pause["cpu_ms"] <= pause["starting_ms"] + pause["rebuilding_ms"] + 5
    # A config the new code rejects: the check fails, nothing changes.
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[adapters.broken]\ncommand = []\n")
    with pytest.raises(DaemonError) as refused:
        daemon.client(timeout=90).upgrade()
    assert refused.value.code == 1008 and "check failed" in refused.value.message
    hello = client.call("hello")
    assert hello["generation"] == generation + 1 and hello["pid"] == daemon.pid
    assert client.call("status")["instances"][0]["refcount"] == 1
    client.call("release", {"lease": lease["lease"]})


def test_requests_pipelined_across_an_upgrade_are_each_answered_once(start_daemon, tmp_path: Path) -> None:
    import threading

    daemon = start_daemon(adapters(tmp_path), cgroup="off")
    sockets = []
    for _ in range(4):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(daemon.socket)
        raw.settimeout(60)
        sockets.append(raw)
    upgraded = threading.Event()
    sent = [0] * len(sockets)
    answers: dict[int, list[int]] = {i: [] for i in range(len(sockets))}
    during = [0]

    def send(index: int, raw: socket.socket) -> None:
        # Requests in small bursts until well after the upgrade, some lines
        # split with a pause between their halves.
        finish_at = None
        while finish_at is None or time.monotonic() < finish_at:
            for _ in range(10):
                line = json.dumps({"jsonrpc": "2.0", "id": sent[index], "method": "status", "params": {}}).encode()
                if sent[index] % 7 == 3:
                    raw.sendall(line[:10])
                    time.sleep(0.002)
                    raw.sendall(line[10:] + b"\n")
                else:
                    raw.sendall(line + b"\n")
                sent[index] += 1
            time.sleep(0.002)
            if upgraded.is_set() and finish_at is None:
                finish_at = time.monotonic() + 0.2
        # Last, a request whose answer tells the reader it has them all.
        raw.sendall(b'{"jsonrpc":"2.0","id":"end","method":"hello","params":{}}\n')

    def read(index: int, raw: socket.socket) -> None:
        reader = raw.makefile("rb")
        while line := reader.readline():
            answer = json.loads(line)
            assert "result" in answer, answer
            if answer["id"] == "end":
                break
            answers[index].append(answer["id"])

    senders = [threading.Thread(target=send, args=(i, s)) for i, s in enumerate(sockets)]
    readers = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(sockets)]
    for thread in senders + readers:
        thread.start()
    # A client slow to read: its answers fill its socket, so the upgrade's
    # pause waits for it to read, while the others go on sending (the hub
    # holds what they send, and hands it over).
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(daemon.socket)
    slow.settimeout(60)
    slow.sendall(b"".join(
        json.dumps({"jsonrpc": "2.0", "id": i, "method": "status", "params": {}}).encode() + b"\n" for i in range(300)
    ))

    def read_slowly() -> None:
        time.sleep(1.5)
        reader = slow.makefile("rb")
        got = [json.loads(reader.readline())["id"] for _ in range(300)]
        assert sorted(got) == list(range(300))

    slow_reader = threading.Thread(target=read_slowly)
    slow_reader.start()
    time.sleep(0.2)
    before = sum(sent)
    generation = daemon.client(timeout=90).call("upgrade", {})["generation"]
    slow_reader.join(30)
    assert not slow_reader.is_alive()
    during[0] = sum(sent) - before
    upgraded.set()
    for thread in senders + readers:
        thread.join(60)
        assert not thread.is_alive()
    assert during[0] > 100, "the test sent too little while the upgrade ran to mean anything"
    for index in answers:
        assert sorted(answers[index]) == list(range(sent[index])), "a request lost or answered twice"
    hello = daemon.client().call("hello")
    assert hello["generation"] == generation and hello["pid"] == daemon.pid
    for raw in [*sockets, slow]:
        raw.close()


def test_an_upgrade_while_a_tree_stops_and_a_spawn_runs_in_a_thread_loses_neither(start_daemon, tmp_path: Path) -> None:
    stubborn = tree_adapter("stubborn", pidfile=tmp_path / "stubborn.pids", args=("--ignore-term",), stop_timeout=3.0)
    daemon = start_daemon(adapters(tmp_path) + "\n" + stubborn, cgroup="off", spawner="subprocess")
    client = daemon.client()
    stopping = client.call("acquire", {"job": "job-x", "adapter": "stubborn"})
    members = read_pidfile(tmp_path / "stubborn.pids")
    assert client.call("release", {"lease": stopping["lease"]})["stopping"] is True
    released = time.monotonic()
    time.sleep(1.0)
    answer = daemon.client(timeout=90).call("upgrade", {})
    assert answer["pid"] == daemon.pid
    # The stop the old image had begun is finished by the new one, within the
    # same grace: the tree ignores SIGTERM, so the SIGKILL after stop_timeout
    # (counted from the release, not from the upgrade) ends it.
    assert not wait_all_gone(members, daemon.pid, timeout=3.0 + 5.0)
    assert time.monotonic() - released < 3.0 + 1.0, "the upgrade restarted the stop's grace"
    spawned = client.call("acquire", {"job": "job-y", "adapter": "tree"})
    assert spawned["spawned"] is True and process.is_running(process.identify(spawned["pid"]))
    client.call("release", {"lease": spawned["lease"]})


async def test_the_async_client_upgrades_and_resumes(start_daemon, tmp_path: Path) -> None:
    from supervisor.client import AsyncClient

    daemon = start_daemon(adapters(tmp_path), cgroup="off")
    async with AsyncClient(daemon.socket, timeout=90) as client:
        before = await client.hello()
        answer = await client.upgrade()
        assert (answer["pid"], answer["generation"]) == (daemon.pid, before["generation"] + 1)
        # Nothing waits to be resumed after an upgrade: bound leases stayed bound.
        lease = await client.call("acquire", {"job": "j", "adapter": "tree"})
        assert await client.resume([lease["lease"]]) == {"resumed": [], "not_resumed": [lease["lease"]]}
        await client.release(lease["lease"])


def upgrade_in_background(daemon) -> tuple[object, list]:
    import threading

    outcome: list = []

    def run() -> None:
        try:
            outcome.append(daemon.client(timeout=90).upgrade())
        except Exception as exc:  # noqa: BLE001 (the test looks at what it was)
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_sigterm_during_an_upgrade_stops_the_daemon_cleanly_and_every_tree(start_daemon, tmp_path: Path) -> None:
    stubborn = tree_adapter("stubborn", pidfile=tmp_path / "stubborn.pids", args=("--ignore-term",), stop_timeout=1.0)
    daemon = start_daemon(stubborn, cgroup="off")
    daemon.client().call("acquire", {"job": "j", "adapter": "stubborn", "detach": True, "ttl": 600})
    members = read_pidfile(tmp_path / "stubborn.pids")
    thread, outcome = upgrade_in_background(daemon)
    daemon.wait_for_event("daemon.upgrade_requested", timeout=10)
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.popen.wait(30) == 0
    thread.join(30)
    assert outcome and not isinstance(outcome[0], dict), "the upgrade must not happen once stopping began"
    assert not wait_all_gone(members, daemon.pid, timeout=3.0), "the shutdown did not stop every tree"
    assert "daemon.upgrading" not in daemon.log_path.read_text()


def test_an_adapter_exiting_during_an_upgrade_is_still_notified(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon('[adapters.sleeper]\ncommand = ["/bin/sleep", "600"]\nstop_timeout = 1.0\n', cgroup="off")
    holder = daemon.client()
    lease = holder.call("acquire", {"job": "j", "adapter": "sleeper"})
    thread, outcome = upgrade_in_background(daemon)
    daemon.wait_for_event("daemon.upgrading", timeout=30)
    os.kill(lease["pid"], signal.SIGKILL)
    thread.join(60)
    assert isinstance(outcome[0], dict), outcome
    notice = holder.next_notification(timeout=10)
    assert notice["method"] == "adapter_exited" and notice["params"]["instance"] == lease["instance"]
    assert notice["params"]["reason"] == "killed"


def test_a_requester_that_half_closes_gets_its_answer_from_the_new_image(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon("", cgroup="off")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(daemon.socket)
    raw.settimeout(60)
    raw.sendall(b'{"jsonrpc":"2.0","id":"up","method":"upgrade","params":{}}\n')
    raw.shutdown(socket.SHUT_WR)
    answer = json.loads(raw.makefile("rb").readline())
    assert answer["id"] == "up" and answer["result"]["pid"] == daemon.pid and answer["result"]["generation"] == 2
    raw.close()


def test_a_second_upgrade_meanwhile_and_a_moved_state_dir_are_refused_at_once(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon("", cgroup="off")
    thread, outcome = upgrade_in_background(daemon)
    daemon.wait_for_event("daemon.upgrade_requested", timeout=10)
    started = time.monotonic()
    with pytest.raises(DaemonError) as second:
        daemon.client(timeout=90).upgrade()
    assert second.value.code == 1008 and "already under way" in second.value.message
    assert time.monotonic() - started < 5
    thread.join(60)
    assert isinstance(outcome[0], dict), outcome
    text = daemon.config_path.read_text().replace(str(daemon.state_dir), str(tmp_path / "elsewhere"))
    daemon.config_path.write_text(text)
    with pytest.raises(DaemonError) as moved:
        daemon.client(timeout=90).upgrade()
    assert moved.value.code == 1008 and "state_dir" in moved.value.message
    assert daemon.client().call("hello")["generation"] == 2


def test_the_check_compiles_the_daemons_modules_whose_bytecode_is_missing_or_stale(tmp_path: Path, monkeypatch) -> None:
    """The new image then starts from bytecode: an upgrade answers nothing
    until it has imported everything. Only the daemon's own modules, and only
    where the daemon's uid owns the directory."""
    import importlib.util
    import sys

    from supervisor import upgrade

    monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def load(name: str, directory: Path) -> Path:
        directory.mkdir(exist_ok=True)
        source = directory / f"{name.rpartition('.')[2]}.py"
        source.write_text("VALUE = 1\n")
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setitem(sys.modules, name, module)
        return Path(spec.cached)

    ours = load("supervisor._warm_test", tmp_path / "ours")
    foreign = load("warm_foreign", tmp_path / "foreign")
    theirs = load("supervisor._warm_theirs", tmp_path / "theirs")
    os.chown(tmp_path / "theirs", 61001, 61001)
    assert not ours.exists()
    assert upgrade.write_bytecode() >= 1
    assert ours.exists() and ours.read_bytes()[:4] == importlib.util.MAGIC_NUMBER
    assert not foreign.exists(), "a module not the daemon's was compiled"
    assert not theirs.exists(), "a directory of another uid was written into"
    assert upgrade.write_bytecode() == 0  # up to date now
    source = tmp_path / "ours" / "_warm_test.py"
    os.utime(source, (time.time() + 10, time.time() + 10))
    assert upgrade.write_bytecode() == 1  # the source changed since


def test_a_peer_that_does_not_read_fails_an_upgrade_fast_and_keeps_its_answers(start_daemon) -> None:
    """The pause gives up after STUCK_SENDERS_S, not its 10 s: everyone else
    waits while it lasts. The daemon serves on, the peer loses nothing."""
    from supervisor.server.listener import STUCK_SENDERS_S
    from tests.server.test_listener import status_flood

    daemon = start_daemon(send_timeout=30.0)
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(daemon.socket)
    hog.setblocking(False)
    sent = 0
    try:
        flood = status_flood(1, 200)
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the daemon kept reading a peer that never reads"
            try:
                taken = hog.send(flood)
            except BlockingIOError:
                break
            sent += flood[:taken].count(b"\n")  # whole requests only
        client = daemon.client()
        began = time.monotonic()
        with pytest.raises(DaemonError) as refused:
            client.call("upgrade")
        took = time.monotonic() - began
        assert refused.value.code == 1008 and "did not read the answers" in refused.value.message
        assert took < STUCK_SENDERS_S + 5.0, f"the upgrade held everyone for {took:.1f} s"
        assert client.call("hello")["generation"] == 1
        # The hog reads now: every answer it was owed arrives.
        hog.setblocking(True)
        hog.settimeout(10)
        data = b""
        while data.count(b"\n") < sent:
            chunk = hog.recv(1 << 20)
            assert chunk, "the connection ended"
            data += chunk
        assert data.count(b"\n") == sent
    finally:
        hog.close()


def test_the_new_code_is_the_installed_package_not_a_directory_where_the_daemon_was_started(tmp_path: Path) -> None:
    """`python -m` puts the working directory first on sys.path: a
    `supervisor` package there must never be what the check runs, nor what
    the daemon re-executes into (as root)."""
    import subprocess

    from supervisor.client import Client
    from tests.conftest import DAEMON_START_TIMEOUT_S, wait_for_socket

    start_dir = tmp_path / "cwd"
    planted = start_dir / "supervisor"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-was-imported"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\nraise SystemExit(3)\n")
    (planted / "__main__.py").write_text("")
    sock = str(tmp_path / "control.sock")
    config = tmp_path / "supervisor.toml"
    config.write_text(f'[daemon]\nsocket = "{sock}"\nstate_dir = "{tmp_path / "state"}"\nlog_format = "json"\n'
                      '[adapters.idle]\ncommand = ["/bin/sleep", "60"]\n')
    script = Path(PYTHON).parent / "adapter-supervisor"
    with open(tmp_path / "daemon.log", "wb") as log_file:
        daemon = subprocess.Popen([str(script), "serve", "--config", str(config)], cwd=start_dir,
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(sock, daemon, tmp_path / "daemon.log", DAEMON_START_TIMEOUT_S)
        with Client(sock, timeout=90) as client:
            assert client.upgrade()["pid"] == daemon.pid
            assert client.upgrade()["generation"] == 3  # twice: the re-executed image too
        assert not marker.exists()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


@pytest.mark.parametrize("cgroup", MODES)
def test_a_sweep_during_the_check_of_the_new_code_leaves_the_check_alone(start_daemon, cgroup: str) -> None:
    # The check (`serve --check-upgrade`) is the daemon's own child and runs
    # for a cold Python start: sweeps every 50 ms fall inside it. It is no
    # orphan of any tree, and a sweep that took it for one failed the upgrade.
    daemon = start_daemon(cgroup=cgroup, sweep_interval=0.05)
    client = daemon.client(timeout=120)
    for generation in (2, 3, 4):
        assert client.upgrade()["generation"] == generation
    swept = [o for r in client.call("reports", {"limit": 100})["reports"] for o in r["orphans"]]
    assert swept == []
