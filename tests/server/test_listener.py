"""The control server's read and send paths, against a real daemon over its real
socket: pipelined lines, peers that stop reading, lines the socket cannot take
at once (with notifications waiting behind them, or fds riding on them), and a
client that half-closes with requests still in flight; then, on a socket pair,
the send invariants whose windows no test through a daemon can hit on purpose.

The daemon answers with a plain non-blocking send when the socket has room and
falls back to waiting (under the send lock and send_timeout) only when it does
not; these tests make the socket full on purpose so that the second path runs.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import stat
import struct
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from supervisor.server import methods
from supervisor.core.config import parse_config
from supervisor.server.connection import Connection
from supervisor.engine.engine import Engine
from supervisor.engine.operation import Reply
from supervisor.server.controlsocket import bind_control_socket
from supervisor.server.listener import ControlServer
from tests.conftest import eventually

# Far more response bytes than a Unix socket holds (the daemon's send buffer,
# net.core.wmem_default, is about 208 KiB; a `status` answer with no instances
# is about 330 bytes): pipelining this many `status` requests without reading
# leaves the daemon in the middle of a line.
STATUS_FLOOD = 3000

# How long a stubborn adapter's stop takes (see `stubborn_adapter`).
STUBBORN_STOP_S = 1.0

# A line longer than any socket buffer: sending it always leaves it cut off.
HUGE_LINE = b'"' + b"x" * (8 << 20) + b'"\n'

# Room for the two fds an `acquire` with fds passes.
FDS_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)


def request_line(request_id: object, method: str, params: dict[str, Any] | None = None) -> bytes:
    envelope = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
    return json.dumps(envelope).encode() + b"\n"


def status_flood(first_id: int, count: int = STATUS_FLOOD) -> bytes:
    return b"".join(request_line(i, "status") for i in range(first_id, first_id + count))


@dataclass
class Chunk:
    """What one recvmsg returned: where its bytes start in the stream, and the fds."""

    offset: int
    data: bytes
    fds: list[int]


@dataclass
class RawClient:
    """A blocking connection that keeps every byte and fd it receives, in order."""

    sock: socket.socket
    stream: bytearray = field(default_factory=bytearray)
    chunks: list[Chunk] = field(default_factory=list)
    parsed: int = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 20.0) -> RawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def queued_bytes(self) -> int:
        """Bytes the daemon has sent that this client has not read yet."""
        return struct.unpack("i", fcntl.ioctl(self.sock, termios.FIONREAD, b"\0\0\0\0"))[0]

    def receive(self) -> bool:
        """Read once; False at the end of the stream."""
        data, ancillary, _, _ = self.sock.recvmsg(65536, FDS_SPACE)
        if not data:
            return False
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += array.array("i", payload[: len(payload) - len(payload) % 4])
        self.chunks.append(Chunk(len(self.stream), data, fds))
        self.stream += data
        return True

    def messages(self, count: int) -> list[dict[str, Any]]:
        """The next `count` lines, each decoded on its own (a line with another
        one's bytes inside it fails to decode)."""
        found: list[dict[str, Any]] = []
        while len(found) < count:
            newline = self.stream.find(b"\n", self.parsed)
            if newline == -1:
                assert self.receive(), f"the daemon closed the connection after {len(found)} of {count} lines"
                continue
            found.append(json.loads(self.stream[self.parsed : newline]))
            self.parsed = newline + 1
        return found

    def line_start(self, request_id: object) -> int:
        """Where in the stream the response to `request_id` begins."""
        marker = b'{"jsonrpc":"2.0","id":' + json.dumps(request_id).encode() + b","
        start = self.stream.find(marker)
        assert start != -1, f"no response to {request_id!r}"
        return start

    def close(self) -> None:
        for chunk in self.chunks:
            for fd in chunk.fds:
                os.close(fd)
            chunk.fds = []
        self.sock.close()


@pytest.fixture
def raw_clients() -> Iterator[list[RawClient]]:
    """Raw clients to open with `RawClient.connect`; closed (with any fds they got) at teardown."""
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        client.close()


def test_two_hundred_pipelined_status_requests_get_two_hundred_answers_in_order(start_daemon, raw_clients) -> None:
    daemon = start_daemon()
    client = RawClient.connect(daemon.socket)
    raw_clients.append(client)
    client.send(status_flood(1, 200))
    answers = client.messages(200)
    # `status` is answered by the connection's reader, line by line, so the
    # answers come back in the order the requests were written.
    assert [answer["id"] for answer in answers] == list(range(1, 201))
    assert all(answer["result"]["daemon"]["pid"] == daemon.pid for answer in answers)
    client.send(request_line("last", "hello"))
    assert client.messages(1)[0]["id"] == "last"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_clients_in_lockstep_and_one_that_pauses_are_all_answered(start_daemon, raw_clients) -> None:
    # Eight clients, one request in flight each, for many rounds: the hub
    # takes to looking for input after the other tasks ran instead of waiting
    # for readiness. Then one client pauses before its next request: the hub
    # finds nothing there and must go back to waiting, not spin or stall.
    daemon = start_daemon()
    clients = [RawClient.connect(daemon.socket) for _ in range(8)]
    raw_clients.extend(clients)
    for round_number in range(200):
        for index, client in enumerate(clients):
            client.send(request_line(f"{index}-{round_number}", "status"))
        for index, client in enumerate(clients):
            assert client.messages(1)[0]["id"] == f"{index}-{round_number}"
    late = clients[0]
    cpu_before = cpu_seconds(daemon.pid)
    time.sleep(0.5)
    # Waiting, not polling: the idle daemon used (almost) no CPU meanwhile.
    assert cpu_seconds(daemon.pid) - cpu_before < 0.1
    late.send(request_line("late", "hello"))
    assert late.messages(1)[0]["id"] == "late"
    for index, client in enumerate(clients[1:], start=1):
        client.send(request_line(f"after-{index}", "status"))
        assert client.messages(1)[0]["id"] == f"after-{index}"


def test_a_peer_that_stops_reading_holds_up_nobody_and_is_dropped_after_send_timeout(start_daemon) -> None:
    send_timeout = 3.0
    daemon = start_daemon(send_timeout=send_timeout)
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.connect(daemon.socket)
    hog.setblocking(False)
    try:
        flood = status_flood(1, 200)
        # Write until the daemon takes no more: it stopped reading because its
        # answers to the hog no longer fit, and it is now waiting for room.
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the daemon kept reading a peer that never reads"
            try:
                hog.send(flood)
            except BlockingIOError:
                break
        stalled_at = time.monotonic()
        client = daemon.client()
        for _ in range(50):
            assert client.call("status")["daemon"]["pid"] == daemon.pid
        served_in = time.monotonic() - stalled_at
        assert served_in < send_timeout, f"another client waited {served_in:.2f} s behind the stalled peer"
        assert not [e for e in daemon.log_events() if e.get("event") == "connection.send_timeout"]
        daemon.wait_for_event("connection.send_timeout", timeout=send_timeout + 10)
        # Dropped for not reading, not for anything sooner (the daemon's clock
        # started a little before the hog's writes blocked).
        assert time.monotonic() - stalled_at >= send_timeout * 0.5
        # The hog gets what was already queued for it, then the end of the stream.
        hog.setblocking(True)
        hog.settimeout(10)
        while True:
            try:
                if not hog.recv(1 << 20):
                    break
            except ConnectionResetError:
                break
        assert client.call("hello")["pid"] == daemon.pid
    finally:
        hog.close()


def test_a_line_cut_by_a_full_socket_is_finished_before_notifications_are_sent(start_daemon, raw_clients) -> None:
    instances = 20
    daemon = start_daemon('[adapters.brief]\ncommand = ["/bin/sleep", "2"]\nstop_timeout = 0.5\n')
    client = RawClient.connect(daemon.socket)
    raw_clients.append(client)
    client.send(b"".join(request_line(f"a{i}", "acquire", {"job": f"job-{i}", "adapter": "brief"}) for i in range(instances)))
    assert all("result" in answer for answer in client.messages(instances))
    # Twenty rows make each answer about 5 KiB: the daemon fills the socket,
    # stops in the middle of a line and waits for room while the instances exit.
    statuses = 300
    client.send(status_flood(1, statuses))
    assert eventually(
        lambda: sum(e.get("event") == "adapter.root_exited" for e in daemon.log_events()) == instances, timeout=20
    )
    time.sleep(0.2)  # the notifications' sends queue up behind the cut line
    waiting = client.queued_bytes()
    messages = client.messages(statuses + instances)
    assert waiting < len(client.stream), "the socket never filled: nothing was sent in pieces"
    answers = [m for m in messages if "id" in m]
    notifications = [m for m in messages if "id" not in m]
    assert [answer["id"] for answer in answers] == list(range(1, statuses + 1))
    assert all("result" in answer for answer in answers)
    assert sorted(n["params"]["job"] for n in notifications) == sorted(f"job-{i}" for i in range(instances))
    assert {n["method"] for n in notifications} == {"adapter_exited"}


def queue_settles(client: RawClient, quiet_s: float = 0.05) -> int:
    """The bytes queued for `client` once that figure holds still for `quiet_s`."""
    queued = client.queued_bytes()
    while True:
        time.sleep(quiet_s)
        now = client.queued_bytes()
        if now == queued:
            return now
        queued = now


def test_a_line_the_hub_cuts_off_is_finished_by_the_connections_task(start_daemon, raw_clients) -> None:
    # Batches of `hello`, each taken by the hub in one read and answered in
    # one turn (fewer lines than ANSWERS_PER_TURN), until the socket is full:
    # the hub then cannot send a line whole, and hands the connection, with
    # the send lock held for that line, to its task. The task finishes the
    # line once the peer reads, then serves the lines queued behind it.
    batch = 24
    daemon = start_daemon()
    client = RawClient.connect(daemon.socket)
    raw_clients.append(client)
    shortest_answer = len(json.dumps({"jsonrpc": "2.0", "id": 0, "result": {}}))
    sent = 0
    while True:
        assert sent < 20000, "the socket never filled"
        queued = client.queued_bytes()
        client.send(b"".join(request_line(i, "hello") for i in range(sent, sent + batch)))
        sent += batch
        if queue_settles(client) - queued < batch * shortest_answer:
            break  # the batch was cut short: the socket is full
    client.send(b"".join(request_line(i, "hello") for i in range(sent, sent + batch)))
    sent += batch
    waiting = queue_settles(client)
    answers = client.messages(sent)
    assert waiting < len(client.stream), "nothing waited for room"
    assert [answer["id"] for answer in answers] == list(range(sent))
    assert all(answer["result"]["pid"] == daemon.pid for answer in answers)
    client.send(request_line("after", "status"))
    assert client.messages(1)[0]["result"]["daemon"]["pid"] == daemon.pid


def stubborn_adapter(name: str) -> str:
    """An adapter whose tree ignores SIGTERM: stopping it takes the whole
    stop_timeout, and an acquire of the same job waits that long for its
    predecessor to be gone (a request that stays in flight for a second)."""
    command = ["/bin/sh", "-c", "trap '' TERM; echo stubborn >&2; while :; do sleep 0.1; done"]
    return f'[adapters.{name}]\ncommand = {json.dumps(command)}\nstdio = "pipe"\nstop_timeout = {STUBBORN_STOP_S}\n'


def acquire_and_release(client: RawClient, acquire: dict[str, Any]) -> None:
    """Acquire (answered at once) and release: the instance is now stopping,
    slowly, and the next acquire of its job waits for it."""
    client.send(request_line("first", "acquire", acquire))
    lease = client.messages(1)[0]["result"]["lease"]
    # The reply comes once the shell is exec'd, maybe before it ran `trap`: a
    # SIGTERM then would end it at once. Its stderr line says the trap is set.

    def stubborn_yet() -> bool:
        client.send(request_line("logs", "logs", {"lease": lease}))
        return "stubborn" in client.messages(1)[0]["result"]["lines"]

    assert eventually(stubborn_yet, timeout=5)
    client.send(request_line("release", "release", {"lease": lease}))
    assert client.messages(1)[0]["result"]["stopping"] is True


def test_fds_ride_on_the_first_byte_of_a_line_that_waited_for_room(start_daemon, raw_clients) -> None:
    daemon = start_daemon(stubborn_adapter("piped"))
    client = RawClient.connect(daemon.socket)
    raw_clients.append(client)
    acquire = {"job": "piped-job", "adapter": "piped", "fds": True}
    acquire_and_release(client, acquire)
    # The second acquire is answered once the first tree is gone; by then the
    # status flood behind it has filled the socket, so its line (and its fds)
    # wait for the send lock and for room.
    client.send(request_line("second", "acquire", acquire) + status_flood(1))
    assert eventually(lambda: sum(e.get("event") == "lease.acquired" for e in daemon.log_events()) == 2, timeout=20)
    time.sleep(0.2)
    waiting = client.queued_bytes()
    messages = client.messages(STATUS_FLOOD + 1)
    assert waiting < len(client.stream), "the socket never filled: the acquire's line did not wait for room"
    assert sorted(str(m["id"]) for m in messages) == sorted(["second", *map(str, range(1, STATUS_FLOOD + 1))])
    carriers = [chunk for chunk in client.chunks if chunk.fds]
    assert [len(chunk.fds) for chunk in carriers] == [2, 2]
    first, second = carriers
    assert first.offset <= client.line_start("first") < first.offset + len(first.data)
    assert second.offset <= client.line_start("second") < second.offset + len(second.data)
    assert [stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in second.fds] == [True, True]


def test_a_client_that_half_closes_still_gets_every_answer(start_daemon, raw_clients) -> None:
    daemon = start_daemon(stubborn_adapter("slow"))
    client = RawClient.connect(daemon.socket)
    raw_clients.append(client)
    acquire = {"job": "slow-job", "adapter": "slow"}
    acquire_and_release(client, acquire)
    # The acquire stays in flight (in a task of its own) for about a second
    # after the end of input; the statuses are answered by the reader at once.
    client.send(request_line("second", "acquire", acquire) + status_flood(1, 5))
    client.sock.shutdown(socket.SHUT_WR)
    answers = client.messages(6)
    assert [answer["id"] for answer in answers] == [1, 2, 3, 4, 5, "second"]
    assert all("result" in answer for answer in answers)
    assert not client.receive(), "the daemon kept the connection open after answering"


# -- Connection.send on a socketpair -------------------------------------------------
#
# The windows below (room appears while a cut-off line's sender has not run yet;
# a cancellation in the middle of a line) cannot be hit on purpose through a
# daemon, so these drive a Connection directly, on a real socket pair.


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.settimeout(10)
    yield ours, theirs
    ours.close()
    theirs.close()


def connection_on(sock: socket.socket, nursery: trio.Nursery) -> Connection:
    return Connection(id=1, sock=sock, pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), notify_nursery=nursery)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(1 << 20, size - len(data)))
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def test_no_line_starts_while_another_is_cut_off(socket_pair, nursery) -> None:
    ours, theirs = socket_pair
    connection = connection_on(ours, nursery)
    nursery.start_soon(connection.send, HUGE_LINE)
    await trio.testing.wait_all_tasks_blocked()
    assert connection.sending, "the huge line went whole"
    # Room for more, while the huge line's sender has not run again yet: a
    # send now must wait its turn (and be cancelled while waiting), not slip
    # its bytes into the gap.
    start = theirs.recv(65536)
    with trio.CancelScope() as scope:
        scope.cancel()
        await connection.send(b'"notification"\n')
    rest = await trio.to_thread.run_sync(read_exactly, theirs, len(HUGE_LINE) - len(start))
    assert start + rest == HUGE_LINE
    await trio.testing.wait_all_tasks_blocked()
    assert not connection.closed and not connection.sending


async def test_a_send_cancelled_mid_line_closes_the_connection_and_frees_the_lock(socket_pair, nursery) -> None:
    ours, theirs = socket_pair
    connection = connection_on(ours, nursery)
    with trio.move_on_after(0.1) as scope:
        await connection.send(HUGE_LINE)
    assert scope.cancelled_caught
    assert connection.closed, "a cut-off line left the connection open to more lines"
    assert not connection.sending
    received = await trio.to_thread.run_sync(lambda: b"".join(iter(lambda: theirs.recv(1 << 20), b"")))
    assert 0 < len(received) < len(HUGE_LINE)


# -- A handler's bug, served in process ----------------------------------------------


async def test_a_result_that_cannot_be_encoded_is_an_internal_error_and_the_server_lives_on(
    tmp_path, nursery, monkeypatch
) -> None:
    """The hub answers `hello` on the spot; a bug that makes its result
    unencodable must become the usual internal error on that one request,
    not an exception out of the hub's task (which serves every connection)."""
    config = parse_config(f'[daemon]\nstate_dir = "{tmp_path}"\ncgroup = "off"\n', str(tmp_path / "s.toml"))
    server = ControlServer(Engine(config))
    listener = await bind_control_socket(str(tmp_path / "s.sock"), 0o600)
    await nursery.start(server.serve, listener)
    unencodable = msgspec.structs.replace(
        methods.METHODS["hello"], now=lambda engine, peer, params: Reply({"unencodable": object()})
    )
    monkeypatch.setitem(methods.METHODS, "hello", unencodable)
    stream = await trio.open_unix_socket(str(tmp_path / "s.sock"))
    await stream.send_all(request_line(1, "hello") + request_line(2, "release", {"lease": "0" * 32}))
    received = b""
    with trio.fail_after(5):
        while received.count(b"\n") < 2:
            received += await stream.receive_some(65536)
    first, second = (json.loads(line) for line in received.splitlines())
    assert first["id"] == 1 and first["error"]["code"] == -32603
    assert "internal error" in first["error"]["message"]
    assert second["id"] == 2 and second["error"]["code"] == 1002
    await stream.aclose()
