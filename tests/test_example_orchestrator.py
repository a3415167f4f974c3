"""examples/orchestrator.py: every terminal path of a job, and no path leaks a
process. The checks run while the daemon still runs (its shutdown would stop
every tree and hide a leak) and while the abandoned job's task is still stuck
holding its leases."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from supervisor.procs import process
from supervisor.client import AsyncClient

EXAMPLES = Path(__file__).parent.parent / "examples"


def load_example(name: str = "orchestrator.py") -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def tagged_survivors(tags: set[str]) -> list[tuple[int, str | None]]:
    """Live processes carrying one of `tags` (zombies have no environment left)."""
    return [
        (stat.pid, process.read_environ_tag(stat.pid)) for stat in process.scan_processes()
        if stat.state not in ("Z", "X") and process.read_environ_tag(stat.pid) in tags
    ]


async def drive(example: ModuleType, sock: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with AsyncClient(sock) as client, example.Orchestrator(client, deadline_s=1.0) as orchestrator:
        for job_id, steps in example.DEMO_JOBS.items():
            orchestrator.submit(job_id, steps)
        jobs = orchestrator.jobs
        await orchestrator.until(lambda: all(len(job.adapters) == 2 for job in jobs.values()))
        await orchestrator.until(lambda: bool(jobs["job-cancel"].replies))
        orchestrator.cancel("job-cancel")
        await orchestrator.wait_all()
        seen["stuck"] = not jobs["job-abandon"].task.done()
        async with asyncio.timeout(5):
            while (status := await client.status())["instances"]:
                await asyncio.sleep(0.02)
        seen["leases"] = status["daemon"]["leases"]
        seen["jobs"] = dict(jobs)
    return seen


def test_every_terminal_path_releases_every_adapter_of_the_job(start_daemon) -> None:
    config = (EXAMPLES / "supervisor.toml").read_text()
    daemon = start_daemon(config[config.index("[adapters."):])
    example = load_example()
    seen = asyncio.run(drive(example, daemon.socket))
    jobs = seen["jobs"]

    assert {job_id: job.state for job_id, job in jobs.items()} == {
        "job-complete": "completed",
        "job-fail": "failed",
        "job-cancel": "cancelled",
        "job-abandon": "abandoned",
        "job-crash": "crashed",
    }
    assert jobs["job-complete"].replies == ["ok plan", "ok edit", "ok test"]
    assert "status 7" in jobs["job-crash"].detail
    # The abandoned job's code never let go; release_job did, while it was stuck.
    assert seen["stuck"] and jobs["job-abandon"].released_by_job == 2
    assert seen["leases"] == 0

    spawned = [e for e in daemon.log_events() if e.get("event") == "adapter.spawned"]
    assert len(spawned) == 2 * len(example.DEMO_JOBS)
    assert tagged_survivors({e["instance"] for e in spawned}) == []
    roots = [pid for job in jobs.values() for pid in job.adapters.values()]
    assert all(process.identify(pid) is None or process.is_gone(process.identify(pid), our_pid=daemon.pid) for pid in roots)
