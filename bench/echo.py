"""The floor of a control round trip on our stack: a trio server that answers
each NDJSON line at once, with a small msgspec-encoded result.

Run as `python echo.py SOCKET` with the project's interpreter (trio, msgspec).
It decodes the request's id, encodes `{"jsonrpc": "2.0", "id": ..., "result":
{}}` and writes it back: what any JSON-RPC server on trio over a Unix socket
must at least do, with no handler behind it. Exits on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import msgspec
import trio

RECEIVE_BYTES = 65536


class Envelope(msgspec.Struct):
    id: int | str | None = None


async def serve_connection(stream: trio.SocketStream) -> None:
    decoder = msgspec.json.Decoder(Envelope)
    encoder = msgspec.json.Encoder()
    buffer = b""
    async with stream:
        while True:
            try:
                data = await stream.receive_some(RECEIVE_BYTES)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            out = b"".join(
                encoder.encode({"jsonrpc": "2.0", "id": decoder.decode(line).id, "result": {}}) + b"\n"
                for line in lines
            )
            if out:
                try:
                    await stream.send_all(out)
                except trio.BrokenResourceError:
                    return


async def main(path: str) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(socket.SOMAXCONN)
    listener = trio.SocketListener(sock)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, serve_connection, [listener])
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    os.unlink(path)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
