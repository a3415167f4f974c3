"""Clients made with `resume`: after a crash of the daemon, they connect to
the restarted daemon and take their bound leases back, and say so; without a
daemon in time, the leases are lost as without `resume`. Real daemons,
`kill -9`, real adapter trees."""

from __future__ import annotations

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


class ScriptedDaemon:
    """A stand-in for a daemon at `path`, for races a real one cannot be
    held in: it grants leases on its first connection and then drops it (a
    crash); on later connections it answers `hello`, holds `resume` until
    `answer_resume` is set, resumes every token asked for, and records every
    `release`."""

    def __init__(self, path: str) -> None:
        import socket
        import threading

        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.crash = threading.Event()
        self.answer_resume = threading.Event()
        self.resume_asked = threading.Event()
        self.released: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        first = True
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn, first), daemon=True).start()
            first = False

    def _talk(self, conn, first: bool) -> None:
        try:
            self._answer(conn, first)
        except OSError:
            pass  # the client went away mid-line (a reset): as a daemon would, carry on
        finally:
            conn.close()

    def _answer(self, conn, first: bool) -> None:
        import json

        reader = conn.makefile("rb")
        granted = 0
        for line in reader:
            request = json.loads(line)
            method, params, result = request["method"], request["params"], None
            if method == "acquire":
                granted += 1
                result = {"lease": f"token-{params['job']}", "instance": f"inst-{granted}", "job": params["job"],
                          "adapter": params["adapter"], "pid": 1, "refcount": 1, "spawned": True}
            elif method == "hello":
                result = {"server": "adapter-supervisor", "pid": 1, "generation": 2}
            elif method == "resume":
                self.resume_asked.set()
                self.answer_resume.wait(10)
                result = {"resumed": params["leases"], "not_resumed": []}
            elif method == "release":
                self.released.append(params["lease"])
                result = {"refcount": 0, "stopping": True}
            conn.sendall(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}).encode() + b"\n")
            if first and granted == 2:
                self.crash.wait(10)
                break

    def close(self) -> None:
        """Stop accepting and wait for the accepting thread: a thread left
        blocked in accept() on a closed fd would accept on whatever socket
        gets that number next (and opens fds under later tests)."""
        import socket

        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() with an error
        except OSError:
            pass
        self.listener.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the scripted daemon's accept thread did not stop"


def test_a_lease_released_during_the_resume_is_released_once_connected(tmp_path: Path) -> None:
    """The attempt under way asked for both leases; the application released
    one meanwhile (it cannot reach the daemon, so the release fails and the
    lease is forgotten); the daemon then gives both back: the client must
    release the one nobody holds any more, or it stays bound to nobody."""
    path = str(tmp_path / "scripted.sock")
    daemon = ScriptedDaemon(path)
    try:
        with Client(path, timeout=10, resume=20) as client:
            kept = client.acquire("job-k", "tree")
            dropped = client.acquire("job-d", "tree")
            daemon.crash.set()  # the first connection ends
            assert daemon.resume_asked.wait(10), "the client never tried to resume"
            with pytest.raises(ConnectionLost):
                dropped.release()
            daemon.answer_resume.set()
            resumed = next_resumed(client)
            assert resumed["resumed"] == [kept.token, dropped.token]
            assert eventually(lambda: daemon.released == [dropped.token], timeout=5)
            assert not kept.lost
    finally:
        daemon.close()


def test_close_during_a_resume_attempt_returns_promptly(tmp_path: Path) -> None:
    path = str(tmp_path / "scripted.sock")
    daemon = ScriptedDaemon(path)
    try:
        client = Client(path, timeout=None, resume=30)
        lease = client.acquire("job-1", "tree")
        client.acquire("job-2", "tree")
        daemon.crash.set()
        assert daemon.resume_asked.wait(10)  # an attempt now waits for an answer that does not come
        began = time.monotonic()
        client.close()
        assert time.monotonic() - began < 2.0
        assert lease.lost
    finally:
        daemon.answer_resume.set()
        daemon.close()


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
