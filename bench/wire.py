"""Minimal blocking clients for the three control protocols under test.

Standard library only (circus needs pyzmq, imported only when a circus client is
made), because this module is loaded by the client processes of every system,
each under that system's own interpreter. Requests are encoded once where the
benchmark repeats them, and responses are only framed in hot loops, so that the
client spends as little as possible per request and the same for every system:

* ours: JSON-RPC 2.0, one message per line, over a Unix stream socket;
* supervisord: XML-RPC over HTTP/1.1 keep-alive, over its Unix socket;
* circus: JSON over a ZeroMQ DEALER socket to circusd's ROUTER (ipc://).

`Framer`s split a byte stream into whole responses without decoding them; the
load generator uses them directly on non-blocking sockets.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import time
import xmlrpc.client
from typing import Any

# Bytes asked for per read. Below glibc's mmap threshold (128 KiB) on purpose:
# Python allocates the whole buffer for every recv, and a 256 KiB one cost an
# mmap, an mremap and a munmap per read, ~20 us added to every raw-socket round
# trip of every system (strace -c of the 1-client loop: 3 of its 5 system
# calls). One status response of a daemon with a few instances is a few KiB;
# a larger answer (a sweep report with a thousand orphans) takes more reads.
RECEIVE_BYTES = 65536
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class ProtocolFailure(Exception):
    """The system answered with an error, or with something that is not an answer."""


class LineFramer:
    """Whole newline-terminated messages out of a byte stream."""

    def __init__(self) -> None:
        # The start of an unfinished line, and the reads since that hold no
        # newline: kept apart rather than appended to each other, so that a
        # line of megabytes (`status` at 10,000 instances) read 64 kB at a
        # time costs the client linear time, not quadratic.
        self.buffer = b""
        self.pieces: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            self.pieces.append(data)
            return []
        if self.pieces:
            data = b"".join(self.pieces) + data
            self.pieces = []
        *lines, self.buffer = (self.buffer + data if self.buffer else data).split(b"\n")
        return lines


class HttpFramer:
    """Whole HTTP/1.1 responses (with Content-Length) out of a byte stream; each
    message is the response body."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        bodies = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return bodies
            match = _CONTENT_LENGTH.search(self.buffer, 0, end + 2)
            if match is None:
                raise ProtocolFailure(f"HTTP response without Content-Length: {self.buffer[:200]!r}")
            total = end + 4 + int(match.group(1))
            if len(self.buffer) < total:
                return bodies
            bodies.append(self.buffer[end + 4 : total])
            self.buffer = self.buffer[total:]


def ours_request(request_id: int, method: str, params: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}).encode() + b"\n"


def xmlrpc_request(method: str, *args: Any) -> bytes:
    body = xmlrpc.client.dumps(args, method).encode()
    head = f"POST /RPC2 HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def circus_request(request_id: str, command: str, properties: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"id": request_id, "command": command, "properties": properties or {}}).encode()


class StreamClient:
    """A blocking Unix-socket client for ours (lines) or supervisord (HTTP)."""

    def __init__(self, path: str, framer: LineFramer | HttpFramer, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.framer = framer
        self.pending: list[bytes] = []
        # CLOCK_MONOTONIC ns of the last request's send and of the read that
        # completed the last response taken: the exchange at the socket, without
        # the client's own encoding and decoding.
        self.sent_ns = 0
        self.received_ns = 0

    def close(self) -> None:
        self.sock.close()

    def exchange(self, request: bytes) -> bytes:
        """Send one encoded request and return the next whole response, raw."""
        self.sent_ns = time.monotonic_ns()
        self.sock.sendall(request)
        return self.next_response()

    def next_response(self) -> bytes:
        """The next whole response, read as it arrives."""
        if not self.pending:
            while not self.pending:
                data = self.sock.recv(RECEIVE_BYTES)
                if not data:
                    raise ProtocolFailure("the server closed the connection")
                self.pending.extend(self.framer.feed(data))
            self.received_ns = time.monotonic_ns()
        return self.pending.pop(0)


class OursClient:
    """JSON-RPC lines; notifications (no id) are skipped."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.stream = StreamClient(path, LineFramer(), timeout)
        self.ids = itertools.count(1)

    def close(self) -> None:
        self.stream.close()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        request_id = next(self.ids)
        response = json.loads(self.stream.exchange(ours_request(request_id, method, params)))
        while response.get("id") != request_id:
            response = self.next_message()
        if "error" in response:
            raise ProtocolFailure(f"{method}: {response['error']}")
        return response["result"]

    def next_message(self) -> dict[str, Any]:
        return json.loads(self.stream.next_response())


class SupervisordClient:
    """XML-RPC over one keep-alive HTTP connection."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.stream = StreamClient(path, HttpFramer(), timeout)

    def close(self) -> None:
        self.stream.close()

    def call(self, method: str, *args: Any) -> Any:
        body = self.stream.exchange(xmlrpc_request(method, *args))
        try:
            (result,), _ = xmlrpc.client.loads(body)
        except xmlrpc.client.Fault as fault:
            raise ProtocolFailure(f"{method}: {fault.faultString}") from None
        return result


class CircusClient:
    """circusctl's protocol: a DEALER socket, JSON messages matched by id."""

    def __init__(self, endpoint: str, timeout: float = 30.0) -> None:
        import zmq  # only the circus client processes have pyzmq

        self.zmq = zmq
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)
        # As StreamClient's: the last exchange at the socket.
        self.sent_ns = 0
        self.received_ns = 0

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()

    def exchange(self, request_id: str, request: bytes) -> bytes:
        self.sent_ns = time.monotonic_ns()
        self.sock.send(request)
        marker = f'"{request_id}"'.encode()
        while True:
            reply = self.sock.recv()
            if marker in reply:
                self.received_ns = time.monotonic_ns()
                return reply

    def call(self, command: str, properties: dict[str, Any] | None = None) -> Any:
        request_id = f"c{next(self.ids)}"
        reply = json.loads(self.exchange(request_id, circus_request(request_id, command, properties)))
        if reply.get("status") == "error":
            raise ProtocolFailure(f"{command}: {reply}")
        return reply
