"""The control protocol (docs/protocol.md) against the real daemon over its real socket: every bad input
gets its error code, and the connection or the daemon survives as specified.

Most tests share one daemon (module scope) and keep out of each other's way by
using their own job names; tests that need a daemon configured their own way
(connection limits, authorization) start one with `start_daemon`.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from supervisor.procs import process
from tests.conftest import (
    DAEMON_START_TIMEOUT_S,
    PYTHON,
    TREE,
    DaemonProcess,
    eventually,
    kill_tagged_leftovers,
    read_pidfile,
    tree_adapter,
    wait_all_gone,
    wait_for_socket,
)

STOP_TIMEOUT = 0.5
# The smallest limit the config accepts is 1 KiB; 2 KiB leaves room for every
# ordinary request of these tests while keeping an overlong line cheap to send.
MAX_MESSAGE_BYTES = 2048
TREE_ROLES = ("root", "child", "grandchild")
NOBODY = 65534

# Tests on the shared daemon keep apart by job name; this prefix also lets a
# person tell this module's jobs from others in a log.
RUN = f"proto-{secrets.token_hex(3)}"


def job(name: str) -> str:
    return f"{RUN}-{name}"


# -- a raw connection ----------------------------------------------------------


class Connection:
    """A blocking newline-delimited JSON-RPC connection that also sends raw bytes."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        self.ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, params: object = None, request_id: object = None) -> object:
        """Send one request line; returns its id."""
        request_id = next(self.ids) if request_id is None else request_id
        envelope = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {} if params is None else params}
        self.send(json.dumps(envelope).encode() + b"\n")
        return request_id

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None once the daemon closed the connection."""
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def response(self, request_id: object) -> dict[str, Any]:
        """The response to `request_id`; notifications met on the way are kept."""
        while True:
            message = self.receive()
            assert message is not None, f"the daemon closed the connection before answering {request_id!r}"
            if "id" not in message:
                self.notifications.append(message)
                continue
            if message["id"] == request_id:
                return message

    def call(self, method: str, params: object = None) -> dict[str, Any]:
        return self.response(self.request(method, params))

    def result(self, method: str, params: object = None) -> Any:
        response = self.call(method, params)
        assert "error" not in response, response
        return response["result"]

    def error(self, method: str, params: object = None) -> dict[str, Any]:
        response = self.call(method, params)
        assert "result" not in response, response
        return response["error"]

    def closed_by_daemon(self) -> bool:
        """True if the daemon closes the connection (after anything still queued)."""
        while True:
            try:
                message = self.receive()
            except TimeoutError:
                return False
            if message is None:
                return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the shared daemon -----------------------------------------------------------


@dataclass
class SharedDaemon:
    daemon: DaemonProcess
    pid_dir: Path
    not_executable: Path

    @property
    def socket(self) -> str:
        return self.daemon.socket

    def tree_params(self) -> dict[str, str]:
        return {"dir": str(self.pid_dir)}

    def pidfile(self, job_name: str) -> Path:
        return self.pid_dir / f"{job_name}.pids"


def templated_tree(name: str, **settings: object) -> str:
    """An adapter running tests/adapters/tree.py whose pidfile is `{param:dir}/{job}.pids`."""
    command = [PYTHON, TREE, "--pidfile", "{param:dir}/{job}.pids", "--no-escapee"]
    lines = [f"[adapters.{name}]", f"command = {json.dumps(command)}", 'params = ["dir"]']
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedDaemon]:
    """One daemon for the whole module: the tables below have a hundred rows, and
    a daemon per row (`start_daemon` is per test) would cost most of a minute.
    Its adapters write their pids to `{pid_dir}/{job}.pids`."""
    base = tmp_path_factory.mktemp("protocol")
    pid_dir = base / "pids"
    pid_dir.mkdir()
    not_executable = base / "not-executable.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    settings = {
        "socket": str(base / "d.sock"),
        "socket_mode": "0600",
        "state_dir": str(base / "state"),
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "log_format": "json",
        "log_level": "debug",
    }
    config = "[daemon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()) + "\n"
    config += templated_tree("tree", stop_timeout=STOP_TIMEOUT)
    config += templated_tree("single", stop_timeout=STOP_TIMEOUT, max_instances=1)
    config += '[adapters.missing-exe]\ncommand = ["/nonexistent/adapter-binary"]\n'
    config += '[adapters.missing-cwd]\ncommand = ["/bin/true"]\ncwd = "/nonexistent-cwd/of/adapter"\n'
    config += f"[adapters.not-executable]\ncommand = [{json.dumps(str(not_executable))}]\n"
    config_path = base / "supervisor.toml"
    config_path.write_text(config)
    log_path = base / "daemon.log"
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(
            [PYTHON, "-m", "supervisor", "serve", "--config", str(config_path)], stdout=log_file, stderr=subprocess.STDOUT
        )
    daemon = DaemonProcess(popen, settings["socket"], Path(settings["state_dir"]), config_path, log_path)
    try:
        wait_for_socket(daemon.socket, popen, log_path, DAEMON_START_TIMEOUT_S)
        yield SharedDaemon(daemon, pid_dir, not_executable)
    finally:
        try:
            daemon.stop(timeout=20)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
    leftovers = kill_tagged_leftovers(daemon)
    log = log_path.read_text()
    if "Traceback" in log or '"request.crashed"' in log:
        leftovers.append(f"the daemon logged a crash:\n{log[-4000:]}")
    assert not leftovers, leftovers


@pytest.fixture
def conn(shared: SharedDaemon) -> Iterator[Connection]:
    connection = Connection(shared.socket)
    yield connection
    connection.close()


def assert_hello(connection: Connection) -> None:
    """The connection is alive and answers `hello` correctly."""
    result = connection.result("hello")
    assert result["server"] == "adapter-supervisor"
    assert result["protocol"] == 1


def instances_of(connection: Connection, job_name: str) -> list[dict[str, Any]]:
    return connection.result("status", {"job": job_name})["instances"]


# -- envelopes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code", "request_id"),
    [
        pytest.param(b'{"jsonrpc": "2.0", "id": 1, "method": "hello"\n', -32700, None, id="truncated-json"),
        pytest.param(b'{"jsonrpc": "2.0", "id": 1, "method": "hello"} trailing\n', -32700, None, id="trailing-garbage"),
        pytest.param(b"\xff\xfe{}\n", -32700, None, id="not-utf8"),
        pytest.param(b'[{"jsonrpc": "2.0", "id": 3, "method": "hello"}]\n', -32600, None, id="batch"),
        pytest.param(b"[]\n", -32600, None, id="empty-batch"),
        pytest.param(b"42\n", -32600, None, id="number"),
        pytest.param(b'"hello"\n', -32600, None, id="string"),
        pytest.param(b'{"jsonrpc": "2.0", "method": "hello"}\n', -32600, None, id="missing-id"),
        pytest.param(b'{"jsonrpc": "2.0", "id": null, "method": "hello"}\n', -32600, None, id="null-id"),
        pytest.param(b'{"jsonrpc": "2.0", "id": 1.5, "method": "hello"}\n', -32600, None, id="float-id"),
        pytest.param(b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "hello"}\n', -32600, None, id="object-id"),
        pytest.param(b'{"jsonrpc": "1.0", "id": 7, "method": "hello"}\n', -32600, 7, id="wrong-version"),
        pytest.param(b'{"id": "eight", "method": "hello"}\n', -32600, "eight", id="missing-version"),
        pytest.param(b'{"jsonrpc": "2.0", "id": 9, "method": 5}\n', -32600, 9, id="method-not-string"),
        pytest.param(b'{"jsonrpc": "2.0", "id": 10}\n', -32600, 10, id="missing-method"),
        pytest.param(b'{"jsonrpc": "2.0", "id": 11, "method": "hello", "x": 1}\n', -32600, 11, id="unknown-member"),
        pytest.param(b'{"jsonrpc": "2.0", "id": 12, "method": "frobnicate"}\n', -32601, 12, id="unknown-method"),
        pytest.param(b'{"jsonrpc": "2.0", "id": "m", "method": "Hello"}\n', -32601, "m", id="method-case"),
        pytest.param(b'{"jsonrpc": "2.0", "id": 13, "method": "__init__"}\n', -32601, 13, id="dunder-method"),
    ],
)
def test_a_bad_envelope_is_answered_and_the_connection_lives_on(
    conn: Connection, payload: bytes, code: int, request_id: object
) -> None:
    conn.send(payload)
    message = conn.receive()
    assert message is not None, "the daemon closed the connection on a non-fatal error"
    assert message["jsonrpc"] == "2.0"
    assert "id" in message and message["id"] == request_id
    assert message["error"]["code"] == code
    assert message["error"]["message"]
    assert_hello(conn)


def test_an_unknown_method_is_told_the_known_ones(conn: Connection) -> None:
    error = conn.error("acquire_everything")
    assert error["code"] == -32601
    assert "acquire_everything" in error["message"]
    assert "release_job" in error["message"]


# -- params ------------------------------------------------------------------------

BAD = job("bad-params")

BAD_PARAMS = [
    pytest.param("hello", {"x": 1}, id="hello-unknown-field"),
    pytest.param("hello", [], id="hello-array-params"),
    pytest.param("acquire", {"adapter": "tree"}, id="acquire-no-job"),
    pytest.param("acquire", {"job": BAD}, id="acquire-no-adapter"),
    pytest.param("acquire", {"job": "", "adapter": "tree"}, id="acquire-empty-job"),
    pytest.param("acquire", {"job": "j" * 257, "adapter": "tree"}, id="acquire-long-job"),
    pytest.param("acquire", {"job": BAD + "\n", "adapter": "tree"}, id="acquire-control-char-job"),
    pytest.param("acquire", {"job": 5, "adapter": "tree"}, id="acquire-number-job"),
    pytest.param("acquire", {"job": BAD, "adapter": ""}, id="acquire-empty-adapter"),
    pytest.param("acquire", {"job": BAD, "adapter": "tree", "detach": True}, id="acquire-detach-no-ttl"),
    pytest.param("acquire", {"job": BAD, "adapter": "tree", "ttl": 5}, id="acquire-ttl-not-detached"),
    pytest.param("acquire", {"job": BAD, "adapter": "tree", "detach": True, "ttl": 0}, id="acquire-zero-ttl"),
    pytest.param("acquire", {"job": BAD, "adapter": "tree", "detach": True, "ttl": -3}, id="acquire-negative-ttl"),
    pytest.param("acquire", {"job": BAD, "adapter": "tree", "fds": "yes"}, id="acquire-fds-string"),
    pytest.param("acquire", {"job": BAD, "adapter": "tree", "params": ["dir"]}, id="acquire-params-array"),
    pytest.param("acquire", {"job": BAD, "adapter": "tree", "params": {"dir": 5}}, id="acquire-param-number"),
    pytest.param("acquire", {"job": BAD, "adapter": "tree", "colour": "red"}, id="acquire-unknown-field"),
    pytest.param("acquire", None, id="acquire-null-params"),
    pytest.param("release", {}, id="release-no-lease"),
    pytest.param("release", {"lease": 42}, id="release-number-lease"),
    pytest.param("release", {"lease": ""}, id="release-empty-lease"),
    pytest.param("release", {"lease": "x" * 129}, id="release-long-lease"),
    pytest.param("renew", {}, id="renew-no-lease"),
    pytest.param("renew", {"lease": "abc", "ttl": 0}, id="renew-zero-ttl"),
    pytest.param("renew", {"lease": "abc", "ttl": "long"}, id="renew-string-ttl"),
    pytest.param("release_job", {}, id="release_job-no-job"),
    pytest.param("release_job", {"job": ""}, id="release_job-empty-job"),
    pytest.param("release_job", {"job": "a\x00b"}, id="release_job-nul-job"),
    pytest.param("status", {"job": 7}, id="status-number-job"),
    pytest.param("status", {"job": "\x1b[31m"}, id="status-escape-job"),
    pytest.param("status", {"all": True}, id="status-unknown-field"),
    pytest.param("status", "everything", id="status-string-params"),
    pytest.param("sweep", {"now": True}, id="sweep-unknown-field"),
    pytest.param("reports", {"limit": 0}, id="reports-zero-limit"),
    pytest.param("reports", {"limit": "ten"}, id="reports-string-limit"),
    pytest.param("reports", {"limit": 1001}, id="reports-huge-limit"),
    pytest.param("logs", {}, id="logs-neither"),
    pytest.param("logs", {"instance": "a", "lease": "b"}, id="logs-both"),
    pytest.param("logs", {"instance": "a", "lines": 0}, id="logs-zero-lines"),
    pytest.param("logs", {"instance": 5}, id="logs-number-instance"),
]


@pytest.mark.parametrize(("method", "params"), BAD_PARAMS)
def test_wrong_params_are_refused_and_the_connection_lives_on(conn: Connection, method: str, params: object) -> None:
    request_id = conn.request(method, params)
    response = conn.response(request_id)
    assert response["error"]["code"] == -32602, response
    assert repr(method) in response["error"]["message"]
    assert_hello(conn)
    assert instances_of(conn, BAD) == []


@pytest.mark.parametrize(
    ("params", "named"),
    [
        pytest.param({"dir": "/tmp", "nope": "x"}, "nope", id="undeclared"),
        pytest.param({}, "dir", id="declared-but-missing"),
        pytest.param({"dir": ""}, "dir", id="empty-value"),
        pytest.param({"dir": "/tmp\nrm"}, "control character", id="control-character"),
    ],
)
def test_adapter_params_the_adapter_cannot_take_are_refused_before_anything_starts(
    shared: SharedDaemon, conn: Connection, params: dict[str, str], named: str
) -> None:
    name = job("params-refused")
    error = conn.error("acquire", {"job": name, "adapter": "tree", "params": params})
    assert error["code"] == -32602
    assert named in error["message"]
    assert instances_of(conn, name) == []
    assert not shared.pidfile(name).exists()
    assert_hello(conn)


def test_a_declared_param_is_substituted_into_the_roots_argv(shared: SharedDaemon, conn: Connection) -> None:
    name = job("params-argv")
    acquired = conn.result("acquire", {"job": name, "adapter": "tree", "params": shared.tree_params()})
    members = read_pidfile(shared.pidfile(name), roles=TREE_ROLES)
    assert members["root"].pid == acquired["pid"]
    cmdline = process.read_cmdline(acquired["pid"])
    assert cmdline[1:] == [TREE, "--pidfile", str(shared.pidfile(name)), "--no-escapee"]
    conn.result("release", {"lease": acquired["lease"]})
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


def test_differing_params_on_a_live_instance_conflict(shared: SharedDaemon, conn: Connection, tmp_path: Path) -> None:
    name = job("params-conflict")
    first = conn.result("acquire", {"job": name, "adapter": "tree", "params": shared.tree_params()})
    members = read_pidfile(shared.pidfile(name), roles=TREE_ROLES)
    error = conn.error("acquire", {"job": name, "adapter": "tree", "params": {"dir": str(tmp_path)}})
    assert error["code"] == 1007
    assert first["instance"] in error["message"]
    assert not (tmp_path / f"{name}.pids").exists()
    # The same params join the live instance.
    joined = conn.result("acquire", {"job": name, "adapter": "tree", "params": shared.tree_params()})
    assert (joined["instance"], joined["spawned"], joined["refcount"]) == (first["instance"], False, 2)
    conn.result("release_job", {"job": name})
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


def test_fds_on_an_adapter_without_pipes_conflict(conn: Connection, shared: SharedDaemon) -> None:
    name = job("fds-null")
    error = conn.error("acquire", {"job": name, "adapter": "tree", "params": shared.tree_params(), "fds": True})
    assert error["code"] == 1007
    assert "stdio" in error["message"]
    assert instances_of(conn, name) == []
    assert not shared.pidfile(name).exists()


# -- message size and pipelining ------------------------------------------------------


def padded_hello(length: int, request_id: int = 1) -> bytes:
    """A valid `hello` line of exactly `length` bytes before its newline."""
    line = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "hello", "params": {}}).encode()
    assert len(line) <= length
    return line + b" " * (length - len(line))


@pytest.mark.parametrize("newline", [b"\n", b""], ids=["whole-line", "no-newline-yet"])
def test_a_line_longer_than_max_message_bytes_is_refused_and_the_connection_closed(
    shared: SharedDaemon, newline: bytes
) -> None:
    connection = Connection(shared.socket)
    try:
        connection.send(padded_hello(MAX_MESSAGE_BYTES + 1) + newline)
        message = connection.receive()
        assert message is not None
        assert message["id"] is None
        assert message["error"]["code"] == -32600
        assert str(MAX_MESSAGE_BYTES) in message["error"]["message"]
        assert connection.closed_by_daemon()
    finally:
        connection.close()
    with Connection(shared.socket) as fresh:
        assert_hello(fresh)


def test_a_line_of_exactly_max_message_bytes_is_served(conn: Connection) -> None:
    conn.send(padded_hello(MAX_MESSAGE_BYTES, request_id=77) + b"\n")
    response = conn.response(77)
    assert response["result"]["protocol"] == 1


def test_pipelined_requests_in_one_send_are_all_answered_with_their_ids(shared: SharedDaemon, conn: Connection) -> None:
    name = job("pipelined")
    requests = [
        ("first", "hello", {}),
        (2, "acquire", {"job": name, "adapter": "tree", "params": shared.tree_params()}),
        (3, "status", {"job": name}),
        (4, "frobnicate", {}),
        (5, "release", {"lease": "no-such-lease"}),
        (6, "logs", {}),
        ("last", "hello", {}),
    ]
    payload = b"".join(
        json.dumps({"jsonrpc": "2.0", "id": i, "method": m, "params": p}).encode() + b"\n" for i, m, p in requests
    )
    conn.send(payload)
    responses = {}
    for _ in requests:
        message = conn.receive()
        assert message is not None
        responses[message["id"]] = message
    assert set(responses) == {i for i, _, _ in requests}
    assert responses["first"]["result"]["protocol"] == 1
    assert responses["last"]["result"]["protocol"] == 1
    assert responses[2]["result"]["job"] == name
    assert "instances" in responses[3]["result"]
    assert responses[4]["error"]["code"] == -32601
    assert responses[5]["error"]["code"] == 1002
    assert responses[6]["error"]["code"] == -32602
    members = read_pidfile(shared.pidfile(name), roles=TREE_ROLES)
    conn.result("release", {"lease": responses[2]["result"]["lease"]})
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


# -- adapters, leases and spawning --------------------------------------------------------


def test_an_unknown_adapter_is_1001_and_names_the_known_ones(conn: Connection) -> None:
    name = job("unknown-adapter")
    error = conn.error("acquire", {"job": name, "adapter": "no-such-adapter"})
    assert error["code"] == 1001
    assert "no-such-adapter" in error["message"]
    assert "tree" in error["message"]
    assert instances_of(conn, name) == []


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("release", {"lease": "no-such-lease"}),
        ("renew", {"lease": "no-such-lease"}),
        ("renew", {"lease": "no-such-lease", "ttl": 5}),
        ("logs", {"lease": "no-such-lease"}),
    ],
)
def test_an_unknown_lease_is_1002(conn: Connection, method: str, params: dict[str, object]) -> None:
    error = conn.error(method, params)
    assert error["code"] == 1002
    assert "lease" in error["message"]
    assert_hello(conn)


def test_a_released_lease_is_unknown_from_then_on(shared: SharedDaemon, conn: Connection) -> None:
    name = job("released-twice")
    acquired = conn.result("acquire", {"job": name, "adapter": "tree", "params": shared.tree_params()})
    members = read_pidfile(shared.pidfile(name), roles=TREE_ROLES)
    assert conn.result("release", {"lease": acquired["lease"]}) == {"refcount": 0, "stopping": True}
    for method in ("release", "renew", "logs"):
        assert conn.error(method, {"lease": acquired["lease"]})["code"] == 1002
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


@pytest.mark.parametrize(
    ("adapter", "fragments"),
    [
        ("missing-exe", ["/nonexistent/adapter-binary", "No such file or directory"]),
        ("missing-cwd", ["/nonexistent-cwd/of/adapter", "No such file or directory"]),
        ("not-executable", ["not-executable.sh", "Permission denied"]),
    ],
)
def test_a_spawn_failure_is_1003_with_the_os_reason_and_leaves_nothing_behind(
    shared: SharedDaemon, conn: Connection, adapter: str, fragments: list[str]
) -> None:
    name = job(f"spawn-{adapter}")
    leases_before = conn.result("status")["daemon"]["leases"]
    error = conn.error("acquire", {"job": name, "adapter": adapter})
    assert error["code"] == 1003
    for fragment in fragments:
        assert fragment in error["message"]
    assert instances_of(conn, name) == []
    assert conn.result("status")["daemon"]["leases"] == leases_before
    # Nothing is stuck: the same acquire fails the same way again...
    assert conn.error("acquire", {"job": name, "adapter": adapter})["code"] == 1003
    # ... and another adapter for the same job starts fine.
    good = conn.result("acquire", {"job": name, "adapter": "tree", "params": shared.tree_params()})
    assert good["spawned"] is True
    members = read_pidfile(shared.pidfile(name), roles=TREE_ROLES)
    conn.result("release", {"lease": good["lease"]})
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


def test_max_instances_is_1004_until_an_instance_is_gone(shared: SharedDaemon, conn: Connection) -> None:
    first_job, second_job = job("single-1"), job("single-2")
    first = conn.result("acquire", {"job": first_job, "adapter": "single", "params": shared.tree_params()})
    members = read_pidfile(shared.pidfile(first_job), roles=TREE_ROLES)
    error = conn.error("acquire", {"job": second_job, "adapter": "single", "params": shared.tree_params()})
    assert error["code"] == 1004
    assert "max_instances" in error["message"]
    assert instances_of(conn, second_job) == []
    # Joining the live instance is not a new instance.
    assert conn.result("acquire", {"job": first_job, "adapter": "single", "params": shared.tree_params()})["refcount"] == 2
    conn.result("release_job", {"job": first_job})
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}

    def acquire_second() -> dict[str, Any] | None:
        response = conn.call("acquire", {"job": second_job, "adapter": "single", "params": shared.tree_params()})
        return response.get("result")

    second = eventually(acquire_second, timeout=2.0)
    assert second and second["instance"] != first["instance"]
    second_members = read_pidfile(shared.pidfile(second_job), roles=TREE_ROLES)
    conn.result("release", {"lease": second["lease"]})
    assert wait_all_gone(second_members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


# -- detached leases -------------------------------------------------------------------


def test_renewing_a_bound_lease_is_invalid_params(shared: SharedDaemon, conn: Connection) -> None:
    name = job("renew-bound")
    acquired = conn.result("acquire", {"job": name, "adapter": "tree", "params": shared.tree_params()})
    members = read_pidfile(shared.pidfile(name), roles=TREE_ROLES)
    error = conn.error("renew", {"lease": acquired["lease"]})
    assert error["code"] == -32602
    assert "detached" in error["message"]
    conn.result("release", {"lease": acquired["lease"]})
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


def test_a_detached_lease_expires_after_its_ttl_unless_renewed(shared: SharedDaemon, conn: Connection) -> None:
    expiring, renewed = job("ttl-expiring"), job("ttl-renewed")
    start = time.monotonic()
    leases = {
        name: conn.result(
            "acquire", {"job": name, "adapter": "tree", "params": shared.tree_params(), "detach": True, "ttl": 1}
        )
        for name in (expiring, renewed)
    }
    assert leases[expiring]["expires_at"] == pytest.approx(time.time() + 1, abs=0.5)
    members = {expiring: read_pidfile(shared.pidfile(expiring), roles=TREE_ROLES)}
    expires_at = leases[renewed]["expires_at"]
    for renew_at in (0.5, 1.0):
        time.sleep(max(0.0, start + renew_at - time.monotonic()))
        # Without a ttl, a renewal extends by the lease's own ttl.
        renewal = conn.result("renew", {"lease": leases[renewed]["lease"]})
        assert renewal["expires_at"] > expires_at
        expires_at = renewal["expires_at"]
    members[renewed] = read_pidfile(shared.pidfile(renewed), roles=TREE_ROLES)
    time.sleep(max(0.0, start + 1.5 - time.monotonic()))

    assert conn.error("release", {"lease": leases[expiring]["lease"]})["code"] == 1002
    assert conn.error("renew", {"lease": leases[expiring]["lease"]})["code"] == 1002
    assert wait_all_gone(members[expiring], shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}
    # Past its first ttl, the renewed lease and its tree are still there.
    assert all(process.is_running(m) for m in members[renewed].values())
    assert conn.result("release", {"lease": leases[renewed]["lease"]}) == {"refcount": 0, "stopping": True}
    assert wait_all_gone(members[renewed], shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


def test_renew_with_a_ttl_sets_the_expiry_from_now(shared: SharedDaemon, conn: Connection) -> None:
    name = job("renew-ttl")
    acquired = conn.result(
        "acquire", {"job": name, "adapter": "tree", "params": shared.tree_params(), "detach": True, "ttl": 5}
    )
    members = read_pidfile(shared.pidfile(name), roles=TREE_ROLES)
    renewal = conn.result("renew", {"lease": acquired["lease"], "ttl": 600})
    assert renewal["expires_at"] == pytest.approx(time.time() + 600, abs=5)
    conn.result("release", {"lease": acquired["lease"]})
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}


# -- logs ------------------------------------------------------------------------------


def test_logs_return_the_adapters_stderr_by_instance_and_by_lease(shared: SharedDaemon, conn: Connection) -> None:
    name = job("logs")
    acquired = conn.result("acquire", {"job": name, "adapter": "tree", "params": shared.tree_params()})
    members = read_pidfile(shared.pidfile(name), roles=TREE_ROLES)
    by_instance = eventually(lambda: conn.result("logs", {"instance": acquired["instance"]})["lines"])
    assert by_instance == ["root ready"]
    assert conn.result("logs", {"lease": acquired["lease"]})["lines"] == ["root ready"]
    conn.result("release", {"lease": acquired["lease"]})
    assert wait_all_gone(members, shared.daemon.pid, STOP_TIMEOUT + 1.0) == {}
    # The tail outlives the tree, for the post-mortem.
    assert conn.result("logs", {"instance": acquired["instance"], "lines": 1})["lines"] == ["root ready"]


def test_logs_of_an_unknown_instance_are_refused(conn: Connection) -> None:
    error = conn.error("logs", {"instance": "0123456789ab"})
    assert error["code"] == -32602
    assert "0123456789ab" in error["message"]
    assert_hello(conn)


def test_the_socket_file_has_socket_mode(shared: SharedDaemon) -> None:
    mode = os.stat(shared.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


# -- connection limits -----------------------------------------------------------------


def test_a_connection_over_max_connections_gets_1004_and_is_closed(start_daemon) -> None:
    daemon = start_daemon(max_connections=2)
    first = Connection(daemon.socket)
    try:
        # The start-up probe's connection may still be counted for a moment.
        assert eventually(lambda: first.result("status")["daemon"]["connections"] == 1, timeout=2.0)
        second = Connection(daemon.socket)
        assert_hello(second)
        third = Connection(daemon.socket)
        message = third.receive()
        assert message is not None and message["id"] is None
        assert message["error"]["code"] == 1004
        assert "max_connections" in message["error"]["message"]
        assert third.closed_by_daemon()
        third.close()
        assert_hello(first)
        assert_hello(second)
        second.close()

        def served() -> bool:
            with Connection(daemon.socket) as fourth:
                fourth.request("hello")
                message = fourth.receive()  # the result, or a refusal without id
                return message is not None and "result" in message

        assert eventually(served, timeout=2.0)
    finally:
        first.close()


# -- authorization -----------------------------------------------------------------------

# Runs as uid/gid 65534: imports first (the interpreter's files are under
# /root), then drops privileges, connects, and sends each request in turn.
PEER_SCRIPT = r"""
import json, os, socket, sys
path, requests, groups = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
os.setgroups(groups)
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(path)
buffer, responses, closed = b"", [], False

def next_message():
    global buffer
    while b"\n" not in buffer:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        buffer += chunk
    line, buffer = buffer.split(b"\n", 1)
    return json.loads(line)

for number, (method, params) in enumerate(requests, 1):
    try:
        sock.sendall(json.dumps({"jsonrpc": "2.0", "id": number, "method": method, "params": params}).encode() + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    while True:
        message = next_message()
        if message is None:
            closed = True
            break
        if "id" in message:
            responses.append(message)
            break
    if closed:
        break
print(json.dumps({"uid": os.getuid(), "responses": responses, "closed": closed}))
"""


def run_as_nobody(
    path: str, requests: list[tuple[str, dict[str, object]]], groups: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Send `requests` over one connection as uid 65534 (with supplementary
    `groups`); the responses and whether the daemon hung up."""
    completed = subprocess.run(
        [PYTHON, "-c", PEER_SCRIPT, path, json.dumps(requests), json.dumps(list(groups))],
        check=False, capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout)
    assert outcome["uid"] == NOBODY
    return outcome


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory that uid 65534 can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="as-auth-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_public_daemon(start_daemon, public_dir: Path, adapters: str = "", **settings: object) -> DaemonProcess:
    """A daemon whose socket (mode 0666) is in `public_dir`."""
    path = str(public_dir / "d.sock")
    daemon = start_daemon(adapters, wait=False, socket=path, socket_mode="0666", **settings)
    daemon.socket = path
    wait_for_socket(path, daemon.popen, daemon.log_path, DAEMON_START_TIMEOUT_S)
    return daemon


def test_a_peer_whose_uid_is_not_allowed_gets_1005_and_is_disconnected(start_daemon, public_dir: Path) -> None:
    daemon = start_public_daemon(start_daemon, public_dir)
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o666
    outcome = run_as_nobody(daemon.socket, [("hello", {}), ("status", {})])
    assert len(outcome["responses"]) == 1
    refusal = outcome["responses"][0]
    assert refusal["id"] is None
    assert refusal["error"]["code"] == 1005
    assert str(NOBODY) in refusal["error"]["message"]
    assert outcome["closed"] is True
    refused = daemon.wait_for_event("connection.refused", uid=NOBODY)
    assert refused["code"] == 1005
    with Connection(daemon.socket) as connection:
        assert_hello(connection)


@pytest.mark.parametrize("setting", ["allowed_uids", "allowed_gids"])
def test_a_peer_in_allowed_uids_or_gids_is_served(start_daemon, public_dir: Path, setting: str) -> None:
    daemon = start_public_daemon(start_daemon, public_dir, **{setting: [NOBODY]})
    outcome = run_as_nobody(daemon.socket, [("hello", {}), ("status", {})])
    assert outcome["closed"] is False
    hello, status = outcome["responses"]
    assert hello["result"]["protocol"] == 1
    assert status["result"]["daemon"]["pid"] == daemon.pid


def test_a_peer_is_served_through_a_supplementary_group_in_allowed_gids(start_daemon, public_dir: Path) -> None:
    daemon = start_public_daemon(start_daemon, public_dir, allowed_gids=[4242])
    refused = run_as_nobody(daemon.socket, [("hello", {})])
    assert refused["responses"][0]["error"]["code"] == 1005
    served = run_as_nobody(daemon.socket, [("hello", {})], groups=(4242,))
    assert served["closed"] is False and served["responses"][0]["result"]["protocol"] == 1


def test_another_uid_cannot_release_renew_or_release_the_job_of_roots_lease(
    start_daemon, public_dir: Path, tmp_path: Path
) -> None:
    root_pids, nobody_pids = tmp_path / "root.pids", tmp_path / "nobody.pids"
    adapters = tree_adapter("rooted", pidfile=root_pids, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    adapters += tree_adapter("other", pidfile=nobody_pids, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    daemon = start_public_daemon(start_daemon, public_dir, adapters, allowed_uids=[NOBODY])
    with Connection(daemon.socket) as root:
        held = root.result("acquire", {"job": "root-job", "adapter": "rooted", "detach": True, "ttl": 60})
        root_members = read_pidfile(root_pids, roles=TREE_ROLES)
        outcome = run_as_nobody(
            daemon.socket,
            [
                ("release", {"lease": held["lease"]}),
                ("renew", {"lease": held["lease"]}),
                ("release_job", {"job": "root-job"}),
                ("acquire", {"job": "nobody-job", "adapter": "other", "detach": True, "ttl": 60}),
            ],
        )
        release, renew, release_job, acquire = outcome["responses"]
        for refused in (release, renew, release_job):
            assert refused["error"]["code"] == 1005, refused
            assert "uid 0" in refused["error"]["message"]
        assert outcome["closed"] is False
        # Nothing of root's was touched.
        assert root.result("status", {"job": "root-job"})["instances"][0]["refcount"] == 1
        assert all(process.is_running(m) for m in root_members.values())
        # uid 65534's own detached lease outlived its connection; root may release it.
        nobody_members = read_pidfile(nobody_pids, roles=TREE_ROLES)
        assert root.result("release", {"lease": acquire["result"]["lease"]})["refcount"] == 0
        assert root.result("release", {"lease": held["lease"]})["refcount"] == 0
        assert wait_all_gone(root_members | {f"n-{r}": m for r, m in nobody_members.items()}, daemon.pid, STOP_TIMEOUT + 1.0) == {}


# Runs as uid 65534: acquires a bound lease, prints the answer, then prints
# every message until the daemon ends the connection.
HOLDER_SCRIPT = r"""
import json, os, socket, sys
path, adapter = sys.argv[1], sys.argv[2]
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(20)  # a daemon that never drops it fails the test, not hangs it
sock.connect(path)
sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "acquire",
                         "params": {"job": "held", "adapter": adapter}}).encode() + b"\n")
reader = sock.makefile("rb")
for line in reader:
    print(line.decode().strip(), flush=True)
print("closed", flush=True)
"""


def test_a_uid_a_reload_no_longer_allows_loses_its_connection_and_bound_leases(
    start_daemon, public_dir: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "held.pids"
    adapters = tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    daemon = start_public_daemon(start_daemon, public_dir, adapters, allowed_uids=[NOBODY])
    holder = subprocess.Popen([PYTHON, "-c", HOLDER_SCRIPT, daemon.socket, "tree"], stdout=subprocess.PIPE, text=True)
    try:
        granted = json.loads(holder.stdout.readline())
        assert "result" in granted, granted
        members = read_pidfile(pidfile, roles=TREE_ROLES)
        config = daemon.config_path.read_text()
        assert f"allowed_uids = [{NOBODY}]" in config
        daemon.config_path.write_text(config.replace(f"allowed_uids = [{NOBODY}]", "allowed_uids = []"))
        daemon.popen.send_signal(signal.SIGHUP)
        refusal = json.loads(holder.stdout.readline())
        assert refusal["id"] is None and refusal["error"]["code"] == 1005, refusal
        assert "no longer" in refusal["error"]["message"]
        assert holder.stdout.readline().strip() == "closed"
        # Its bound lease went with the connection: the tree is stopped.
        assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 2.0) == {}
        with daemon.client() as root:
            assert eventually(lambda: root.call("status")["instances"] == [])
    finally:
        holder.kill()
        holder.wait()
