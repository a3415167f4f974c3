"""A tiny Agent Client Protocol agent, written with the official Python SDK
(`agent-client-protocol` on PyPI), to run as an adapter with ``stdio = "pipe"``.

It speaks ACP on stdin/stdout as a real agent does, without a model: it
answers each prompt with one message, ``<job> heard: <the prompt's text>``
(the job from the environment the daemon gives every adapter). Like the
real ones (``npm exec`` -> ``node`` -> the CLI) it is more than one process:
it starts a helper that would outlive it if nobody reaped the whole tree.
Diagnostics go to stderr, which the daemon keeps (``adapter-supervisor logs``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import acp
from acp.schema import AgentCapabilities, Implementation

# Stands in for the helpers real agents start (a language server, an MCP
# server): a child that would run on after the agent if left alone.
HELPER = ["sleep", "86400"]


class EchoAgent:
    """The agent side of ACP (`acp.Agent`): initialize, new session, prompt."""

    def __init__(self) -> None:
        self.job = os.environ.get("ADAPTER_SUPERVISOR_JOB", "?")
        self.client: acp.Client | None = None
        self.sessions = 0

    def on_connect(self, conn: acp.Client) -> None:
        self.client = conn

    async def initialize(self, protocol_version: int, client_capabilities: Any = None, client_info: Any = None, **kwargs: Any) -> acp.InitializeResponse:
        return acp.InitializeResponse(
            protocol_version=min(protocol_version, acp.PROTOCOL_VERSION),
            agent_capabilities=AgentCapabilities(),
            agent_info=Implementation(name="acp-echo", version="1"),
        )

    async def new_session(self, cwd: str, mcp_servers: Any = None, **kwargs: Any) -> acp.NewSessionResponse:
        self.sessions += 1
        return acp.NewSessionResponse(session_id=f"{self.job}-{self.sessions}")

    async def prompt(self, prompt: list[Any], session_id: str, **kwargs: Any) -> acp.PromptResponse:
        text = " ".join(block.text for block in prompt if getattr(block, "type", None) == "text")
        print(f"acp-echo: prompt in {session_id}: {text!r}", file=sys.stderr, flush=True)
        assert self.client is not None
        await self.client.session_update(session_id=session_id, update=acp.update_agent_message_text(f"{self.job} heard: {text}"))
        return acp.PromptResponse(stop_reason="end_turn")

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        pass  # every prompt is answered at once: nothing runs to cancel


async def main() -> None:
    helper = subprocess.Popen(HELPER)
    print(f"acp-echo: agent {os.getpid()} for job {os.environ.get('ADAPTER_SUPERVISOR_JOB')}, helper {helper.pid}", file=sys.stderr, flush=True)
    await acp.run_agent(EchoAgent())


if __name__ == "__main__":
    asyncio.run(main())
