"""The Python client: `Client` and `AsyncClient` (under asyncio and Trio)
against the real daemon (the sans-IO session on plain bytes is in
test_session.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.procs import process
from supervisor.client import (
    AdapterExited,
    AsyncClient,
    Client,
    Conflict,
    ConnectionLost,
    InvalidParams,
    Lease,
    LeaseLost,
    LimitReached,
    MethodNotFound,
    SpawnFailed,
    UnknownAdapter,
    UnknownLease,
)
from tests.conftest import (
    PYTHON,
    DaemonProcess,
    eventually,
    read_pidfile,
    tree_adapter,
    wait_all_gone,
)

STOP_TIMEOUT = 0.5
BACKENDS = ["asyncio", "trio"]
SLEEPER = '[adapters.sleeper]\ncommand = ["/bin/sleep", "3600"]\nstop_timeout = 0.5\n'


def gone(pid: int, daemon: DaemonProcess) -> bool:
    identity = process.identify(pid)
    return identity is None or process.is_gone(identity, our_pid=daemon.pid)


def settled(client: Client) -> bool:
    status = client.status()
    return status["daemon"]["leases"] == 0 and status["instances"] == []


# -- the blocking client -------------------------------------------------------------


def test_one_client_shared_by_32_threads_gets_every_answer_to_its_own_request(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    client = daemon.client()
    barrier = threading.Barrier(32)
    pids: dict[int, set[int]] = {}
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        job = f"job-{index % 8}"
        try:
            barrier.wait(timeout=10)
            with client.lease(job, "sleeper") as lease:
                assert (lease.job, lease.adapter) == (job, "sleeper")
                rows = client.status(job)["instances"]
                assert [row["job"] for row in rows] == [job] and rows[0]["refcount"] >= 1
                assert client.hello()["server"] == "adapter-supervisor"
                pids.setdefault(index % 8, set()).add(lease.pid)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    assert sorted(pids) == list(range(8))
    assert eventually(lambda: settled(client)), client.status()
    assert all(gone(pid, daemon) for group in pids.values() for pid in group)


def test_a_lease_is_released_when_the_body_raises_and_its_pipes_work(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "echo.pids"
    daemon = start_daemon(tree_adapter("echo", pidfile=pidfile, args=("--echo", "--no-escapee"), stdio="pipe", stop_timeout=STOP_TIMEOUT))
    client = daemon.client()
    with pytest.raises(RuntimeError, match="job failed"), client.lease("job-1", "echo", fds=True) as lease:
        assert lease.stdin is not None and lease.stdout is not None
        lease.stdin.write(b"ping\n")
        lease.stdin.flush()
        assert lease.stdout.readline() == b"ping\n"
        members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
        raise RuntimeError("job failed")
    assert lease.released and lease.stdin.closed
    assert client.status()["daemon"]["leases"] == 0
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}


def test_the_daemons_errors_arrive_as_named_exceptions_with_its_message(start_daemon, tmp_path: Path) -> None:
    adapters = SLEEPER + (
        '[adapters.single]\ncommand = ["/bin/sleep", "3600"]\nmax_instances = 1\nstop_timeout = 0.5\n'
        f'[adapters.broken]\ncommand = ["{tmp_path}/no-such-program"]\n'
    )
    daemon = start_daemon(adapters)
    client = daemon.client()
    with pytest.raises(UnknownAdapter, match="no adapter named 'missing'") as unknown:
        client.acquire("job-1", "missing")
    assert unknown.value.code == 1001 and "sleeper" in unknown.value.message
    with pytest.raises(Conflict, match="stdio"):
        client.acquire("job-1", "sleeper", fds=True)
    with pytest.raises(SpawnFailed, match="no-such-program"):
        client.acquire("job-1", "broken")
    with client.lease("job-1", "single"), pytest.raises(LimitReached, match="max_instances"):
        client.acquire("job-2", "single")
    with pytest.raises(UnknownLease):
        client.release("no-such-lease")
    with pytest.raises(InvalidParams, match="detach"):
        client.call("acquire", {"job": "job-1", "adapter": "sleeper", "ttl": 5})
    with pytest.raises(MethodNotFound):
        client.call("frobnicate")
    assert eventually(lambda: settled(client))


def test_adapter_exits_reach_the_lease_they_concern(start_daemon, tmp_path: Path) -> None:
    adapters = SLEEPER + tree_adapter("brief", pidfile=tmp_path / "brief.pids", args=("--exit-after", "0.3", "--no-escapee"), stop_timeout=STOP_TIMEOUT)
    daemon = start_daemon(adapters)
    client = daemon.client()
    ended: list[Lease] = []
    with client.lease("job-1", "brief") as brief, client.lease("job-1", "sleeper") as sleeper:
        brief.on_end(ended.append)
        exited = brief.wait_exited(timeout=5)
        assert exited == AdapterExited(brief.instance, "job-1", "brief", brief.pid, 3, "exited")
        assert ended == [brief] and brief.exited is exited
        assert sleeper.exited is None
        with pytest.raises(TimeoutError):
            sleeper.wait_exited(timeout=0.05)
        assert client.next_notification(timeout=1)["params"]["instance"] == brief.instance
    assert eventually(lambda: settled(client))


def test_release_job_from_another_client_ends_the_holders_lease_quietly(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    holder, orchestrator = daemon.client(), daemon.client()
    with holder.lease("job-1", "sleeper") as lease:
        assert orchestrator.release_job("job-1") == {"released": 1, "instances": [lease.instance]}
        assert lease.wait_exited(timeout=5).reason == "released"
    assert lease.released  # leaving the block did not raise: the lease was already gone
    assert eventually(lambda: gone(lease.pid, daemon), timeout=2.0)

    # A detached lease outlives its client and is renewed and released by token.
    detached = holder.acquire("job-2", "sleeper", detach=True, ttl=30)
    holder.close()
    with pytest.raises(ConnectionLost, match="lives on"):
        detached.wait_exited(timeout=1)
    assert not detached.lost and not detached.released
    assert orchestrator.renew(detached.token, ttl=60) > detached.expires_at  # type: ignore[operator]
    assert orchestrator.release(detached.token) == {"refcount": 0, "stopping": True}
    assert eventually(lambda: settled(orchestrator))


def test_a_late_answer_to_a_timed_out_acquire_is_released(start_daemon, tmp_path: Path) -> None:
    # A successor of a pair waits for its predecessor's tree to go; this one
    # ignores SIGTERM, so the second acquire takes about stop_timeout.
    daemon = start_daemon(tree_adapter("stubborn", pidfile=tmp_path / "s.pids", args=("--ignore-term", "--no-escapee"), stop_timeout=1.0))
    client = Client(daemon.socket, timeout=0.3)
    daemon.clients.append(client)
    first = client.acquire("job-1", "stubborn")
    read_pidfile(tmp_path / "s.pids", roles=("root", "child", "grandchild"))  # SIGTERM is ignored from here on
    first.release()
    with pytest.raises(TimeoutError, match="acquire"):
        client.acquire("job-1", "stubborn")
    daemon.wait_for_event("lease.acquired", timeout=5, job="job-1", refcount=1)
    assert eventually(lambda: len([e for e in daemon.log_events() if e.get("event") == "lease.acquired"]) == 2, timeout=5)
    assert eventually(lambda: settled(client), timeout=5), client.status()


def voluntary_switches(thread: threading.Thread) -> int:
    """How often `thread` went to sleep so far (it slept once per wake-up)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_a_call_reads_its_own_answer_without_waking_the_reader_thread(start_daemon) -> None:
    # The point of the reading role: a call is a send and a read on the caller's
    # thread. If answers went through the reader thread, it would wake (and go
    # back to sleep) once per answer.
    daemon = start_daemon(SLEEPER)
    client = daemon.client()
    client.status()
    before = voluntary_switches(client._reader)
    for _ in range(300):
        assert client.status()["daemon"]["connections"] >= 1
    assert voluntary_switches(client._reader) - before < 30

    # Between calls, the reader thread reads: a notification arrives with no call.
    with client.lease("job-1", "sleeper") as lease:
        daemon.client().release_job("job-1")
        assert lease.wait_exited(timeout=5).reason == "released"
    assert voluntary_switches(client._reader) > before


def test_a_reading_caller_delivers_the_answers_of_callers_waiting_meanwhile(start_daemon, tmp_path: Path) -> None:
    # The successor of a stubborn tree waits about stop_timeout for it, and its
    # caller holds the reading role all that time; other callers' answers must
    # not wait for it.
    daemon = start_daemon(tree_adapter("stubborn", pidfile=tmp_path / "s.pids", args=("--ignore-term", "--no-escapee"), stop_timeout=1.5))
    client = daemon.client()
    first = client.acquire("job-1", "stubborn")
    read_pidfile(tmp_path / "s.pids", roles=("root", "child", "grandchild"))  # SIGTERM is ignored from here on
    first.release()
    acquired_at: list[float] = []

    def slow_acquire() -> None:
        client.acquire("job-1", "stubborn").release()
        acquired_at.append(time.monotonic())

    thread = threading.Thread(target=slow_acquire)
    thread.start()
    assert eventually(lambda: client._reading and len(client._pending) == 1, timeout=5)
    answered_at = []
    for _ in range(20):
        assert client.hello()["server"] == "adapter-supervisor"
        answered_at.append(time.monotonic())
    thread.join(10)
    assert len(acquired_at) == 1 and max(answered_at) < acquired_at[0]
    assert eventually(lambda: settled(client), timeout=5)


def test_notifications_still_arrive_after_a_reading_caller_timed_out(start_daemon, tmp_path: Path) -> None:
    # A caller that gives up while it reads must give the role back (to the
    # reader thread here), or nothing would read the socket any more.
    daemon = start_daemon(SLEEPER + tree_adapter("stubborn", pidfile=tmp_path / "s.pids", args=("--ignore-term", "--no-escapee"), stop_timeout=1.0))
    client = Client(daemon.socket, timeout=0.3)
    daemon.clients.append(client)
    held = client.acquire("job-held", "sleeper")
    first = client.acquire("job-1", "stubborn")
    read_pidfile(tmp_path / "s.pids", roles=("root", "child", "grandchild"))
    first.release()
    with pytest.raises(TimeoutError):
        client.acquire("job-1", "stubborn")
    assert not client._reading
    daemon.client().release_job("job-held")
    assert held.wait_exited(timeout=5).reason == "released"
    assert eventually(lambda: settled(client), timeout=5)


def test_a_daemon_that_dies_mid_call_fails_the_reading_caller_and_the_waiting_one(start_daemon, tmp_path: Path) -> None:
    # Two acquires wait for stubborn predecessors: the first caller holds the
    # reading role, the second waits for it to deliver. The daemon is killed.
    # Both calls must fail with ConnectionLost at once, and the reader thread
    # must end (close() would hang on it otherwise).
    args = ("--ignore-term", "--no-escapee")
    daemon = start_daemon(
        tree_adapter("stubborn", pidfile=tmp_path / "s.pids", args=args, stop_timeout=5.0)
        + tree_adapter("stubborn2", pidfile=tmp_path / "t.pids", args=args, stop_timeout=5.0)
    )
    client = daemon.client()
    trees = []
    for adapter, pidfile in (("stubborn", "s.pids"), ("stubborn2", "t.pids")):
        lease = client.acquire(f"job-{adapter}", adapter)
        trees.append(read_pidfile(tmp_path / pidfile, roles=("root", "child", "grandchild")))
        lease.release()  # SIGTERM is ignored: the successor waits about 5 s
    failures: dict[str, BaseException] = {}

    def acquire(adapter: str) -> None:
        try:
            client.acquire(f"job-{adapter}", adapter)
        except BaseException as exc:  # noqa: BLE001 - checked below
            failures[adapter] = exc

    reading = threading.Thread(target=acquire, args=("stubborn",))
    reading.start()
    assert eventually(lambda: client._reading and len(client._pending) == 1, timeout=5)
    waiting = threading.Thread(target=acquire, args=("stubborn2",))
    waiting.start()
    assert eventually(lambda: len(client._pending) == 2, timeout=5)
    daemon.stop(signal.SIGKILL)
    reading.join(5)
    waiting.join(5)
    assert not reading.is_alive() and not waiting.is_alive()
    assert isinstance(failures.get("stubborn"), ConnectionLost), failures
    assert isinstance(failures.get("stubborn2"), ConnectionLost), failures
    client._reader.join(5)
    assert not client._reader.is_alive() and client.lost
    with pytest.raises(ConnectionLost):
        client.status()
    # A SIGKILLed daemon stops nothing; its successor on the same state
    # directory reaps what it left (the trees and its cgroups).
    successor = start_daemon(state_dir=daemon.state_dir)
    members = [identity for tree in trees for identity in tree.values()]
    assert eventually(lambda: all(gone(identity.pid, successor) for identity in members), timeout=10)


def test_a_lost_connection_is_loud_and_never_silently_reacquired(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    client = daemon.client()
    with pytest.raises(LeaseLost) as lost, client.lease("job-1", "sleeper") as lease:
        daemon.stop()
        assert lease.wait_exited(timeout=5).reason == "shutdown"
        assert client.shutting_down
        assert eventually(lambda: client.lost, timeout=5)
    assert lost.value.lease is lease and lease.lost
    with pytest.raises(ConnectionLost):
        client.status()
    with pytest.raises(ConnectionLost):
        client.acquire("job-1", "sleeper")


HOLDER_SCRIPT = r"""
import sys
kind, path = sys.argv[1], sys.argv[2]
if kind == "sync":
    from supervisor.client import Client
    with Client(path) as client, client.lease("job-" + kind, "sleeper") as lease:
        print(lease.pid, flush=True)
        lease.wait_exited()
else:
    import anyio
    from supervisor.client import AsyncClient
    async def main():
        async with AsyncClient(path) as client, client.lease("job-" + kind, "sleeper") as lease:
            print(lease.pid, flush=True)
            await lease.wait_exited()
    anyio.run(main, backend=kind)
"""


def test_a_lease_is_released_when_the_process_holding_the_client_is_killed(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    holders = [
        subprocess.Popen([PYTHON, "-c", HOLDER_SCRIPT, kind, daemon.socket], stdout=subprocess.PIPE, text=True)
        for kind in ("sync", "asyncio", "trio")
    ]
    try:
        pids = [int(holder.stdout.readline()) for holder in holders]  # type: ignore[union-attr]
        observer = daemon.client()
        assert observer.status()["daemon"]["leases"] == 3
    finally:
        for holder in holders:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            holder.stdout.close()  # type: ignore[union-attr]
    assert eventually(lambda: settled(observer), timeout=5), observer.status()
    assert all(gone(pid, daemon) for pid in pids)


# -- the async client, under asyncio and Trio ------------------------------------------


async def async_scenarios(sock: str, stubborn_pidfile: Path) -> dict[str, Any]:
    """Every async behaviour that needs a daemon, on one; returns what it saw."""
    seen: dict[str, Any] = {}
    async with AsyncClient(sock) as client:
        # Pipes as streams; the lease goes when the body raises.
        with pytest.raises(RuntimeError, match="job failed"):
            async with client.lease("job-raise", "echo", fds=True) as lease:
                assert lease.stdin is not None and lease.stdout is not None
                await lease.stdin.send(b"ping\n")
                seen["echo"] = await BufferedByteReceiveStream(lease.stdout).receive_until(b"\n", 100)
                raise RuntimeError("job failed")
        seen["raise"] = (lease.released, (await client.status())["daemon"]["leases"])

        # The lease goes when the task holding it is cancelled.
        entered = anyio.Event()
        held: list[Any] = []

        async def hold() -> None:
            async with client.lease("job-cancel", "echo") as lease:
                held.append(lease)
                entered.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as group:
            group.start_soon(hold)
            await entered.wait()
            group.cancel_scope.cancel()
        seen["cancel"] = (held[0].released, (await client.status())["daemon"]["leases"])

        # Cancelled while the daemon is still spawning: the late lease is released.
        first = await client.acquire("job-late", "stubborn")
        with anyio.fail_after(10):
            while "root" not in (stubborn_pidfile.read_text() if stubborn_pidfile.exists() else ""):
                await anyio.sleep(0.01)  # SIGTERM is ignored once the root wrote its pid
        await first.release()
        with anyio.move_on_after(0.3) as scope:
            await client.acquire("job-late", "stubborn")
        seen["late_cancelled"] = scope.cancelled_caught

        # Many tasks at once on one connection, answers matched by id.
        async def worker(index: int) -> None:
            job = f"job-many-{index % 4}"
            async with client.lease(job, "sleeper") as lease:
                rows = (await client.status(job))["instances"]
                seen.setdefault("many", set()).add((lease.job, rows[0]["job"]))

        async with anyio.create_task_group() as group:
            for index in range(16):
                group.start_soon(worker, index)

        # An exit reaches its lease.
        async with client.lease("job-brief", "brief") as lease:
            with anyio.fail_after(5):
                seen["exited"] = await lease.wait_exited()
            seen["brief"] = lease
        with anyio.fail_after(5):
            while True:
                status = await client.status()
                if status["daemon"]["leases"] == 0 and status["instances"] == []:
                    break
                await anyio.sleep(0.02)
    seen["closed"] = client.lost
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_client_releases_on_raise_and_cancel_and_routes_exits(start_daemon, tmp_path: Path, backend: str) -> None:
    adapters = SLEEPER + tree_adapter("echo", pidfile=tmp_path / "echo.pids", args=("--echo", "--no-escapee"), stdio="pipe", stop_timeout=STOP_TIMEOUT)
    adapters += tree_adapter("brief", pidfile=tmp_path / "brief.pids", args=("--exit-after", "0.3", "--no-escapee"), stop_timeout=STOP_TIMEOUT)
    adapters += tree_adapter("stubborn", pidfile=tmp_path / "s.pids", args=("--ignore-term", "--no-escapee"), stop_timeout=1.0)
    daemon = start_daemon(adapters)
    seen = anyio.run(async_scenarios, daemon.socket, tmp_path / "s.pids", backend=backend)
    assert seen["echo"] == b"ping"
    assert seen["raise"] == (True, 0)
    assert seen["cancel"] == (True, 0)
    assert seen["late_cancelled"]
    late = [e for e in daemon.log_events() if e.get("event") == "lease.acquired" and e.get("job") == "job-late"]
    assert len(late) == 2, "the cancelled acquire never reached the daemon"
    assert seen["many"] == {(f"job-many-{i}", f"job-many-{i}") for i in range(4)}
    brief = seen["brief"]
    assert seen["exited"] == AdapterExited(brief.instance, "job-brief", "brief", brief.pid, 3, "exited")
    assert seen["closed"]


async def test_async_client_surfaces_a_lost_connection_under_trio(start_daemon) -> None:
    daemon = start_daemon(SLEEPER)
    async with AsyncClient(daemon.socket) as client:
        with pytest.raises(LeaseLost):
            async with client.lease("job-1", "sleeper") as lease:
                os.kill(daemon.pid, signal.SIGTERM)
                with anyio.fail_after(5):
                    assert (await lease.wait_exited()).reason == "shutdown"
                    while not client.lost:
                        await anyio.sleep(0.01)
        with pytest.raises(ConnectionLost):
            await client.hello()
    assert daemon.popen.wait(10) == 0
