"""In-place upgrade (SPEC rule 10), against the real daemon: the `upgrade`
method, SIGUSR2 and a refused check; same pid, no connection closed, every
request answered once, adapters and their pipes untouched."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from supervisor.client import Client, DaemonError
from supervisor.procs import process
from tests.conftest import PYTHON, eventually, read_pidfile, tree_adapter, wait_all_gone

MODES = [pytest.param("auto", id="cgroup"), pytest.param("off", id="process-table")]

CHATTY = "import sys, time\ni = 0\nwhile True:\n    sys.stderr.write('tick %d\\n' % i); sys.stderr.flush(); i += 1; time.sleep(0.005)\n"


def adapters(tmp_path: Path) -> str:
    chatty = f"[adapters.chatty]\ncommand = {json.dumps([PYTHON, '-c', CHATTY])}\nstop_timeout = 1.0\n"
    echo = '[adapters.echo]\ncommand = ["/bin/cat"]\nstdio = "pipe"\nstop_timeout = 1.0\n'
    return tree_adapter("tree", pidfile=tmp_path / "{job}.pids", stop_timeout=1.0) + "\n" + chatty + echo


@pytest.mark.parametrize("cgroup", MODES)
def test_an_upgrade_keeps_the_pid_every_connection_lease_adapter_and_pipe(start_daemon, tmp_path: Path, cgroup: str) -> None:
    daemon = start_daemon(adapters(tmp_path), cgroup=cgroup)
    holder = daemon.client()
    before = holder.call("hello")
    bound = holder.call("acquire", {"job": "job-b", "adapter": "tree"})
    members = read_pidfile(tmp_path / "job-b.pids")
    chatty = holder.call("acquire", {"job": "job-s", "adapter": "chatty"})
    echo, (stdin_fd, stdout_fd) = holder.call_with_fds("acquire", {"job": "job-e", "adapter": "echo", "fds": True})
    stdin, stdout = os.fdopen(stdin_fd, "wb", buffering=0), os.fdopen(stdout_fd, "rb", buffering=0)
    stdin.write(b"before\n")
    assert stdout.readline() == b"before\n"
    status_before = {row["job"]: row for row in holder.call("status")["instances"]}

    # A raw client pipelines requests around the upgrade on one connection.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(daemon.socket)
    raw.settimeout(60)
    upgrader = daemon.client(timeout=90)
    answer = upgrader.call("upgrade", {})
    assert answer["pid"] == daemon.pid and answer["generation"] == before["generation"] + 1

    hello = holder.call("hello")
    assert hello["pid"] == daemon.pid and hello["generation"] == before["generation"] + 1
    assert hello["instance_id"] == before["instance_id"], "an upgrade is the same daemon: bound leases live on"
    status_after = {row["job"]: row for row in holder.call("status")["instances"]}
    for job, row in status_before.items():
        assert (status_after[job]["instance"], status_after[job]["pid"], status_after[job]["refcount"]) == (
            row["instance"], row["pid"], row["refcount"]
        )
    assert all(process.is_running(m) for m in members.values())
    # The fds handed out before work after; stderr is still followed.
    stdin.write(b"after\n")
    assert stdout.readline() == b"after\n"
    last = int(holder.call("logs", {"lease": chatty["lease"], "lines": 1})["lines"][0].split()[1])
    assert eventually(lambda: int(holder.call("logs", {"lease": chatty["lease"], "lines": 1})["lines"][0].split()[1]) > last)
    # The raw connection made before the upgrade is served after it.
    raw.sendall(b'{"jsonrpc":"2.0","id":7,"method":"hello","params":{}}\n')
    assert json.loads(raw.makefile("rb").readline())["result"]["generation"] == hello["generation"]
    raw.close()
    # The bound lease is still the holder's: releasing it stops the tree whole.
    assert holder.call("release", {"lease": bound["lease"]}) == {"refcount": 0, "stopping": True}
    assert not wait_all_gone(members, daemon.pid, timeout=3.0)
    # And closing the holder's connection releases what it still holds.
    stdin.close()
    stdout.close()
    holder.close()
    checker = daemon.client()
    assert eventually(lambda: not checker.call("status")["instances"], timeout=5)


def test_sigusr2_upgrades_and_a_refused_check_leaves_the_daemon_serving(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(adapters(tmp_path), cgroup="off")
    client = daemon.client()
    lease = client.call("acquire", {"job": "job-b", "adapter": "tree"})
    generation = client.call("hello")["generation"]
    os.kill(daemon.pid, signal.SIGUSR2)
    daemon.wait_for_event("daemon.upgrading", timeout=30)
    assert eventually(lambda: client.call("hello")["generation"] == generation + 1, timeout=30)
    # A config the new code rejects: the check fails, nothing changes.
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[adapters.broken]\ncommand = []\n")
    with pytest.raises(DaemonError) as refused:
        daemon.client(timeout=90).call("upgrade", {})
    assert refused.value.code == 1008 and "check failed" in refused.value.message
    hello = client.call("hello")
    assert hello["generation"] == generation + 1 and hello["pid"] == daemon.pid
    assert client.call("status")["instances"][0]["refcount"] == 1
    client.call("release", {"lease": lease["lease"]})
