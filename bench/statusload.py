"""Status requests on C connections, one in flight on each, for a while, with
the time each was sent: `python statusload.py SOCKET CONNECTIONS DURATION_S`.

Prints one JSON line: `requests` as [sent_ns, latency_ns] pairs
(CLOCK_MONOTONIC), `failed` (answers that were errors), `closed` (connections
the daemon closed), `unanswered` (requests still waiting when a connection
closed or the time ran out and the last answers did not come within 10 s).
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time

REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"status","params":{}}\n'
DRAIN_S = 10.0


def main() -> None:
    path, count, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    selector = selectors.DefaultSelector()
    sent_at: dict[socket.socket, int] = {}
    buffers: dict[socket.socket, bytes] = {}
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
        sock.sendall(REQUEST)
        sent_at[sock] = time.monotonic_ns()
    requests: list[tuple[int, int]] = []
    failed = closed = 0
    stop_at = time.monotonic() + duration
    while sent_at and time.monotonic() < stop_at + DRAIN_S:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                closed += 1
                selector.unregister(sock)
                sent_at.pop(sock, None)
                continue
            buffers[sock] += data
            while b"\n" in buffers[sock]:
                line, buffers[sock] = buffers[sock].split(b"\n", 1)
                now = time.monotonic_ns()
                requests.append((sent_at[sock], now - sent_at[sock]))
                if b'"result"' not in line[:40]:
                    failed += 1
                if time.monotonic() < stop_at:
                    sock.sendall(REQUEST)
                    sent_at[sock] = time.monotonic_ns()
                else:
                    selector.unregister(sock)
                    del sent_at[sock]
    print(json.dumps({"requests": requests, "failed": failed, "closed": closed, "unanswered": len(sent_at)}))


if __name__ == "__main__":
    main()
