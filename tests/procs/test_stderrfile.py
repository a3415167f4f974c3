"""An instance's stderr in a followed file (supervisor/procs/stderrfile.py):
real writers, real files, the real inotify watch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from supervisor.procs import stderrfile
from supervisor.procs.stderr import capture_stderr, decode_tail
from supervisor.procs.stderrfile import KEEP_BYTES, READ_BYTES, StderrFiles


class Tail:
    """What capture_stderr fills (a root's stderr_tail)."""

    def __init__(self) -> None:
        import collections

        self.stderr_fd = None
        self.stderr_tail: collections.deque[bytes] = collections.deque(maxlen=100_000)


def write_lines(stderr_fd: int, count: int, width: int = 20) -> subprocess.Popen[bytes]:
    script = f"import sys\nfor i in range({count}):\n    sys.stderr.write('line %d ' % i + 'x' * {width} + '\\n')\n"
    return subprocess.Popen([sys.executable, "-c", script], stderr=stderr_fd)


@pytest.fixture
async def files(tmp_path: Path, nursery: trio.Nursery) -> StderrFiles:
    files = StderrFiles(str(tmp_path / "stderr"))
    files.prepare()
    await nursery.start(files.run)
    return files


async def test_every_line_a_writer_writes_is_read_in_order_and_the_end_comes_after_finish(files) -> None:
    followed = files.take()
    write_fd = followed.fd
    assert oct(os.stat(followed.path).st_mode & 0o777) == "0o600"
    # Fewer lines than the log budget's burst and the tail: every one is both.
    writer = write_lines(write_fd, 900)
    tail, logged = Tail(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(capture_stderr, tail, logged.append, lambda n: None, followed.receive)
        assert await trio.to_thread.run_sync(writer.wait) == 0
        with trio.fail_after(5):
            while len(tail.stderr_tail) < 900:
                await trio.sleep(0.01)
        followed.finish()
    assert [line.split()[1] for line in decode_tail(tail.stderr_tail, 900)] == [str(i) for i in range(900)]
    assert logged == [f"line {i} " + "x" * 20 for i in range(900)]
    followed.close()


async def test_a_reader_is_woken_by_a_write_without_polling(files) -> None:
    followed = files.take()
    write_fd = os.open(followed.path, os.O_WRONLY | os.O_APPEND)
    got = []

    async def read_one() -> None:
        got.append(await followed.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_one)
        await trio.testing.wait_all_tasks_blocked()
        os.write(write_fd, b"hello\n")
        with trio.fail_after(2):
            while not got:
                await trio.sleep(0.005)
    assert got == [b"hello\n"]
    os.close(write_fd)
    followed.close()


def test_a_writer_with_nobody_reading_never_blocks_and_never_gets_sigpipe(tmp_path: Path) -> None:
    files = StderrFiles(str(tmp_path / "stderr"))
    files.prepare()
    followed = files.take()
    write_fd = os.dup(followed.fd)
    followed.close()  # the daemon is gone
    # Far more than a pipe holds: a pipe with no reader would kill it
    # (SIGPIPE), a full pipe with a dead reader would block it.
    writer = write_lines(write_fd, 200_000)
    os.close(write_fd)
    assert writer.wait(timeout=60) == 0
    assert os.stat(followed.path).st_size > 4 * 2**20


async def test_what_was_read_is_deallocated_and_a_reader_far_behind_skips_ahead(files) -> None:
    followed = files.take()
    write_fd = os.open(followed.path, os.O_WRONLY | os.O_APPEND)
    # 6 MiB written before the reader looks: it skips to the last READ_BYTES.
    line = b"y" * 99 + b"\n"
    for _ in range(6 * 2**20 // len(line)):
        os.write(write_fd, line)
    data = await followed.receive()
    assert followed.skipped_bytes >= 6 * 2**20 - KEEP_BYTES - 2 * READ_BYTES
    assert data and data.endswith(b"\n") and set(data) <= set(line), "the first line after a skip starts whole"
    # Then read along with the writer: what is read is deallocated.
    for _ in range(3):
        for _ in range(2**20 // len(line)):
            os.write(write_fd, line)
        with trio.fail_after(5):
            while followed.offset < os.fstat(write_fd).st_size:
                await followed.receive()
    allocated = os.stat(followed.path).st_blocks * 512
    size = os.stat(followed.path).st_size
    assert size > 8 * 2**20
    assert allocated <= KEEP_BYTES + 2 * READ_BYTES, f"{allocated} bytes still allocated of {size}"
    os.close(write_fd)
    followed.close()


async def test_an_adopted_file_is_followed_from_near_its_end_and_removed_with_its_instance(tmp_path: Path) -> None:
    previous = StderrFiles(str(tmp_path / "stderr"))
    previous.prepare()
    followed = previous.take()
    write_fd = os.dup(followed.fd)
    followed.close()  # the previous incarnation is gone
    files = StderrFiles(str(tmp_path / "stderr"))
    name = followed.path.name
    for i in range(50_000):
        os.write(write_fd, f"old {i}\n".encode())
    assert files.leftovers() == [name]
    adopted = files.follow_existing(name)
    assert adopted is not None and files.leftovers() == []
    size = os.fstat(write_fd).st_size
    first = await adopted.receive()
    assert adopted.offset - len(first) == size - stderrfile.ADOPTED_TAIL_BYTES
    assert files.follow_existing("nonesuch.stderr") is None
    assert files.follow_existing("../" + name) is None
    files.remove(adopted)
    assert not adopted.path.exists()
    # Removed: the reader drains what is left, then sees the end.
    rest = b""
    with trio.fail_after(5):
        while chunk := await adopted.receive():
            rest += chunk
    assert (first + rest).endswith(b"old 49999\n")
    assert len(first + rest) == stderrfile.ADOPTED_TAIL_BYTES
    os.close(write_fd)
    adopted.close()


async def test_spares_are_made_ahead_and_a_take_leaves_no_file_behind_when_removed(files) -> None:
    with trio.fail_after(5):
        while len(os.listdir(files.directory)) < stderrfile.SPARE_FILES:
            await trio.sleep(0.01)
    assert files.leftovers() == []
    taken = files.take()
    files.remove(taken)
    taken.close()
    with trio.fail_after(5):
        while len(os.listdir(files.directory)) < stderrfile.SPARE_FILES:
            await trio.sleep(0.01)
    assert taken.path.name not in os.listdir(files.directory)
    files.close()
    assert os.listdir(files.directory) == []


async def test_a_flood_without_a_single_newline_never_holds_the_reader(files) -> None:
    followed = files.take()
    write_fd = os.open(followed.path, os.O_WRONLY | os.O_APPEND)
    # Far behind, and no line end anywhere: the reader skips, looks for a
    # line start for a bounded number of reads, then hands a piece on.
    os.write(write_fd, b"z" * (8 * 2**20))
    with trio.fail_after(5):
        data = await followed.receive()
    assert data and set(data) == {ord("z")}
    assert followed.offset <= os.fstat(write_fd).st_size
    assert followed.skipped_bytes >= 8 * 2**20 - 2 * READ_BYTES
    # And a writer that goes on without a line end is read in bounded bites.
    os.write(write_fd, b"z" * (4 * 2**20))
    with trio.fail_after(5):
        more = await followed.receive()
    assert 0 < len(more) <= READ_BYTES
    os.close(write_fd)
    followed.close()
