"""The async client's exceptions reach the caller as themselves, under asyncio
and Trio alike: never wrapped in an ExceptionGroup by the reader task's task
group, whether caught inside ``async with AsyncClient()`` or around it; and
cancellation and KeyboardInterrupt still end the block, releasing its leases."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import pytest

from supervisor.client import AsyncClient, Client, ConnectionLost, UnknownAdapter

BACKENDS = ["asyncio", "trio"]
SLEEPER = '[adapters.sleeper]\ncommand = ["/bin/sleep", "3600"]\nstop_timeout = 0.5\n'


async def until_lost(client: AsyncClient) -> None:
    with anyio.fail_after(10):
        while not client.lost:
            await anyio.sleep(0.01)


async def caught_inside(sock: str, daemon_pid: int) -> dict[str, Any]:
    """Each exception caught inside the client's block (the daemon stops last)."""
    seen: dict[str, Any] = {}
    async with AsyncClient(sock) as client:
        try:
            await client.acquire("job-1", "nope")
        except UnknownAdapter as exc:
            seen["unknown_adapter"] = exc
        mistake = ValueError("the job's own code failed")
        try:
            async with client.lease("job-1", "sleeper"):
                raise mistake
        except ValueError as exc:
            seen["value_error"] = exc is mistake
        seen["leases"] = (await client.status())["daemon"]["leases"]
        os.kill(daemon_pid, signal.SIGTERM)
        await until_lost(client)
        try:
            await client.hello()
        except ConnectionLost as exc:
            seen["connection_lost"] = exc
    return seen


async def caught_around(sock: str, daemon_pid: int) -> dict[str, Any]:
    """Each exception raised out of the client's block (the daemon stops last)."""
    seen: dict[str, Any] = {}
    try:
        async with AsyncClient(sock) as client:
            await client.acquire("job-1", "nope")
    except UnknownAdapter as exc:
        seen["unknown_adapter"] = exc
    mistake = ValueError("the job's own code failed")
    try:
        async with AsyncClient(sock) as client, client.lease("job-1", "sleeper"):
            raise mistake
    except ValueError as exc:
        seen["value_error"] = exc is mistake
    async with AsyncClient(sock) as observer:
        seen["leases"] = (await observer.status())["daemon"]["leases"]
    try:
        async with AsyncClient(sock) as client:
            await client.hello()  # served: a daemon stopping refuses new connections instead
            os.kill(daemon_pid, signal.SIGTERM)
            await until_lost(client)
            await client.hello()
    except ConnectionLost as exc:
        seen["connection_lost"] = exc
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scenario", [caught_inside, caught_around], ids=["inside", "around"])
def test_client_errors_and_the_blocks_own_reach_the_caller_unwrapped(start_daemon, backend: str, scenario) -> None:
    daemon = start_daemon(SLEEPER)
    seen = anyio.run(scenario, daemon.socket, daemon.pid, backend=backend)
    assert type(seen["unknown_adapter"]) is UnknownAdapter and seen["unknown_adapter"].code == 1001
    assert "no adapter named 'nope'" in seen["unknown_adapter"].message
    assert seen["value_error"] is True
    assert seen["leases"] == 0
    assert type(seen["connection_lost"]) is ConnectionLost
    assert daemon.popen.wait(10) == 0


async def interrupted(sock: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    # Cancelled from outside while holding a lease: the scope absorbs the
    # cancellation as usual, and the lease is gone.
    with anyio.move_on_after(0.3) as scope:
        async with AsyncClient(sock) as client, client.lease("job-cancel", "sleeper") as lease:
            await anyio.sleep_forever()
    seen["cancelled"] = (scope.cancelled_caught, lease.released)
    # KeyboardInterrupt in the block leaves it as KeyboardInterrupt.
    try:
        async with AsyncClient(sock) as client, client.lease("job-interrupt", "sleeper") as lease:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        seen["interrupted"] = lease.released
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancellation_and_keyboard_interrupt_still_end_the_block_and_its_leases(start_daemon, backend: str) -> None:
    daemon = start_daemon(SLEEPER)
    seen = anyio.run(interrupted, daemon.socket, backend=backend)
    assert seen == {"cancelled": (True, True), "interrupted": True}
    with Client(daemon.socket) as client:
        assert client.status()["daemon"]["leases"] == 0
