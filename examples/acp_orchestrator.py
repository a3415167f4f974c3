"""An orchestrator that talks the Agent Client Protocol to an agent the daemon runs.

Start the daemon with the example adapters (examples/supervisor.toml has
`acp-echo`, examples/acp_agent.py), then ask the agent something:

    .venv/bin/pip install -q agent-client-protocol
    .venv/bin/adapter-supervisor serve --config examples/supervisor.toml &
    .venv/bin/python examples/acp_orchestrator.py "hello there"

The orchestrator takes a lease with ``fds=True``, turns the adapter's stdin
and stdout into asyncio streams (`AsyncLease.asyncio_streams`) and hands
them to the official ACP SDK's client side (`acp.connect_to_agent`):
initialize, a new session, one prompt. The agent's answer streams back as
`session/update` notifications. Leaving the lease block releases it, and the
daemon stops the agent's whole process tree; the orchestrator checks that
nothing of it is left. ``--adapter`` names another ACP adapter, such as
Claude's (README, "Running Claude's ACP adapter").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import acp
import psutil
from acp.schema import AgentMessageChunk, DeniedOutcome, Implementation, TextContentBlock

from supervisor.client import AsyncClient
from supervisor.core.config import load_config

# The example daemon's config: its socket is where this orchestrator connects.
EXAMPLE_CONFIG = Path(__file__).with_name("supervisor.toml")

# A real agent thinks for a while; the echo agent answers at once.
PROMPT_TIMEOUT_S = 300.0

# How long the agent's tree may take to go after the release: its
# `stop_timeout` and a second.
GONE_TIMEOUT_S = 10.0


@dataclass
class Conversation:
    """The client side of ACP (`acp.Client`): collects what the agent says."""

    chunks: list[str] = field(default_factory=list)
    updates: int = 0

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.updates += 1
        if isinstance(update, AgentMessageChunk) and isinstance(update.content, TextContentBlock):
            self.chunks.append(update.content.text)

    async def request_permission(self, session_id: str, tool_call: Any, options: Any, **kwargs: Any) -> acp.RequestPermissionResponse:
        # An orchestrator without a person to ask: no tool runs unasked.
        return acp.RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))


@dataclass
class Answer:
    agent: str
    session_id: str
    text: str
    stop_reason: str
    # The agent's process tree while it answered, and what was left of it
    # after the release (nothing, unless something went wrong).
    pids: list[int]
    left: list[int]


async def ask(socket_path: str | None, adapter: str, job: str, prompt: str, *, cwd: str) -> Answer:
    """Acquire `adapter` for `job`, ask it `prompt` over ACP, release it, and
    wait for its tree to be gone. Raises what the client raises (the
    adapter is unknown, has no pipes, ...), acp.RequestError for an error
    of the agent's, TimeoutError."""
    async with AsyncClient(socket_path) as client:
        async with client.lease(job, adapter, fds=True) as lease:
            reader, writer = await lease.asyncio_streams()
            conversation = Conversation()
            async with acp.connect_to_agent(conversation, writer, reader) as agent:
                hello = await agent.initialize(
                    protocol_version=acp.PROTOCOL_VERSION,
                    client_info=Implementation(name="adapter-supervisor-example", version="1"),
                )
                session = await agent.new_session(cwd=cwd)
                async with asyncio.timeout(PROMPT_TIMEOUT_S):
                    result = await agent.prompt(session_id=session.session_id, prompt=[acp.text_block(prompt)])
            (row,) = (await client.status(job))["instances"]
            tree = _processes(row["pids"])
        # The lease is released: the daemon stops the agent's whole tree.
        left = tree
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GONE_TIMEOUT_S):
                while left := [process for process in tree if _alive(process)]:
                    await asyncio.sleep(0.05)
    name = hello.agent_info.name if hello.agent_info is not None else "?"
    pids = [process.pid for process in tree]
    return Answer(name, session.session_id, "".join(conversation.chunks), result.stop_reason, pids, [p.pid for p in left])


def _processes(pids: list[int]) -> list[psutil.Process]:
    """The processes of `pids` that still run, held by pid and start time."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(pid))
    return found


def _alive(process: psutil.Process) -> bool:
    """Whether `process` still runs: the same process (is_running compares
    its start time, so a reused pid is not it), and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="hello", help="what to ask the agent")
    parser.add_argument("--adapter", default="acp-echo", help="an ACP adapter of the daemon's config (stdio = \"pipe\")")
    parser.add_argument("--job", default="acp-job-1", help="the job the lease is for")
    parser.add_argument("--cwd", default=os.getcwd(), help="the session's working directory, as the agent sees it")
    parser.add_argument("--socket", help=f"the daemon's control socket (default: the one {EXAMPLE_CONFIG.name} names)")
    args = parser.parse_args()
    socket_path = args.socket or load_config(EXAMPLE_CONFIG).daemon.socket
    answer = asyncio.run(ask(socket_path, args.adapter, args.job, args.prompt, cwd=args.cwd))
    print(f"{answer.agent} (session {answer.session_id}, {answer.stop_reason}): {answer.text}")
    print(f"agent tree {answer.pids}: {'gone' if not answer.left else f'still running: {answer.left}'}")
    return 0 if not answer.left else 1


if __name__ == "__main__":
    sys.exit(main())
