"""Our daemon's resident memory: idle, and with many open client connections
(1000 in the quick run, 10,000 in the full one).

(RSS with live instances comes from the sweep and fill workloads, which hold
them.) Every connection sends `hello` and reads the answer before the
measurement, so the daemon has accepted and registered each one; the count
the daemon reports is asked on one of them (a connection more could be past
its limit, half its open-file limit).
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from bench import procwatch, systems, wire
from bench.session import Session

CONNECTIONS = 1000

# Let the daemon's allocator settle after the connections are served.
SETTLE_S = 0.5

# Connections opened (and answered) at once.
CONNECT_BATCH = 200

# A connect refused for a full listen backlog is tried again for this long.
CONNECT_TIMEOUT_S = 30.0


def run(session: Session, system: systems.Ours, connections: int = CONNECTIONS) -> dict[str, Any]:
    client = wire.OursClient(system.endpoint)
    client.call("status")
    client.close()
    time.sleep(SETTLE_S)
    idle = procwatch.rss_bytes(system.pid)
    session.log(f"footprint: {connections} open connections")
    socks: list[socket.socket] = []
    try:
        hello = wire.ours_request(1, "hello")
        # In batches, each answered before the next connects: thousands of
        # connects at once overflow the listen backlog (EAGAIN).
        for start in range(0, connections, CONNECT_BATCH):
            batch = [connect(system.endpoint) for _ in range(min(CONNECT_BATCH, connections - start))]
            socks += batch
            for sock in batch:
                sock.sendall(hello)
            for sock in batch:
                framer = wire.LineFramer()
                while True:
                    data = sock.recv(wire.RECEIVE_BYTES)
                    if not data:
                        raise RuntimeError("the daemon closed a connection during the footprint workload")
                    if framer.feed(data):
                        break
        time.sleep(SETTLE_S)
        with_connections = procwatch.rss_bytes(system.pid)
        status = ask_status(socks[0])
    finally:
        for sock in socks:
            sock.close()
    return {
        "idle_rss_bytes": idle,
        "connections": connections,
        "connections_seen_by_daemon": status["daemon"]["connections"],
        "rss_with_connections_bytes": with_connections,
        "per_connection_bytes": round((with_connections - idle) / connections),
    }


def ask_status(sock: socket.socket) -> dict[str, Any]:
    """`status` on an open connection (whose `hello` was answered)."""
    sock.sendall(wire.ours_request(2, "status"))
    framer = wire.LineFramer()
    while True:
        data = sock.recv(wire.RECEIVE_BYTES)
        if not data:
            raise RuntimeError("the daemon closed a connection during the footprint workload")
        for line in framer.feed(data):
            message = json.loads(line)
            if message.get("id") == 2:
                return message["result"]


def connect(path: str) -> socket.socket:
    """A connection to the daemon, trying again while its listen backlog is full."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)
