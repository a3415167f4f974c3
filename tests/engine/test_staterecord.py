"""staterecord: the durable record of live instances, on a real file system.

The record is written by one run of the daemon and read by the next; whatever
the next run finds (nothing, garbage, a torn or hostile file, a record from
before a reboot) must read back as "no record" rather than stop it starting,
and a record it accepts must name only processes of this boot.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import msgspec
import pytest
import structlog
import trio
import trio.testing

from supervisor.engine import staterecord
from supervisor.engine.staterecord import (
    RECORD_FILE,
    RECORD_SNAPSHOT_SHARE,
    RECORD_WRITE_INTERVAL_S,
    RecordedInstance,
    RecordedProcess,
    RecordKeeper,
    StateRecord,
    daemon_key,
    read_record,
    recorded_processes,
    write_record,
)
from supervisor.procs.process import ProcessId


def a_record(*instances: RecordedInstance, daemon_pid: int = 4242) -> StateRecord:
    return StateRecord(
        daemon_pid=daemon_pid, daemon_key="0123456789abcdef", boot_id=staterecord.current_boot_id(),
        instances=list(instances),
    )


def an_instance(name: str, *processes: tuple[int, int]) -> RecordedInstance:
    return RecordedInstance(
        instance=name, job=f"job-{name}", adapter="tree", processes=[RecordedProcess(p, t) for p, t in processes]
    )


# -- daemon_key ------------------------------------------------------------------------


def test_daemon_key_names_a_state_directory_however_it_is_spelled(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "link").symlink_to(state)
    key = daemon_key(str(state))
    assert len(key) == 16 and int(key, 16) >= 0
    assert daemon_key(str(tmp_path / "link")) == key
    assert daemon_key(str(tmp_path / "state" / ".." / "state")) == key
    assert daemon_key(str(tmp_path / "other")) != key


# -- writing and reading -------------------------------------------------------------------


def test_a_written_record_reads_back_as_written(tmp_path: Path) -> None:
    record = a_record(an_instance("a", (10, 100), (11, 110)), an_instance("b", (20, 200)))
    write_record(str(tmp_path), record)
    back = read_record(str(tmp_path))
    assert back == record
    assert back.boot_id == staterecord.current_boot_id() != ""
    # Readable only by its owner (it holds lease tokens), and no temporary
    # file left behind.
    assert stat.S_IMODE((tmp_path / RECORD_FILE).stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == [RECORD_FILE]


@pytest.mark.parametrize("count", [0, 1, 2, staterecord.ENTRIES_PER_PIECE, 2 * staterecord.ENTRIES_PER_PIECE + 1])
def test_a_record_of_encoded_entries_is_written_as_the_same_record_whole(tmp_path: Path, count: int) -> None:
    # Written piece by piece (the GIL held briefly per piece): the file reads
    # back as the record encoded whole, whatever the number of entries.
    record = a_record(*(an_instance(f"i{n}", (10 + n, 100 + n)) for n in range(count)))
    head = msgspec.structs.replace(record, instances=[])
    encoded = staterecord.EncodedRecord(head, [staterecord.encode_entry(entry) for entry in record.instances])
    assert encoded.decoded() == record
    write_record(str(tmp_path), encoded)
    assert read_record(str(tmp_path)) == record
    assert json.loads((tmp_path / RECORD_FILE).read_bytes()) == json.loads(msgspec.json.encode(record))
    with pytest.raises(ValueError):
        staterecord.EncodedRecord(record, []) if count else staterecord.EncodedRecord(a_record(an_instance("x")), [])


def test_a_record_is_replaced_never_rewritten_in_place(tmp_path: Path) -> None:
    write_record(str(tmp_path), a_record(an_instance("old", (10, 100))))
    # A reader that opened the old version keeps reading all of it.
    with open(tmp_path / RECORD_FILE, "rb") as reader:
        write_record(str(tmp_path), a_record(an_instance("new", (20, 200))))
        old = json.loads(reader.read())
    assert [i["instance"] for i in old["instances"]] == ["old"]
    assert [i.instance for i in read_record(str(tmp_path)).instances] == ["new"]


def test_a_write_that_fails_raises_and_leaves_the_old_record(tmp_path: Path) -> None:
    previous = a_record(an_instance("old", (10, 100)))
    write_record(str(tmp_path), previous)
    # Something in the way of the temporary file: the write fails before the rename.
    (tmp_path / f".{RECORD_FILE}.{os.getpid()}.tmp").mkdir()
    with pytest.raises(OSError):
        write_record(str(tmp_path), a_record(an_instance("new", (20, 200))))
    assert read_record(str(tmp_path)) == previous


# Writes a large record under a file size limit (as on a nearly full file
# system: the write fails part-way), in a process of its own.
TORN_WRITE = """
import resource, signal, sys
from supervisor.engine.staterecord import RecordedInstance, RecordedProcess, StateRecord, current_boot_id, write_record
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
record = StateRecord(daemon_pid=1, daemon_key="0123456789abcdef", boot_id=current_boot_id(), instances=[
    RecordedInstance(instance=f"i{n}", job=f"job-{n}", adapter="tree", processes=[RecordedProcess(n, n)])
    for n in range(2000)
])
try:
    write_record(sys.argv[1], record)
except OSError as exc:
    print(exc.errno)
"""


def test_a_record_cut_short_is_neither_installed_nor_left_behind(tmp_path: Path) -> None:
    import errno
    import subprocess
    import sys

    previous = a_record(an_instance("old", (10, 100)))
    write_record(str(tmp_path), previous)
    done = subprocess.run([sys.executable, "-c", TORN_WRITE, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(errno.EFBIG), done.stderr
    assert read_record(str(tmp_path)) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD_FILE]


def test_writing_into_a_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_record(str(tmp_path / "missing"), a_record())


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json at all",
        b'{"daemon_pid": 1, "daemon_key": "k", "instances": [',  # torn mid-write
        b"[1, 2, 3]",
        b'{"daemon_key": "k"}',  # no daemon_pid
        b'{"daemon_pid": "4242", "daemon_key": "k"}',
        b'{"daemon_pid": 1, "daemon_key": "k", "instances": [{"instance": "a"}]}',
        b'{"daemon_pid": 1, "daemon_key": "k", "instances": [{"instance": "a", "job": "j", "adapter": "t",'
        b' "processes": [{"pid": "1; rm -rf /", "start_time": 1}]}]}',
        b"\xff\xfe\x00garbage",
    ],
    ids=["empty", "garbage", "torn", "a-list", "no-pid", "pid-as-string", "instance-missing-fields", "hostile-pid", "binary"],
)
def test_a_record_that_does_not_parse_reads_as_none(tmp_path: Path, content: bytes) -> None:
    (tmp_path / RECORD_FILE).write_bytes(content)
    assert read_record(str(tmp_path)) is None


def test_no_record_reads_as_none(tmp_path: Path) -> None:
    assert read_record(str(tmp_path)) is None
    assert read_record(str(tmp_path / "missing")) is None
    (tmp_path / RECORD_FILE).mkdir()  # not even a file
    assert read_record(str(tmp_path)) is None


def test_a_record_from_another_boot_reads_as_none(tmp_path: Path) -> None:
    for boot_id in ("00000000-0000-0000-0000-000000000000", ""):
        record = a_record(an_instance("a", (10, 100)))
        record.boot_id = boot_id
        write_record(str(tmp_path), record)
        assert read_record(str(tmp_path)) is None


def test_a_record_without_a_boot_id_reads_as_none(tmp_path: Path) -> None:
    payload = {
        "daemon_pid": 4242, "daemon_key": "0123456789abcdef",
        "instances": [{"instance": "a", "job": "j", "adapter": "t", "processes": [{"pid": 1, "start_time": 1}]}],
    }
    (tmp_path / RECORD_FILE).write_text(json.dumps(payload))
    assert read_record(str(tmp_path)) is None


def test_recorded_processes_names_every_process_of_every_instance() -> None:
    assert recorded_processes(None) == []
    record = a_record(an_instance("a", (10, 100), (11, 110)), an_instance("b"), an_instance("c", (30, 300)))
    assert recorded_processes(record) == [ProcessId(10, 100), ProcessId(11, 110), ProcessId(30, 300)]


# -- RecordKeeper --------------------------------------------------------------------------


class Snapshots:
    """The daemon's `snapshot` callable: a fresh record on each call (its
    daemon_pid counts the calls), and the trio time of each call."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self) -> StateRecord:
        self.times.append(trio.current_time())
        return a_record(daemon_pid=len(self.times))


async def on_disk(state_dir: Path, snapshot: int) -> None:
    """Wait until the record on disk is the `snapshot`th one taken."""
    with trio.fail_after(5):
        while (record := read_record(str(state_dir))) is None or record.daemon_pid != snapshot:
            await trio.sleep(0.005)


async def test_changes_are_written_soon_but_at_most_once_per_interval(tmp_path: Path) -> None:
    snapshots = Snapshots()
    keeper = RecordKeeper(str(tmp_path), snapshots)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            keeper.mark_dirty()
        nursery.start_soon(keeper.run)
        await on_disk(tmp_path, 1)
        for _ in range(3):
            keeper.mark_dirty()
            await trio.sleep(0)
        await on_disk(tmp_path, 2)
        # Our own write takes the keeper's write lock, so it starts after the
        # keeper's write has finished and its interval has begun; once our
        # write is done and an interval more has passed, any write the keeper
        # still had pending has taken its snapshot.
        await keeper.write_now()
        await trio.sleep(RECORD_WRITE_INTERVAL_S)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    # Five changes, one write; three more, one write, an interval later.
    assert len(snapshots.times) == 3
    assert snapshots.times[1] - snapshots.times[0] >= RECORD_WRITE_INTERVAL_S
    assert read_record(str(tmp_path)).daemon_pid == 3


async def test_a_slow_snapshot_spaces_the_next_write_by_its_share(tmp_path: Path) -> None:
    # A record of many instances takes long to snapshot on the trio thread:
    # the keeper then waits RECORD_SNAPSHOT_SHARE times as long before the
    # next, so the record's share of the thread stays bounded.
    slow = 0.05
    snapshots = Snapshots()

    def slow_snapshot() -> StateRecord:
        time.sleep(slow)  # real time: what the keeper measures
        return snapshots()

    keeper = RecordKeeper(str(tmp_path), slow_snapshot)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        keeper.mark_dirty()
        await on_disk(tmp_path, 1)
        keeper.mark_dirty()
        await on_disk(tmp_path, 2)
        nursery.cancel_scope.cancel()
    assert snapshots.times[1] - snapshots.times[0] >= RECORD_SNAPSHOT_SHARE * slow > RECORD_WRITE_INTERVAL_S


async def test_write_now_logs_a_failure_instead_of_raising(tmp_path: Path) -> None:
    keeper = RecordKeeper(str(tmp_path / "missing"), Snapshots())
    with structlog.testing.capture_logs() as logs:
        await keeper.write_now()
    assert [e["event"] for e in logs] == ["state.record_failed"]
    assert "No such file or directory" in logs[0]["error"]


def test_a_record_of_an_unknown_version_reads_as_none_and_version_1_still_reads(tmp_path: Path) -> None:
    record = a_record(an_instance("a", (10, 100)))
    record.version = 99
    write_record(str(tmp_path), record)
    assert read_record(str(tmp_path)) is None
    # Version 1 (before leases were recorded) had no version field.
    text = json.loads((tmp_path / RECORD_FILE).read_text())
    del text["version"]
    (tmp_path / RECORD_FILE).write_text(json.dumps(text))
    back = read_record(str(tmp_path))
    assert back is not None and back.version == 1 and back.instances[0].leases == []


def test_the_generation_counts_incarnations_and_survives_a_bad_file(tmp_path: Path) -> None:
    assert [staterecord.next_generation(str(tmp_path)) for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / staterecord.GENERATION_FILE).read_text() == "3\n"
    assert stat.S_IMODE((tmp_path / staterecord.GENERATION_FILE).stat().st_mode) == 0o600
    (tmp_path / staterecord.GENERATION_FILE).write_text("garbage")
    assert staterecord.next_generation(str(tmp_path)) == 1
