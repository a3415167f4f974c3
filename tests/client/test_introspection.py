"""What the clients say about the daemon: `adapters()`, `metrics()`, and
`status()` rows whose shape is the one the client's TypedDicts promise (leases
of each instance; return code and reason of an exited one), from the blocking
client and from the async one under asyncio and Trio."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.client import AdapterInfo, AsyncClient, DaemonStatus, InstanceStatus, LeaseStatus
from tests.conftest import eventually, tree_adapter

STOP_TIMEOUT = 0.5
SLEEPER = '[adapters.sleeper]\ncommand = ["/bin/sleep", "3600"]\nstop_timeout = 0.5\n'


def keys(typed: Any) -> set[str]:
    return set(typed.__required_keys__) | set(typed.__optional_keys__)


def spawns(text: str) -> dict[str, float]:
    """adapter_supervisor_spawns_total by adapter, read with Prometheus's own parser."""
    return {
        sample.labels["adapter"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "adapter_supervisor_spawns_total"
    }


def test_status_rows_have_the_fields_the_typed_dicts_promise(start_daemon, tmp_path: Path) -> None:
    adapters = SLEEPER + tree_adapter("brief", pidfile=tmp_path / "brief.pids", args=("--exit-after", "0.3", "--no-escapee"), stop_timeout=STOP_TIMEOUT)
    daemon = start_daemon(adapters)
    client = daemon.client()
    bound = client.acquire("job-1", "sleeper")
    detached = client.acquire("job-1", "sleeper", detach=True, ttl=60)
    brief = client.acquire("job-2", "brief")
    assert eventually(lambda: client.status("job-2")["instances"][0]["state"] == "exited", timeout=10)

    status = client.status()
    assert set(status["daemon"]) == keys(DaemonStatus)
    running, exited = sorted(status["instances"], key=lambda row: row["job"])
    assert set(running) == set(InstanceStatus.__required_keys__)
    assert set(exited) == keys(InstanceStatus)
    assert (exited["returncode"], exited["reason"]) == (3, "exited")
    leases = {row["lease"]: row for row in running["leases"]}
    assert all(set(row) == keys(LeaseStatus) for row in leases.values())
    assert leases[bound.token] == {"lease": bound.token, "detached": False, "expires_at": None, "uid": os.getuid(), "pid": os.getpid()}
    assert leases[detached.token]["detached"] and leases[detached.token]["expires_at"] == detached.expires_at
    for lease in (bound, detached, brief):
        lease.release()


def test_blocking_adapters_and_metrics(start_daemon) -> None:
    daemon = start_daemon(SLEEPER + '[adapters.idle]\ncommand = ["/bin/sleep", "60"]\n')
    client = daemon.client()
    with client.lease("job-1", "sleeper"):
        adapters = client.adapters()
        assert [a["name"] for a in adapters] == ["idle", "sleeper"]
        assert all(set(a) == keys(AdapterInfo) for a in adapters)
        assert [a["live"] for a in adapters] == [0, 1]
        assert adapters[1]["command"] == ["/bin/sleep", "3600"]
        text = client.metrics()
    assert isinstance(text, str) and spawns(text) == {"sleeper": 1.0}


async def async_introspection(sock: str) -> dict[str, Any]:
    async with AsyncClient(sock) as client, client.lease("job-1", "sleeper"):
        return {"adapters": await client.adapters(), "metrics": await client.metrics(), "status": await client.status()}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_adapters_metrics_and_status(start_daemon, backend: str) -> None:
    daemon = start_daemon(SLEEPER)
    seen = anyio.run(async_introspection, daemon.socket, backend=backend)
    assert [(a["name"], a["live"], a["stdio"]) for a in seen["adapters"]] == [("sleeper", 1, "null")]
    assert spawns(seen["metrics"]) == {"sleeper": 1.0}
    (row,) = seen["status"]["instances"]
    (lease,) = row["leases"]
    assert lease["pid"] == os.getpid() and not lease["detached"]
