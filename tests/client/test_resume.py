"""Clients made with `resume`: after a crash of the daemon, they connect to
the restarted daemon and take their bound leases back, and say so; without a
daemon in time, the leases are lost as without `resume`. Real daemons,
`kill -9`, real adapter trees."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from supervisor.client import Client, ConnectionLost, LeaseLost
from tests.conftest import eventually, read_pidfile, wait_all_gone
from tests.test_adoption import adapters, kill_9, recorded_tokens


def next_resumed(client: Client, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        notice = client.next_notification(timeout=max(0.01, deadline - time.monotonic()))
        if notice["method"] == "resumed":
            return notice["params"]


def test_a_resuming_client_takes_its_bound_leases_back_after_a_crash(start_daemon, tmp_path: Path) -> None:
    settings = {"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"), "resume_grace": 1.5}
    first = start_daemon(adapters(tmp_path), **settings)
    told: list[dict] = []
    with Client(settings["socket"], timeout=10, resume=20, on_resume=told.append) as client:
        kept = client.acquire("job-k", "tree")
        dropped = client.acquire("job-d", "tree")
        members = {job: read_pidfile(tmp_path / f"{job}.pids") for job in ("job-k", "job-d")}
        assert eventually(lambda: {kept.token, dropped.token} <= recorded_tokens(tmp_path / "state"))
        kill_9(first)
        # While the daemon is away: calls fail at once, the leases are kept.
        assert eventually(lambda: client.lost)
        with pytest.raises(ConnectionLost):
            client.status()
        assert not kept.lost and not dropped.lost
        # A lease given up meanwhile is not resumed: the daemon lets it go.
        with pytest.raises(ConnectionLost):
            dropped.release()

        second = start_daemon(adapters(tmp_path), **settings)
        resumed = next_resumed(client)
        assert resumed == {"resumed": [kept.token], "lost": [], "generation": 2}
        assert told == [resumed]
        assert not client.lost and not kept.lost
        rows = {row["job"]: row for row in client.status()["instances"]}
        assert rows["job-k"]["adopted"] is True and rows["job-k"]["refcount"] == 1
        # The one not resumed is released after the grace; the kept one lives.
        assert not wait_all_gone(members["job-d"], second.pid, timeout=6.0)
        assert eventually(lambda: "job-d" not in {r["job"] for r in client.status()["instances"]}, timeout=5)
        assert client.release(kept) == {"refcount": 0, "stopping": True}
        assert not wait_all_gone(members["job-k"], second.pid, timeout=5.0)


def test_without_a_daemon_in_time_the_bound_leases_are_lost(start_daemon, tmp_path: Path) -> None:
    settings = {"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"), "resume_grace": 1.0}
    first = start_daemon(adapters(tmp_path), **settings)
    with Client(settings["socket"], timeout=10, resume=0.5) as client:
        lease = client.acquire("job-1", "tree")
        members = read_pidfile(tmp_path / "job-1.pids")
        assert eventually(lambda: lease.token in recorded_tokens(tmp_path / "state"))
        kill_9(first)
        with pytest.raises(LeaseLost):
            lease.wait_exited(timeout=10)
        assert client.lost
    # The next daemon adopts the tree, nobody resumes it, the grace ends it.
    second = start_daemon(adapters(tmp_path), **settings)
    assert not wait_all_gone(members, second.pid, timeout=8.0)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_async_client_resumes_too(start_daemon, tmp_path: Path, backend: str) -> None:
    import anyio

    from supervisor.client import AsyncClient

    settings = {"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"), "resume_grace": 5.0}
    first = start_daemon(adapters(tmp_path), **settings)
    restarted = []

    async def main() -> None:
        told: list[dict] = []
        async with AsyncClient(settings["socket"], timeout=10, resume=20, on_resume=told.append) as client:
            lease = await client.acquire("job-1", "tree")
            assert eventually(lambda: lease.token in recorded_tokens(tmp_path / "state"))
            kill_9(first)
            with anyio.fail_after(5):
                while not client.lost:
                    await anyio.sleep(0.01)
            with pytest.raises(ConnectionLost):
                await client.status()
            assert not lease.lost
            restarted.append(await anyio.to_thread.run_sync(lambda: start_daemon(adapters(tmp_path), **settings)))
            with anyio.fail_after(15):
                notice = await client.next_notification()
                while notice["method"] != "resumed":
                    notice = await client.next_notification()
            assert notice["params"] == {"resumed": [lease.token], "lost": [], "generation": 2}
            assert told == [notice["params"]]
            assert (await client.release(lease))["refcount"] == 0

    anyio.run(main, backend=backend)
    members = read_pidfile(tmp_path / "job-1.pids")
    assert not wait_all_gone(members, restarted[0].pid, timeout=5.0)


def stopped_daemon_accepting(start_daemon, tmp_path: Path, settings: dict):
    """A restarted daemon frozen (SIGSTOP) once its socket exists: connects
    succeed, nothing is answered until SIGCONT."""
    import signal as signals

    daemon = start_daemon(adapters(tmp_path), **settings)
    os.kill(daemon.pid, signals.SIGSTOP)
    return daemon


def test_a_lease_released_during_the_resume_is_released_once_connected(start_daemon, tmp_path: Path) -> None:
    import signal as signals

    settings = {"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"), "resume_grace": 60.0}
    first = start_daemon(adapters(tmp_path), **settings)
    with Client(settings["socket"], timeout=10, resume=30) as client:
        kept = client.acquire("job-k", "tree")
        dropped = client.acquire("job-d", "tree")
        members = read_pidfile(tmp_path / "job-d.pids")
        assert eventually(lambda: {kept.token, dropped.token} <= recorded_tokens(tmp_path / "state"))
        kill_9(first)
        second = stopped_daemon_accepting(start_daemon, tmp_path, settings)
        time.sleep(0.6)  # an attempt with both tokens is waiting for its answer
        with pytest.raises(ConnectionLost):
            dropped.release()
        os.kill(second.pid, signals.SIGCONT)
        resumed = next_resumed(client)
        assert kept.token in resumed["resumed"]
        # Given back with the rest, and released by the client at once, not
        # after the daemon's minute of grace.
        assert not wait_all_gone(members, second.pid, timeout=5.0)
        assert [r["job"] for r in client.status()["instances"]] == ["job-k"]
        client.release(kept)


def test_close_during_a_resume_attempt_returns_promptly(start_daemon, tmp_path: Path) -> None:
    import signal as signals

    settings = {"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"), "resume_grace": 1.0}
    first = start_daemon(adapters(tmp_path), **settings)
    client = Client(settings["socket"], timeout=None, resume=30)
    lease = client.acquire("job-1", "tree")
    assert eventually(lambda: lease.token in recorded_tokens(tmp_path / "state"))
    kill_9(first)
    second = stopped_daemon_accepting(start_daemon, tmp_path, settings)
    try:
        time.sleep(0.6)  # an attempt is waiting for an answer that does not come
        began = time.monotonic()
        client.close()
        assert time.monotonic() - began < 2.0
        assert lease.lost
    finally:
        os.kill(second.pid, signals.SIGCONT)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_leaving_the_async_client_while_it_reconnects_ends_its_leases(start_daemon, tmp_path: Path, backend: str) -> None:
    import anyio

    from supervisor.client import AsyncClient

    settings = {"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"), "resume_grace": 1.0}
    first = start_daemon(adapters(tmp_path), **settings)
    held = []

    async def main() -> None:
        async with AsyncClient(settings["socket"], timeout=10, resume=30) as client:
            held.append(await client.acquire("job-1", "tree"))
            assert eventually(lambda: held[0].token in recorded_tokens(tmp_path / "state"))
            kill_9(first)
            with anyio.fail_after(5):
                while not client.lost:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)
        with anyio.fail_after(2):
            with pytest.raises(LeaseLost):
                await held[0].wait_exited()

    with_timeout = time.monotonic()
    anyio.run(main, backend=backend)
    assert time.monotonic() - with_timeout < 10
    assert held[0].lost
    # The next daemon adopts the tree; nobody resumes it; the grace ends it.
    second = start_daemon(adapters(tmp_path), **settings)
    assert not wait_all_gone(read_pidfile(tmp_path / "job-1.pids"), second.pid, timeout=8.0)


def test_a_lease_whose_adapter_exited_is_not_offered_for_resume(start_daemon, tmp_path: Path) -> None:
    settings = {"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"), "resume_grace": 5.0}
    config = adapters(tmp_path) + '[adapters.brief]\ncommand = ["/bin/sleep", "0.3"]\n'
    first = start_daemon(config, **settings)
    with Client(settings["socket"], timeout=10, resume=20) as client:
        kept = client.acquire("job-k", "tree")
        gone = client.acquire("job-g", "brief")
        assert gone.wait_exited(timeout=10).reason == "exited"
        assert eventually(lambda: kept.token in recorded_tokens(tmp_path / "state"))
        kill_9(first)
        start_daemon(config, **settings)
        resumed = next_resumed(client)
        assert resumed == {"resumed": [kept.token], "lost": [], "generation": 2}
        assert gone.exited is not None and not gone.lost
        client.release(kept)
