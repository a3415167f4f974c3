"""A closed-loop load generator: C connections, one request in flight on each.

Run as `python loadgen.py SYSTEM ENDPOINT CONNECTIONS START_NS WARMUP_S DURATION_S`
under the system's interpreter; several of these processes together make the
"32 concurrent clients" (one Python process would measure its own GIL, not the
daemon). Each connection sends the system's status request, waits for the whole
response (framed, not decoded), and sends the next at once. Requests are encoded
once. Counting starts WARMUP_S after START_NS (CLOCK_MONOTONIC) and lasts
DURATION_S; prints one JSON line: completions in the window, their latencies in
ns, and this process's CPU seconds during the window.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time

import wire

PROGRAM = "tree"


def status_request(system: str) -> bytes:
    if system == "ours":
        return wire.ours_request(1, "status")
    if system == "supervisord":
        return wire.xmlrpc_request("supervisor.getProcessInfo", PROGRAM)
    if system == "circus":
        return wire.circus_request("s", "status", {"name": PROGRAM})
    raise ValueError(system)


class CpuWindow:
    """This process's CPU seconds between the window's start and its end."""

    def __init__(self) -> None:
        self.begin: float | None = None
        self.end: float | None = None

    @staticmethod
    def now() -> float:
        times = os.times()
        return times.user + times.system

    def tick(self, now_ns: int, window: tuple[int, int]) -> None:
        if self.begin is None and now_ns >= window[0]:
            self.begin = self.now()
        if self.end is None and now_ns >= window[1]:
            self.end = self.now()

    @property
    def seconds(self) -> float:
        if self.begin is None:
            return 0.0
        return (self.end if self.end is not None else self.now()) - self.begin


def wait_until(deadline_ns: int) -> None:
    while (left := deadline_ns - time.monotonic_ns()) > 0:
        time.sleep(min(left / 1e9, 0.05))


def run_streams(system: str, endpoint: str, connections: int, start_ns: int, window: tuple[int, int],
                cpu: CpuWindow) -> list[int]:
    request = status_request(system)
    framer_type = wire.LineFramer if system == "ours" else wire.HttpFramer
    selector = selectors.EpollSelector()
    socks = []
    for _ in range(connections):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(endpoint)
        sock.setblocking(False)
        socks.append(sock)
    wait_until(start_ns)
    sent_at = {}
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ, framer_type())
        sent_at[sock] = time.monotonic_ns()
        sock.send(request)
    begin, end = window
    samples = []
    while True:
        for key, _ in selector.select(1.0):
            sock = key.fileobj
            data = sock.recv(wire.RECEIVE_BYTES)
            if not data:
                raise wire.ProtocolFailure("the server closed a connection")
            if not key.data.feed(data):
                continue
            now = time.monotonic_ns()
            cpu.tick(now, window)
            if now >= end:
                selector.unregister(sock)
                continue
            if now >= begin:
                samples.append(now - sent_at[sock])
            sent_at[sock] = now
            sock.send(request)
        if not selector.get_map():
            break
    for sock in socks:
        sock.close()
    return samples


def run_circus(endpoint: str, connections: int, start_ns: int, window: tuple[int, int], cpu: CpuWindow) -> list[int]:
    import zmq

    context = zmq.Context()
    poller = zmq.Poller()
    request = status_request("circus")
    socks = []
    for _ in range(connections):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        socks.append(sock)
    wait_until(start_ns)
    sent_at = {}
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
        sent_at[sock] = time.monotonic_ns()
        sock.send(request)
    begin, end = window
    samples = []
    active = len(socks)
    while active:
        for sock, _ in poller.poll(1000):
            sock.recv()
            now = time.monotonic_ns()
            cpu.tick(now, window)
            if now >= end:
                poller.unregister(sock)
                active -= 1
                continue
            if now >= begin:
                samples.append(now - sent_at[sock])
            sent_at[sock] = now
            sock.send(request)
    for sock in socks:
        sock.close(0)
    context.term()
    return samples


def main() -> None:
    system, endpoint = sys.argv[1], sys.argv[2]
    connections, start_ns = int(sys.argv[3]), int(sys.argv[4])
    warmup_s, duration_s = float(sys.argv[5]), float(sys.argv[6])
    begin = start_ns + int(warmup_s * 1e9)
    window = (begin, begin + int(duration_s * 1e9))
    cpu = CpuWindow()
    if system == "circus":
        samples = run_circus(endpoint, connections, start_ns, window, cpu)
    else:
        samples = run_streams(system, endpoint, connections, start_ns, window, cpu)
    # Only responses that completed inside the window are in `samples`.
    print(json.dumps({"latencies_ns": samples, "cpu_s": cpu.seconds}))


if __name__ == "__main__":
    main()
