"""The durable record of live instances in `state_dir`.

If the daemon dies (even by `kill -9`), its next run reads this record to find
what the previous run left, besides the instance tag and the cgroups. The file
is replaced atomically (write to a temporary file, fsync, rename, fsync the
directory), so it is always either the old or the new version, never torn.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from supervisor.procs import process
from supervisor.engine.diskwrite import write_bounded

RECORD_FILE = "instances.json"

# The record is rewritten at most this often: a burst of spawns costs one
# write, and a kill -9 loses at most this much (the tag and cgroup scans of
# the next start still find those processes).
RECORD_WRITE_INTERVAL_S = 0.2


class RecordedProcess(msgspec.Struct, frozen=True):
    pid: int
    start_time: int


class RecordedInstance(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    job: str
    adapter: str
    processes: list[RecordedProcess]


class StateRecord(msgspec.Struct, kw_only=True):
    daemon_pid: int
    daemon_key: str
    # (pid, start time) names one process only within one boot of the kernel.
    boot_id: str = msgspec.field(default_factory=lambda: current_boot_id())
    instances: list[RecordedInstance] = []


def current_boot_id() -> str:
    """The kernel's id of this boot; empty if unavailable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StateRecord)


def daemon_key(state_dir: str) -> str:
    """A stable name for the daemon that owns `state_dir`, put into every adapter's
    environment so a later run can tell its own leftovers from another daemon's.
    64 bits of a hash of the resolved path: distinct for distinct directories."""
    return hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]


def write_record(state_dir: str, record: StateRecord) -> None:
    """Blocking: replace the record atomically. Raises OSError."""
    directory = Path(state_dir)
    final = directory / RECORD_FILE
    temporary = directory / f".{RECORD_FILE}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, _encoder.encode(record))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)
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
    if not record.boot_id or record.boot_id != current_boot_id():
        # Written before a reboot: its (pid, start time) pairs may name strangers now.
        return None
    return record


def recorded_processes(record: StateRecord | None) -> list[process.ProcessId]:
    """Every (pid, start time) a record names."""
    if record is None:
        return []
    return [process.ProcessId(p.pid, p.start_time) for i in record.instances for p in i.processes]


class RecordKeeper:
    """Keeps the record in step with the daemon: `mark_dirty` after a change,
    and `run` rewrites it soon after, coalescing bursts. Trio thread only;
    `snapshot` is called on the trio thread and must return a fresh record."""

    def __init__(self, state_dir: str, snapshot: Callable[[], StateRecord]) -> None:
        self.state_dir = state_dir
        self._snapshot = snapshot
        self._dirty = trio.Event()
        # Writes are serialized so an older snapshot never lands after a newer one.
        self._lock = trio.Lock()

    def mark_dirty(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        """Rewrite on every change until cancelled."""
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await self.write_now()
            await trio.sleep(RECORD_WRITE_INTERVAL_S)

    async def write_now(self) -> None:
        """Write the current snapshot (bounded; failures are logged)."""
        async with self._lock:
            record = self._snapshot()
            await write_bounded("state.record_failed", write_record, self.state_dir, record)
