"""Chaos: a dozen client processes acquiring, releasing, disconnecting and being
SIGKILLed at random for several seconds. Afterwards nothing may be left: no
instance, no lease, no tagged process, no zombie, and the daemon still answers.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.procs import process
from tests.conftest import PYTHON, eventually, tree_adapter

CLIENTS = 12
DURATION_S = 6.0
SEED = 20261122

# Each client loops: connect, take one to three leases on a small set of pairs
# (so instances are shared), then release some, release_job sometimes, and
# either close cleanly or just drop the connection.
CLIENT_SCRIPT = r"""
import random, sys, time
from supervisor.client import Client, DaemonError, ConnectionLost
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
adapters = ["tree", "shell"]
while True:
    try:
        client = Client(path, timeout=10)
        leases = []
        for _ in range(rng.randint(1, 3)):
            job = f"job-{rng.randint(0, 4)}"
            params = {"job": job, "adapter": rng.choice(adapters)}
            if rng.random() < 0.2:
                params |= {"detach": True, "ttl": 0.5}
            try:
                leases.append(client.call("acquire", params)["lease"])
            except DaemonError:
                pass
        time.sleep(rng.random() * 0.2)
        for lease in leases:
            if rng.random() < 0.5:
                try:
                    client.call("release", {"lease": lease})
                except DaemonError:
                    pass
        if rng.random() < 0.15:
            client.call("release_job", {"job": f"job-{rng.randint(0, 4)}"})
        if rng.random() < 0.5:
            client.close()
        else:
            client.sock.close()
    except (OSError, ConnectionLost):
        time.sleep(0.05)
"""


@pytest.mark.parametrize("cgroup", ["auto", "off"])
def test_chaos_leaves_no_instance_lease_process_or_zombie(start_daemon, tmp_path: Path, cgroup: str) -> None:
    adapters = tree_adapter("tree", pidfile=tmp_path / "pids", stop_timeout=0.5, max_instances=16) + (
        '[adapters.shell]\ncommand = ["/bin/sh", "-c", "(sleep 3600 & wait) & sleep 3600"]\nstop_timeout = 0.5\n'
    )
    daemon = start_daemon(adapters, cgroup=cgroup)
    rng = random.Random(SEED)
    clients: list[subprocess.Popen[bytes]] = []

    def start_client() -> None:
        clients.append(subprocess.Popen([PYTHON, "-c", CLIENT_SCRIPT, daemon.socket, str(rng.randrange(2**32))]))

    for _ in range(CLIENTS):
        start_client()
    killed = 0
    deadline = time.monotonic() + DURATION_S
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.3))
            victim = rng.choice([c for c in clients if c.poll() is None])
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed += 1
            start_client()
    finally:
        for client in clients:
            client.kill()
            client.wait()
    assert killed >= 10

    observer = daemon.client()
    # Bound leases died with their connections; detached ones expire (ttl 0.5 s).
    def settled() -> bool:
        status = observer.call("status")
        return status["instances"] == [] and status["daemon"]["leases"] == 0

    assert eventually(settled, timeout=10.0), observer.call("status")
    spawned = [e for e in daemon.log_events() if e.get("event") == "adapter.spawned"]
    assert len(spawned) >= 10, "the chaos did not exercise spawning"
    tags = {e["instance"] for e in spawned}
    leftovers = [
        (s.pid, s.state) for s in process.scan_processes()
        if process.read_environ_tag(s.pid) in tags or (s.ppid == daemon.pid and s.state == "Z")
    ]
    assert leftovers == []
    assert observer.call("hello")["server"] == "adapter-supervisor"
    incomplete = [e for e in daemon.log_events() if e.get("event") in ("tree.reap_incomplete", "request.crashed")]
    assert incomplete == []
