"""`AsyncLease.asyncio_streams()`: an fds lease's pipes as asyncio's
StreamReader and StreamWriter, closed on release like the anyio streams they
replace; refused, changing nothing, where they cannot work."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.client import AsyncClient
from tests.conftest import tree_adapter

STOP_TIMEOUT = 0.5


def echo_adapter(tmp_path: Path) -> str:
    return tree_adapter("echo", pidfile=tmp_path / "echo.pids", args=("--echo", "--no-escapee"), stdio="pipe", stop_timeout=STOP_TIMEOUT)


async def under_asyncio(sock: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with AsyncClient(sock) as client:
        async with client.lease("job-1", "echo", fds=True) as lease:
            reader, writer = await lease.asyncio_streams(limit=1024)
            seen["anyio_streams"] = (lease.stdin, lease.stdout)
            writer.write(b"ping\n")
            await writer.drain()
            seen["echo"] = await asyncio.wait_for(reader.readline(), 5)
            # The limit given is the reader's.
            writer.write(b"x" * 2000 + b"\n")
            await writer.drain()
            with pytest.raises(ValueError):
                await asyncio.wait_for(reader.readline(), 5)
            with pytest.raises(RuntimeError, match="no pipes"):
                await lease.asyncio_streams()
            # Closing this side's ends (as the release does first) closes
            # the pipes the transports own; the adapter runs on.
            pipes = [transport.get_extra_info("pipe") for transport in lease._transports]
            await lease.aclose_stdio()
            await asyncio.sleep(0)  # the transports close their pipes in the next turn
            seen["closed"] = (writer.is_closing(), [pipe.closed for pipe in pipes])
            seen["running"] = (await client.status("job-1"))["instances"][0]["state"]
        with pytest.raises(RuntimeError, match="no pipes"):
            await lease.asyncio_streams()

        async with client.lease("job-2", "echo") as plain:
            with pytest.raises(RuntimeError, match="acquire it with fds=True"):
                await plain.asyncio_streams()
        async with client.lease("job-3", "echo", fds=True) as released:
            pass
        with pytest.raises(RuntimeError, match="are closed"):
            await released.asyncio_streams()
    return seen


def test_asyncio_streams_carry_the_pipes_and_close_with_the_lease(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(echo_adapter(tmp_path))
    seen = asyncio.run(under_asyncio(daemon.socket))
    assert seen["anyio_streams"] == (None, None)
    assert seen["echo"] == b"ping\n"
    assert seen["closed"] == (True, [True, True])
    assert seen["running"] == "running"


async def under_trio(sock: str) -> bytes:
    async with AsyncClient(sock) as client, client.lease("job-1", "echo", fds=True) as lease:
        with pytest.raises(RuntimeError, match="needs asyncio"):
            await lease.asyncio_streams()
        # Refused without taking anything: the anyio streams still work.
        assert lease.stdin is not None and lease.stdout is not None
        await lease.stdin.send(b"still here\n")
        with anyio.fail_after(5):
            return await BufferedByteReceiveStream(lease.stdout).receive_until(b"\n", 100)


def test_asyncio_streams_are_refused_under_trio_and_the_pipes_stay(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(echo_adapter(tmp_path))
    assert anyio.run(under_trio, daemon.socket, backend="trio") == b"still here"
