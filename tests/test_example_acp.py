"""The Agent Client Protocol end to end, on the official Python SDK at both
ends: examples/acp_agent.py (`acp.run_agent`) runs as an adapter with pipes,
and examples/acp_orchestrator.py speaks to it with `acp.connect_to_agent`
over the fds of its lease, turned into asyncio streams. Initialize, a new
session, a prompt whose answer names the job, a release: then the agent's
whole tree (the agent and its helper) is gone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from supervisor.procs import process
from tests.conftest import PYTHON, eventually
from tests.test_example_orchestrator import EXAMPLES, load_example, tagged_survivors


def acp_adapter() -> str:
    command = [PYTHON, str(EXAMPLES / "acp_agent.py")]
    return f'[adapters.acp-echo]\ncommand = {json.dumps(command)}\nstdio = "pipe"\nstop_timeout = 2.0\n'


def test_an_acp_agent_answers_through_the_lease_and_its_tree_goes_with_the_release(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(acp_adapter())
    example = load_example("acp_orchestrator.py")
    answer = asyncio.run(example.ask(daemon.socket, "acp-echo", "job-acp", "hello there", cwd=str(tmp_path)))

    assert (answer.agent, answer.session_id) == ("acp-echo", "job-acp-1")
    assert (answer.text, answer.stop_reason) == ("job-acp heard: hello there", "end_turn")
    # The agent and the helper it started; both gone after the release.
    assert len(answer.pids) == 2 and answer.left == []
    spawned = [e for e in daemon.log_events() if e.get("event") == "adapter.spawned"]
    assert len(spawned) == 1 and spawned[0]["pid"] in answer.pids
    assert tagged_survivors({spawned[0]["instance"]}) == []
    assert all(process.identify(pid) is None or process.is_gone(process.identify(pid), our_pid=daemon.pid) for pid in answer.pids)
    client = daemon.client()
    assert client.status()["instances"] == []
    # What the agent said on stderr, kept by the daemon.
    prompted = "acp-echo: prompt in job-acp-1: 'hello there'"
    assert eventually(lambda: prompted in client.logs(spawned[0]["instance"])), client.logs(spawned[0]["instance"])
