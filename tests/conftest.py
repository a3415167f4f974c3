"""Fixtures that run the real daemon as a separate process on a temporary socket.

The daemon is a child subreaper and reaps by pid, so it runs in its own
process, never inside the test process. Adapters are real process trees
(`tests/adapters/tree.py`).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from supervisor.procs import process
from supervisor.client import Client

TREE = str(Path(__file__).parent / "adapters" / "tree.py")
PYTHON = sys.executable

# Generous: a loaded 2-core CI machine can take a while to start Python.
DAEMON_START_TIMEOUT_S = 20.0


def tree_adapter(name: str, *, pidfile: Path, extra: str = "", args: tuple[str, ...] = (), **settings: object) -> str:
    """TOML for an adapter running tests/adapters/tree.py with `args`."""
    command = [PYTHON, TREE, "--pidfile", str(pidfile), *args]
    lines = [f"[adapters.{name}]", f"command = {json.dumps(command)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n" + extra


@dataclass
class DaemonProcess:
    """A running daemon started by the `start_daemon` fixture."""

    popen: subprocess.Popen[bytes]
    socket: str
    state_dir: Path
    config_path: Path
    log_path: Path
    clients: list[Client] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def client(self, timeout: float = 30.0) -> Client:
        client = Client(self.socket, timeout=timeout)
        self.clients.append(client)
        return client

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def wait_for_event(self, name: str, timeout: float = 5.0, **fields: object) -> dict[str, object]:
        """The first logged event called `name` whose fields match, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.log_events():
                if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} event with {fields} within {timeout}s")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.popen.wait(timeout)


def wait_for_socket(path: str, popen: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise AssertionError(f"daemon exited with {popen.returncode}:\n{log_path.read_text()}")
        try:
            with Client(path, timeout=2) as client:
                client.call("hello")
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"daemon did not answer within {timeout}s:\n{log_path.read_text()}")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[object]:
    """Start daemons: `start_daemon(adapters_toml, **daemon_settings)`, behind
    `command_prefix` (a wrapper that execs the rest) if one is given. Every
    one is stopped at teardown, and no process it started may outlive it."""
    started: list[DaemonProcess] = []

    def start(
        adapters: str = "",
        *,
        wait: bool = True,
        state_dir: Path | None = None,
        nofile: int | None = None,
        preexec: Callable[[], None] | None = None,
        command_prefix: Sequence[str] = (),
        **daemon: object,
    ) -> DaemonProcess:
        index = len(started)
        sock = str(tmp_path / f"d{index}.sock")
        state = state_dir or tmp_path / f"state{index}"
        settings = {"socket": sock, "state_dir": str(state), "log_format": "json", "log_level": "debug", **daemon}
        sock = str(settings["socket"])
        config_path = tmp_path / f"supervisor{index}.toml"
        config_path.write_text(
            "[daemon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()) + "\n" + textwrap.dedent(adapters)
        )
        log_path = tmp_path / f"daemon{index}.log"

        def before_exec() -> None:
            # `nofile`: a hard limit on open files, to test running out of fds.
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            if preexec is not None:
                preexec()

        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                [*command_prefix, PYTHON, "-m", "supervisor", "serve", "--config", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=before_exec if nofile or preexec else None,
            )
        handle = DaemonProcess(popen, sock, state, config_path, log_path)
        started.append(handle)
        if wait:
            wait_for_socket(sock, popen, log_path, DAEMON_START_TIMEOUT_S)
        return handle

    yield start

    leftovers: list[str] = []
    # Every daemon stops before any leftovers are looked for: a later daemon
    # on the same state_dir may have adopted an earlier one's trees.
    for handle in reversed(started):
        for client in handle.clients:
            client.close()
        try:
            handle.stop()
        except subprocess.TimeoutExpired:
            handle.popen.kill()
            handle.popen.wait()
            leftovers.append(f"daemon {handle.pid} ignored SIGTERM")
    for handle in started:
        leftovers += kill_tagged_leftovers(handle)
        text = handle.log_path.read_text()
        if "Traceback" in text or '"request.crashed"' in text or '"daemon.crashed"' in text:
            leftovers.append(f"daemon {handle.pid} logged a crash:\n{text[-4000:]}")
    assert not leftovers, leftovers


def kill_tagged_leftovers(daemon: DaemonProcess) -> list[str]:
    """SIGKILL live processes tagged with an instance this daemon spawned (per its
    log); returns a description of each, so the test fails on them. Processes of
    other daemons on the host are none of this test's business."""
    instances = {e["instance"] for e in daemon.log_events() if e.get("event") == "adapter.spawned"}
    found = []
    for stat in process.scan_processes():
        if stat.state in ("Z", "X") or stat.pid == os.getpid():
            continue
        tag = process.read_environ_tag(stat.pid)
        if tag is None or tag not in instances:
            continue
        found.append(f"pid {stat.pid} (instance {tag}) {process.read_cmdline(stat.pid)}")
        os.kill(stat.pid, signal.SIGKILL)
    return found


def read_pidfile(path: Path, roles: tuple[str, ...] = ("root", "child", "grandchild", "escapee"), timeout: float = 10.0) -> dict[str, process.ProcessId]:
    """Wait until every role has written its pid; return their identities."""
    deadline = time.monotonic() + timeout
    while True:
        entries: dict[str, process.ProcessId] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                role, pid = line.split()
                identity = process.identify(int(pid))
                if identity is not None:
                    entries[role] = identity
        if all(role in entries for role in roles):
            return entries
        if time.monotonic() > deadline:
            raise AssertionError(f"tree did not come up: {entries} from {path}")
        time.sleep(0.01)


def eventually(check, timeout: float = 5.0, interval: float = 0.02):
    """Call `check` until it returns something truthy or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_all_gone(members: dict[str, process.ProcessId], daemon_pid: int, timeout: float) -> dict[str, process.ProcessId]:
    """Wait up to `timeout` for every member to be gone (a zombie of the daemon is
    not gone; a zombie of PID 1 is). Returns the ones still there."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {r: m for r, m in members.items() if not process.is_gone(m, our_pid=daemon_pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


async def trio_call(sock_path: str, method: str, params: dict[str, object] | None = None) -> dict[str, object]:
    """One request on a fresh trio socket; returns the whole response object."""
    stream = await trio.open_unix_socket(sock_path)
    async with stream:
        line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}).encode() + b"\n"
        await stream.send_all(line)
        buffer = b""
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            buffer += chunk
        return json.loads(buffer.split(b"\n", 1)[0])


def raw_exchange(sock_path: str, payload: bytes, *, timeout: float = 5.0) -> list[dict[str, object]]:
    """Send raw bytes, read until the daemon closes or goes quiet; return the decoded lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines() if line.strip()]
