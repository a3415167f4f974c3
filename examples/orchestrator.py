"""A small asyncio orchestrator that cannot leak its adapters.

Start the daemon with the example adapters (on a socket of its own, beside
the quick start's daemon), then run the demo, from the repository's root:

    .venv/bin/adapter-supervisor serve --config examples/supervisor.toml &
    .venv/bin/python examples/orchestrator.py            # or --socket PATH

Each job holds two adapters for its whole life: an `agent` it talks to over
stdin/stdout, and an `indexer` that just runs. A job ends in one of five ways:

* completed: every step got its answer;
* failed: the orchestrator's own code raised on a step;
* cancelled: somebody cancelled the job (its task is cancelled);
* abandoned: an exit rule gave up on it (no progress within `deadline_s`) and
  left its task stuck where it was (here: waiting for an approval that never
  comes);
* crashed: its agent died under it.

`Orchestrator._finish` is the one place where a job becomes terminal, and it
calls `release_job(job)`: the daemon then stops every adapter tree of the job,
whoever holds the leases and wherever that code is stuck. The
``async with client.lease(...)`` blocks release as well (on return, raise and
cancellation), so most paths are covered twice; the abandoned path is covered
only by `release_job`, because the code holding its leases never returns. That
is the leak this product exists to end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.client import AsyncClient, AsyncLease, ConnectionLost
from supervisor.core.config import load_config

# The example daemon's config: its socket is where the demo connects.
EXAMPLE_CONFIG = Path(__file__).with_name("supervisor.toml")

TERMINAL = frozenset({"completed", "failed", "cancelled", "abandoned", "crashed"})

# Seconds a running job may go without progress before the exit rule abandons it.
DEADLINE_S = 2.0

# How often the exit rule looks at the running jobs.
CHECK_INTERVAL_S = 0.1

# How long to wait for an agent's exit notice once its stdout has ended.
EXIT_NOTICE_S = 2.0

# Longest answer line read from an agent.
MAX_REPLY_BYTES = 65536

# Steps with a meaning to the orchestrator itself; any other step is sent to the agent.
FAIL_STEP = "fail"
APPROVAL_STEP = "wait-for-approval"

# The demo: one job per terminal path ("job-cancel" is cancelled by `demo`).
DEMO_JOBS: dict[str, list[str]] = {
    "job-complete": ["plan", "edit", "test"],
    "job-fail": ["plan", FAIL_STEP, "test"],
    "job-cancel": ["plan", APPROVAL_STEP, "test"],
    "job-abandon": ["plan", APPROVAL_STEP, "test"],
    "job-crash": ["plan", "crash", "test"],
}


class AdapterCrashed(Exception):
    """A job's agent exited while the job needed it."""


@dataclass
class Job:
    id: str
    steps: list[str]
    state: str = "pending"
    detail: str = ""
    replies: list[str] = field(default_factory=list)
    # Root pid of each adapter the job held, by adapter name.
    adapters: dict[str, int | None] = field(default_factory=dict)
    # How many leases `release_job` found still held when the job ended.
    released_by_job: int = 0
    last_progress: float = 0.0
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Orchestrator:
    """Runs jobs as asyncio tasks; use as ``async with Orchestrator(client):``
    (the exit rule runs inside; leaving cancels whatever is still running)."""

    def __init__(self, client: AsyncClient, *, deadline_s: float = DEADLINE_S) -> None:
        self.client = client
        self.deadline_s = deadline_s
        self.jobs: dict[str, Job] = {}
        self._exit_rule: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._exit_rule = asyncio.create_task(self._enforce_deadlines(), name="exit-rule")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        tasks = [job.task for job in self.jobs.values() if job.task is not None and not job.task.done()]
        if self._exit_rule is not None:
            tasks.append(self._exit_rule)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def submit(self, job_id: str, steps: list[str]) -> Job:
        job = Job(job_id, steps, last_progress=asyncio.get_running_loop().time())
        self.jobs[job_id] = job
        job.task = asyncio.create_task(self._run(job), name=job_id)
        return job

    def cancel(self, job_id: str) -> None:
        task = self.jobs[job_id].task
        if task is not None:
            task.cancel()

    async def wait_all(self) -> None:
        """Until every submitted job is terminal (stuck tasks may still run)."""
        for job in list(self.jobs.values()):
            await job.done.wait()

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)

    # -- a job's life --

    async def _run(self, job: Job) -> None:
        job.state = "running"
        try:
            await self._work(job)
        except asyncio.CancelledError:
            await self._finish(job, "cancelled", "cancelled on request")
            raise
        except AdapterCrashed as exc:
            await self._finish(job, "crashed", str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure of the job's own code is its "failed" path
            await self._finish(job, "failed", repr(exc))
        else:
            await self._finish(job, "completed", f"{len(job.replies)} steps")

    async def _work(self, job: Job) -> None:
        async with self.client.lease(job.id, "agent", fds=True) as agent, self.client.lease(job.id, "indexer") as indexer:
            job.adapters = {"agent": agent.pid, "indexer": indexer.pid}
            job.last_progress = asyncio.get_running_loop().time()
            assert agent.stdout is not None
            replies = BufferedByteReceiveStream(agent.stdout)
            for step in job.steps:
                if step == FAIL_STEP:
                    raise ValueError(f"step {step!r} is not a valid tool call")
                if step == APPROVAL_STEP:
                    await asyncio.Event().wait()  # an approval that never comes
                job.replies.append(await self._ask(agent, replies, step))
                job.last_progress = asyncio.get_running_loop().time()

    async def _ask(self, agent: AsyncLease, replies: BufferedByteReceiveStream, step: str) -> str:
        """Send `step` to the agent and return its answer; raises AdapterCrashed
        if the agent exits first."""
        assert agent.stdin is not None
        await agent.stdin.send(step.encode() + b"\n")
        reading = asyncio.ensure_future(replies.receive_until(b"\n", MAX_REPLY_BYTES))
        exiting = asyncio.ensure_future(agent.wait_exited())
        try:
            await asyncio.wait({reading, exiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reading, exiting):
                task.cancel()
            await asyncio.gather(reading, exiting, return_exceptions=True)
        if not reading.cancelled() and reading.exception() is None:
            return reading.result().decode()
        # The agent is gone; its exit notice may trail the end of its stdout a little.
        with contextlib.suppress(TimeoutError, ConnectionLost):
            async with asyncio.timeout(EXIT_NOTICE_S):
                await agent.wait_exited()
        exited = agent.exited
        if exited is None:
            raise AdapterCrashed("the agent closed its stdout")
        raise AdapterCrashed(f"the agent exited with status {exited.returncode} ({exited.reason})")

    async def _enforce_deadlines(self) -> None:
        """The exit rule: a running job without progress for `deadline_s` is abandoned."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            for job in list(self.jobs.values()):
                if job.state == "running" and loop.time() - job.last_progress > self.deadline_s:
                    await self._finish(job, "abandoned", f"no progress for {self.deadline_s:g} s")

    async def _finish(self, job: Job, state: str, detail: str) -> None:
        """The one place a job becomes terminal. It releases every lease of the
        job, whoever holds it, so no terminal path can forget its adapters."""
        if job.state in TERMINAL:
            return
        job.state, job.detail = state, detail
        try:
            # Shielded: a job cancelled while finishing must still let go.
            released = await asyncio.shield(self.client.release_job(job.id))
            job.released_by_job = released["released"]
        except ConnectionLost:
            job.detail += " (daemon unreachable: the leases went with the connection)"
        finally:
            job.done.set()


async def demo(socket_path: str | None = None, *, deadline_s: float = DEADLINE_S) -> dict[str, Job]:
    """Run one job down each terminal path; returns the jobs."""
    async with AsyncClient(socket_path) as client, Orchestrator(client, deadline_s=deadline_s) as orchestrator:
        for job_id, steps in DEMO_JOBS.items():
            orchestrator.submit(job_id, steps)
        cancelled = orchestrator.jobs["job-cancel"]
        await orchestrator.until(lambda: bool(cancelled.replies))
        orchestrator.cancel(cancelled.id)
        await orchestrator.wait_all()
        return dict(orchestrator.jobs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help=f"the daemon's control socket (default: the one {EXAMPLE_CONFIG.name} names)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds without progress before a job is abandoned")
    args = parser.parse_args()
    socket_path = args.socket or load_config(EXAMPLE_CONFIG).daemon.socket
    jobs = asyncio.run(demo(socket_path, deadline_s=args.deadline))
    width = max(len(job_id) for job_id in jobs)
    for job in jobs.values():
        pids = ", ".join(f"{name} {pid}" for name, pid in job.adapters.items())
        print(f"{job.id:<{width}}  {job.state:<9}  {job.detail}  [{pids}; release_job found {job.released_by_job}]")

    async def leftovers() -> int:
        async with AsyncClient(socket_path) as client:
            with contextlib.suppress(TimeoutError), anyio.fail_after(5):
                while (await client.status())["instances"]:
                    await anyio.sleep(0.05)
            return len((await client.status())["instances"])

    remaining = asyncio.run(leftovers())
    print(f"adapter instances left: {remaining}")
    return 0 if remaining == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
