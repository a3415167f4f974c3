"""The durable record of live instances in `state_dir`, and the generation.

If the daemon dies (even by `kill -9`), its next run reads this record to find
what the previous run left, besides the instance tag and the cgroups, and to
adopt the trees that still run: each instance with its state,
params, root, members, stderr file and leases, tokens included. The file is
mode 0600 (it holds lease tokens) and is replaced atomically (write to a
temporary file, fsync, rename, fsync the directory), so it is always either
the old or the new version, never torn.

The format is versioned (`RECORD_VERSION`); a record of version 1 (no version
field, no leases) still names processes, so they are reaped, not adopted.
`generation` (its own file) counts the incarnations of the daemon on this
state_dir: a start, a restart after a crash, an upgrade.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

import msgspec
import trio

from supervisor.procs import process
from supervisor.engine.diskwrite import write_bounded

RECORD_FILE = "instances.json"
GENERATION_FILE = "generation"

# The format this code writes; it reads it and every older one.
RECORD_VERSION = 2
READABLE_VERSIONS = frozenset({1, 2})

# The record is rewritten at most this often: a burst of spawns costs one
# write, and a kill -9 loses at most this much (the tag and cgroup scans of
# the next start still find those processes).
RECORD_WRITE_INTERVAL_S = 0.2

# The snapshot is taken on the trio thread and costs every instance held
# (milliseconds per thousand): after a write, the next waits at least this
# many times as long as the snapshot took, so the record never takes more
# than about a tenth of the trio thread however many instances it holds.
RECORD_SNAPSHOT_SHARE = 10.0


class RecordedProcess(msgspec.Struct, frozen=True):
    pid: int
    start_time: int


class RecordedLease(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    uid: int
    detached: bool
    ttl: float | None = None
    # Wall-clock seconds.
    expires_at: float | None = None


class RecordedInstance(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    job: str
    adapter: str
    # Every member known, the root included.
    processes: list[RecordedProcess]
    # Version 2 on: what adoption needs.
    state: str = ""
    params: dict[str, str] = {}
    root: RecordedProcess | None = None
    started_at: float | None = None
    linger: float = 0.0
    # Wall-clock seconds, while lingering.
    linger_until: float | None = None
    leases: list[RecordedLease] = []
    # The name of its stderr file in the stderr directory.
    stderr_file: str | None = None
    # The uid that spawned it (who else may join it).
    uid: int | None = None


class StateRecord(msgspec.Struct, kw_only=True):
    daemon_pid: int
    daemon_key: str
    version: int = 1
    # (pid, start time) names one process only within one boot of the kernel.
    # Empty in a record that does not say: then it is never trusted.
    boot_id: str = ""
    generation: int = 0
    instances: list[RecordedInstance] = []


@functools.cache
def current_boot_id() -> str:
    """The kernel's id of this boot; empty if unavailable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StateRecord)
_entry_decoder = msgspec.json.Decoder(RecordedInstance)

# Encoded entries joined into one piece of the file at a time (about 100 kB).
ENTRIES_PER_PIECE = 256


def encode_entry(entry: RecordedInstance) -> bytes:
    """One instance's entry as the record's file holds it (about a
    microsecond; a caller that keeps entries keeps these too)."""
    return _encoder.encode(entry)


class EncodedRecord:
    """A record whose entries are encoded already, one by one: writing it
    joins and writes pieces of ENTRIES_PER_PIECE entries, each a short hold of
    the GIL. Encoded whole, a record of 10,000 instances is one call of about
    9 ms that keeps the GIL, and the trio thread waits that long to get it
    back after any of its system calls."""

    def __init__(self, head: StateRecord, entries: list[bytes]) -> None:
        """`head`: the record's fields but its instances (which it must not
        have); `entries`: the instances, each from `encode_entry`."""
        if head.instances:
            raise ValueError("the head of an encoded record has no instances of its own")
        self.head = head
        self.entries = entries

    def pieces(self) -> Iterator[bytes]:
        """The file's bytes, in pieces. The instances are the last field
        msgspec writes, so the head encodes to everything before the
        entries and two bytes after them."""
        head = _encoder.encode(self.head)
        yield head[:-len(b"]}")]
        for start in range(0, len(self.entries), ENTRIES_PER_PIECE):
            if start:
                yield b","
            yield b",".join(self.entries[start:start + ENTRIES_PER_PIECE])
        yield b"]}"

    def decoded(self) -> StateRecord:
        """The record as a `StateRecord` (for tests and tools: it decodes every entry)."""
        instances = [_entry_decoder.decode(entry) for entry in self.entries]
        return msgspec.structs.replace(self.head, instances=instances)


def daemon_key(state_dir: str) -> str:
    """A stable name for the daemon that owns `state_dir`, put into every adapter's
    environment so a later run can tell its own leftovers from another daemon's.
    64 bits of a hash of the resolved path: distinct for distinct directories."""
    return hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]


TAG_FILE = "tag"
TAG_BYTES = 16


def daemon_tag(state_dir: str) -> str:
    """Blocking: the value of the daemon's tag in every adapter's environment
    (ADAPTER_SUPERVISOR_DAEMON), which sweeps take as proof that a process is
    the daemon's. A secret of the state_dir (random, kept in `state_dir/tag`,
    0600, made on first use), not anything a stranger can compute: a process
    someone else starts with a copied tag must never be signalled. Raises
    OSError if it can be neither read nor made."""
    path = os.path.join(state_dir, TAG_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    else:
        with os.fdopen(fd, "rb") as file:
            value = file.read(64).decode("ascii", "replace").strip()
        if len(value) == 2 * TAG_BYTES and all(c in "0123456789abcdef" for c in value):
            return value
    value = secrets.token_hex(TAG_BYTES)
    replace_file(state_dir, TAG_FILE, f"{value}\n".encode())
    return value


def replace_file(state_dir: str, name: str, data: bytes | Iterable[bytes]) -> None:
    """Blocking: make `state_dir/name` hold `data` (0600; bytes, or pieces
    written one after the other), atomically: the whole of it written and
    synced to a temporary file (never through a symlink), then renamed over
    the old one. A file not written whole is never installed, nor left
    behind. Raises OSError."""
    temporary = os.path.join(state_dir, f".{name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            for piece in (data,) if isinstance(data, bytes) else data:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, os.path.join(state_dir, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_record(state_dir: str, record: StateRecord | EncodedRecord) -> None:
    """Blocking: replace the record atomically (`replace_file`), and sync
    the directory so the rename survives a crash of the host. Raises OSError."""
    directory = Path(state_dir)
    data = record.pieces() if isinstance(record, EncodedRecord) else _encoder.encode(record)
    replace_file(state_dir, RECORD_FILE, data)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_record(state_dir: str) -> StateRecord | None:
    """Blocking: the record a previous run left, or None if there is none or it
    cannot be read (an unreadable record must not stop the daemon starting;
    the tag and cgroup scans still find the leftovers)."""
    try:
        data = (Path(state_dir) / RECORD_FILE).read_bytes()
    except OSError:
        return None
    try:
        record = _decoder.decode(data)
    except msgspec.DecodeError:
        return None
    if record.version not in READABLE_VERSIONS:
        return None
    if not record.boot_id or record.boot_id != current_boot_id():
        # Written before a reboot: its (pid, start time) pairs may name strangers now.
        return None
    return record


def next_generation(state_dir: str) -> int:
    """Blocking: count this incarnation: one more than the last (1 for the
    first), written back atomically before it is returned. An unreadable
    count starts again from 1. Raises OSError if it cannot be written."""
    path = Path(state_dir) / GENERATION_FILE
    try:
        previous = int(path.read_text().strip())
    except (OSError, ValueError):
        previous = 0
    generation = max(previous, 0) + 1
    replace_file(state_dir, GENERATION_FILE, f"{generation}\n".encode())
    return generation


def recorded_processes(record: StateRecord | None) -> list[process.ProcessId]:
    """Every (pid, start time) a record names."""
    if record is None:
        return []
    return [process.ProcessId(p.pid, p.start_time) for i in record.instances for p in i.processes]


class RecordKeeper:
    """Keeps the record in step with the daemon: `mark_dirty` after a change,
    and `run` rewrites it soon after, coalescing bursts. Trio thread only;
    `snapshot` is called on the trio thread and must return a fresh record."""

    def __init__(
        self, state_dir: str, snapshot: Callable[[], StateRecord | EncodedRecord | Awaitable[StateRecord | EncodedRecord]]
    ) -> None:
        """`snapshot` returns the record now, or an awaitable of it (one that
        lets other tasks run while it is made, for a record of many instances)."""
        self.state_dir = state_dir
        self._snapshot = snapshot
        self._dirty = trio.Event()
        # Writes are serialized so an older snapshot never lands after a newer one.
        self._lock = trio.Lock()

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        """Rewrite on every change until cancelled: at most every
        RECORD_WRITE_INTERVAL_S, or RECORD_SNAPSHOT_SHARE times the last
        snapshot's time if that is longer (a record of many instances)."""
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            took = await self.write_now()
            await trio.sleep(max(RECORD_WRITE_INTERVAL_S, RECORD_SNAPSHOT_SHARE * took))

    async def write_now(self) -> float:
        """Write the current snapshot (bounded; failures are logged). Returns
        the seconds the snapshot took on the trio thread."""
        async with self._lock:
            started = time.perf_counter()
            record = self._snapshot()
            if inspect.isawaitable(record):
                record = await record
            took = time.perf_counter() - started
            await write_bounded("state.record_failed", write_record, self.state_dir, record)
        return took
