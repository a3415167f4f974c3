"""An adapter's stdin and stdout, passed with an ``fds=True`` lease, as the
streams an async program wants: anyio byte streams (`PipeSendStream`,
`PipeReceiveStream`, what `AsyncLease.stdin` and `.stdout` are), and asyncio
``(StreamReader, StreamWriter)`` for libraries written for asyncio's streams,
such as the Agent Client Protocol SDK (`open_asyncio_streams`).
"""

from __future__ import annotations

import asyncio
import os

import anyio
import anyio.abc
import anyio.lowlevel

__all__ = ["ASYNCIO_STREAM_LIMIT", "PipeReceiveStream", "PipeSendStream", "open_asyncio_streams"]

# The longest line an asyncio StreamReader from `open_asyncio_streams` returns
# by default. An Agent Client Protocol message is one JSON line and may carry
# whole files; the ACP SDK's own stdio helpers allow 50 MiB. It bounds what a
# line may grow to, nothing is allocated ahead.
ASYNCIO_STREAM_LIMIT = 50 * 2**20


def _private_nonblocking(fd: int, flags: int) -> int:
    """A non-blocking descriptor for the pipe end `fd`, which it takes over.

    Every holder of an instance gets the same open pipe, and O_NONBLOCK belongs
    to the open file, so setting it on `fd` would switch the other holders'
    (perhaps blocking) reads and writes too. Opening the pipe again through
    /proc gives an open file of our own; without /proc, or when the other end is
    gone already, the shared one is used.
    """
    try:
        private = os.open(f"/proc/self/fd/{fd}", flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        os.set_blocking(fd, False)
        return fd
    os.close(fd)
    return private


class _PipeEnd:
    """What both ends share: the descriptor, handing it over, closing it."""

    _fd: int
    _closed: bool

    def take_fd(self) -> int:
        """Hand the descriptor over to the caller, who closes it; this stream
        is closed from then on. Raises anyio.ClosedResourceError if it is
        closed already."""
        if self._closed:
            raise anyio.ClosedResourceError
        self._closed = True
        return self._fd

    async def aclose(self) -> None:
        """Close the descriptor; idempotent. It is closed even if the call is
        cancelled."""
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._fd)
            os.close(self._fd)
        await anyio.lowlevel.checkpoint()


class PipeSendStream(_PipeEnd, anyio.abc.ByteSendStream):
    """The write end of an adapter's stdin as an anyio byte stream."""

    def __init__(self, fd: int) -> None:
        self._fd = _private_nonblocking(fd, os.O_WRONLY)
        self._closed = False

    async def send(self, item: bytes) -> None:
        """Write all of `item`. Raises anyio.BrokenResourceError if the adapter
        closed its stdin, anyio.ClosedResourceError after `aclose`. On
        cancellation part of `item` may have been written."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                await anyio.wait_writable(self._fd)
            except BrokenPipeError as exc:
                raise anyio.BrokenResourceError from exc


class PipeReceiveStream(_PipeEnd, anyio.abc.ByteReceiveStream):
    """The read end of an adapter's stdout as an anyio byte stream (wrap it in
    `anyio.streams.buffered.BufferedByteReceiveStream` to read lines)."""

    def __init__(self, fd: int) -> None:
        self._fd = _private_nonblocking(fd, os.O_RDONLY)
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Some bytes, at most `max_bytes`. Raises anyio.EndOfStream once every
        writer closed the pipe, anyio.ClosedResourceError after `aclose`.
        Cancellation raises Cancelled before anything is read: no byte is lost."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            return data


async def open_asyncio_streams(
    stdin_fd: int, stdout_fd: int, *, limit: int = ASYNCIO_STREAM_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[asyncio.BaseTransport, ...]]:
    """The pipe ends `stdout_fd` and `stdin_fd` as an asyncio StreamReader
    and StreamWriter, with the two transports that own them from now on
    (closing a transport closes its pipe). `limit` is the reader's longest
    line. Call it in asyncio's event loop (RuntimeError otherwise).

    On any failure, cancellation included, both descriptors are closed.
    """
    stdin_file, stdout_file = open(stdin_fd, "wb", buffering=0), open(stdout_fd, "rb", buffering=0)
    transports: list[asyncio.BaseTransport] = []
    try:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit)
        read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdout_file)
        transports.append(read_transport)
        # The protocol asyncio's own connections give a StreamWriter: it
        # provides the flow control `drain` waits on, and `wait_closed`.
        write_protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())
        write_transport, _ = await loop.connect_write_pipe(lambda: write_protocol, stdin_file)
        transports.append(write_transport)
    except BaseException:
        for transport in transports:
            transport.close()
        # A file a transport owns is closed again by it: closing twice is harmless.
        stdin_file.close()
        stdout_file.close()
        raise
    writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
    return reader, writer, (write_transport, read_transport)
