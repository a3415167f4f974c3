"""An instance's stderr in a file the daemon follows: `StderrFiles`.

Every root writes its stderr (which its whole tree inherits) to a file of
its own in one directory, opened with O_APPEND. A file, not a pipe, so that an
adapter never depends on the daemon being there: while the daemon is away (a
crash, a restart) its writes neither block on a full pipe nor die of SIGPIPE;
they land in the file, and the next incarnation reads them. The daemon reads
with `pread` on the same open file (its offset is its own), and keeps a few
files created ahead (SPARE_FILES), since creating one costs a cold acquire
more than the rest of its spawn.

The daemon reads each file from where it last stopped, woken by one inotify
watch on the directory (or, where inotify is refused, by a poll every
POLL_S); the watch is read at most every COALESCE_S, so that the kernel
folds a flood of writes into one event. The file is kept bounded: once at
least KEEP_BYTES of it have been read, the read part is deallocated
(FALLOC_FL_PUNCH_HOLE: the size stays, the blocks go, and writers appending
at the end are not disturbed); a reader more than KEEP_BYTES behind skips to
the last READ_BYTES (counted in `skipped_bytes`, and logged), so an adapter
writing faster than the daemon reads costs at most about KEEP_BYTES of disk.
A filesystem that cannot punch holes gets the file truncated instead once it
passes KEEP_BYTES, which may lose what is written between the last read and
the truncation. While no daemon runs, nothing bounds the file.
"""

from __future__ import annotations

import ctypes
import functools
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

import structlog
import trio

log = structlog.get_logger()

SUFFIX = ".stderr"

# Read bytes of a file kept before they are deallocated: small against a disk,
# large enough that a hole is punched rarely.
KEEP_BYTES = 1 << 20

# Bytes read from a file at once.
READ_BYTES = 65536

# Without inotify, every followed file is looked at this often.
POLL_S = 0.25

# The inotify watch is read at most this often: the kernel folds the events
# of one file that pile up meanwhile into one.
COALESCE_S = 0.01

# Skipped bytes are logged at most this often per file.
SKIP_REPORT_S = 1.0

# Reads one `receive` makes looking for the start of a line after a skip.
REALIGN_READS = 16

# Files created ahead, for the next spawns.
SPARE_FILES = 4

# When following a file a previous incarnation wrote, start this far before
# its end: enough for the tail `logs` keeps.
ADOPTED_TAIL_BYTES = 256 * 1024

# <sys/inotify.h>, <linux/falloc.h>
IN_MODIFY = 0x00000002
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    return libc


def punch_hole(fd: int, length: int) -> None:
    """Deallocate the first `length` bytes of the file (the size stays).
    Raises OSError (EOPNOTSUPP where the filesystem cannot)."""
    if _libc().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class FollowedFile:
    """One instance's stderr file, read from where the daemon last stopped.
    Implements the source `capture_stderr` reads (`receive`)."""

    def __init__(self, path: Path, fd: int, offset: int = 0) -> None:
        self.path = path
        # The file, open for reading and writing (punching a hole needs it);
        # the root gets the same fd as its stderr.
        self.fd = fd
        self._offset = offset
        # The reader's task while it waits for the file to change (a bare
        # task rather than an Event: one waits per instance).
        self._waiter: trio.lowlevel.Task | None = None
        self._finished = False
        # Bytes at the start of the file already deallocated.
        self._punched = 0
        self._can_punch = True
        # Bytes never read because the reader fell too far behind.
        self.skipped_bytes = 0
        self._skipped_unreported = 0
        self._reported_at = float("-inf")
        self._realign = False

    @property
    def offset(self) -> int:
        """Where the next read starts."""
        return self._offset

    def changed(self) -> None:
        """The file may have grown: wake the reader."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    def finish(self) -> None:
        """No more writers (the tree is gone): `receive` drains what is left,
        then answers b"" for the end."""
        self._finished = True
        self.changed()

    async def receive(self) -> bytes:
        """The next bytes written, waiting for them; b"" once `finish`ed and
        drained. Cancellation: raises Cancelled; nothing read is lost."""
        while True:
            data = self._read()
            if data:
                return data
            if self._finished:
                return b""
            # No checkpoint since the read above: a change signalled from
            # now on wakes this task.
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_wait)

    def _abort_wait(self, _: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _read(self) -> bytes:
        """The next bytes to hand on (b"" if none are there yet), after a
        skip starting at a line's start. Reads at most REALIGN_READS times
        while looking for that start, so that a writer that never ends a line
        cannot hold the trio thread: then (or at the end of what is written)
        the piece goes on as it is."""
        self._skip_if_behind()
        data = b""
        for attempt in range(REALIGN_READS):
            data = os.pread(self.fd, READ_BYTES, self._offset)
            self._offset += len(data)
            if not data or not self._realign:
                break
            # The first line after a skip starts somewhere in the middle.
            newline = data.find(b"\n")
            # Skipped until a line starts: unless that would take more reads
            # than allowed, or nothing more is there yet.
            at_end = self._offset >= os.fstat(self.fd).st_size
            if newline == -1 and attempt < REALIGN_READS - 1 and not at_end:
                self._count_skipped(len(data))
                continue
            self._realign = False
            if newline != -1:
                self._count_skipped(newline + 1)
                data = data[newline + 1:]
            if data:
                break
        if data:
            self._bound()
        return data

    def _count_skipped(self, count: int) -> None:
        self.skipped_bytes += count
        self._skipped_unreported += count

    def _skip_if_behind(self) -> None:
        offset = self._offset
        size = os.fstat(self.fd).st_size
        if size - offset > KEEP_BYTES:
            target = size - READ_BYTES
            self._count_skipped(target - offset)
            self._offset = target
            self._realign = True
        now = trio.current_time()
        if self._skipped_unreported and now - self._reported_at >= SKIP_REPORT_S:
            log.warning("adapter.stderr_skipped", path=str(self.path), bytes=self._skipped_unreported,
                        reason="the adapter wrote stderr faster than the daemon reads it")
            self._skipped_unreported = 0
            self._reported_at = now

    def _bound(self) -> None:
        """Deallocate what has been read once it passes KEEP_BYTES. Raises nothing."""
        offset = self._offset
        if offset - self._punched < KEEP_BYTES:
            return
        if self._can_punch:
            try:
                punch_hole(self.fd, offset)
                self._punched = offset
                return
            except OSError as exc:
                self._can_punch = False
                log.warning("stderr.punch_hole_refused", path=str(self.path), error=exc.strerror,
                            fallback="truncate once read")
        try:
            if os.fstat(self.fd).st_size == offset:
                os.ftruncate(self.fd, 0)
                self._offset = 0
        except OSError as exc:
            log.warning("stderr.truncate_failed", path=str(self.path), error=exc.strerror)

    def close(self) -> None:
        """Close the daemon's fd of the file (which stays until `StderrFiles.remove`)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StderrFiles:
    """The directory of stderr files, files created ahead for the next
    spawns, and the task (`run`) that wakes the readers of files that grew
    and creates spares."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        # By file name.
        self._followed: dict[str, FollowedFile] = {}
        self._spares: list[tuple[Path, int]] = []
        self._spare_taken = trio.Event()

    def prepare(self) -> None:
        """Create the directory (mode 0700) if need be. Raises OSError."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _create(self) -> tuple[Path, int]:
        """Blocking: a new empty file with a fresh name, open O_RDWR|O_APPEND.
        Raises OSError."""
        path = self.directory / f"{secrets.token_hex(8)}{SUFFIX}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        return path, os.open(path, flags, 0o600)

    def take(self) -> FollowedFile:
        """A new, empty stderr file for a root about to start, followed from
        its start: give the root `fd` as its stderr (the file keeps it open;
        `remove` closes it). A spare if one is ready, else made now. Raises OSError."""
        if self._spares:
            path, fd = self._spares.pop()
            self._spare_taken.set()
        else:
            path, fd = self._create()
        followed = self._followed[path.name] = FollowedFile(path, fd)
        return followed

    def follow_existing(self, name: str) -> FollowedFile | None:
        """The stderr file `name` of an adopted instance, followed from
        ADOPTED_TAIL_BYTES before its end; None if there is none to read."""
        if "/" in name or not name.endswith(SUFFIX):
            return None
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        size = os.fstat(fd).st_size
        followed = self._followed[name] = FollowedFile(path, fd, offset=max(0, size - ADOPTED_TAIL_BYTES))
        return followed

    def adopt_open(self, name: str, fd: int, offset: int) -> FollowedFile:
        """Follow file `name`, already open as `fd` (handed over across an
        in-place upgrade), from `offset`."""
        followed = self._followed[name] = FollowedFile(self.directory / name, fd, offset=offset)
        return followed

    def remove(self, followed: FollowedFile) -> None:
        """Stop following a file and delete it (its tree is gone): its reader
        drains what is left, then sees the end, and closes it."""
        self._followed.pop(followed.path.name, None)
        followed.finish()
        try:
            os.unlink(followed.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("stderr.remove_failed", path=str(followed.path), error=exc.strerror)

    def leftovers(self) -> list[str]:
        """Names of the files in the directory that are neither followed nor
        spare: a previous incarnation's, of trees no longer running."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        spare = {path.name for path, _ in self._spares}
        return [n for n in names if n.endswith(SUFFIX) and n not in self._followed and n not in spare]

    def remove_leftover(self, name: str) -> None:
        """Delete a leftover file (see `leftovers`); a failure is logged."""
        try:
            os.unlink(self.directory / name)
        except OSError as exc:
            log.warning("stderr.remove_failed", path=str(self.directory / name), error=exc.strerror)

    def close(self) -> None:
        """Close and delete the spares (the daemon is stopping)."""
        spares, self._spares = self._spares, []
        for path, fd in spares:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake the reader of every file that grows, and keep SPARE_FILES
        spares, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._make_spares)
            await nursery.start(self._watch)
            task_status.started()

    async def _make_spares(self) -> None:
        while True:
            while len(self._spares) < SPARE_FILES:
                try:
                    spare = await trio.to_thread.run_sync(self._create)
                except OSError as exc:
                    log.warning("stderr.spare_failed", directory=str(self.directory), error=exc.strerror)
                    break
                self._spares.append(spare)
            self._spare_taken = trio.Event()
            await self._spare_taken.wait()

    async def _watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        fd = _libc().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        watched = fd >= 0 and _libc().inotify_add_watch(fd, bytes(self.directory), IN_MODIFY) >= 0
        if not watched:
            code = ctypes.get_errno()
            if fd >= 0:
                os.close(fd)
            log.warning("stderr.inotify_refused", error=os.strerror(code), fallback=f"poll every {POLL_S} s")
            task_status.started()
            while True:
                await trio.sleep(POLL_S)
                for followed in list(self._followed.values()):
                    followed.changed()
        try:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                for name in _event_names(data):
                    followed = self._followed.get(name)
                    if followed is not None:
                        followed.changed()
                await trio.sleep(COALESCE_S)
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


def _event_names(data: bytes) -> Iterator[str]:
    """The file names of the inotify events in `data` (each at most once)."""
    seen = set()
    offset = 0
    while offset + _EVENT.size <= len(data):
        _, _, _, length = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        name = data[start:start + length].rstrip(b"\0").decode("utf-8", "replace")
        offset = start + length
        if name and name not in seen:
            seen.add(name)
            yield name
