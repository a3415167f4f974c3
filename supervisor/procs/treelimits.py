"""Measuring a tree against its limits cheaply, and the kernel's own limits.

What the limit watch (`engine/limitwatch.py`) reads several times a second,
so each read costs the processes of the trees it looks at, never the host's:

* `measure_cgroup`: the members listed in an instance cgroup (one read of its
  cgroup.procs, and of any sub-cgroup's) and, when wanted, their RSS.
* `measure_descendants`: in process-table mode, the known members of a tree
  (each checked by pid and start time) and everything that descends from them,
  found through /proc/<pid>/task/<tid>/children, one file per thread of a
  member. A process re-parented away from the tree (to the daemon) is seen only
  once a scan has made it a known member.

Both stop reading once a tree holds more processes than asked for (its
max_pids): a fork bomb costs at most max_pids + 1 reads per look in
process-table mode, and one read of cgroup.procs in cgroup mode.

Where the memory or pids controller of cgroup v2 is enabled for the instance
cgroups, the kernel enforces the limits itself (`memory.max` with
`memory.oom.group`, `pids.max`) and the watch only reads `memory.events` and
`pids.events` to learn that it did (`parse_events`, `kernel_verdict`).

All reads here are blocking and change nothing; the writes (`enable_controllers`,
`apply_kernel_limits`) are single small cgroupfs writes.
"""

from __future__ import annotations

import errno
import os
import pathlib
from collections.abc import Iterable

import msgspec

from supervisor.procs import process
from supervisor.procs.cgroup import write_value

# The controllers whose limits the kernel can enforce for an instance cgroup.
KERNEL_CONTROLLERS = ("memory", "pids")


class TreeFigures(msgspec.Struct, frozen=True, gc=False):
    """What one look at a tree found. `pids` counts live processes (threads and
    zombies excluded); once past the limit the look was asked to respect it
    stops (`truncated`), so it is then at least that limit + 1, not the whole
    count. `rss_bytes` is their total RSS (0 unless asked for, and 0 for a
    truncated look: such a tree is over its max_pids anyway)."""

    pids: int
    rss_bytes: int
    truncated: bool = False
    # The members seen, by identity: only from `measure_descendants`, for the
    # tree to remember (None when truncated: then they are not all of them).
    seen: tuple[process.ProcStat, ...] | None = None


def cgroup_pids(path: pathlib.Path) -> list[int]:
    """Blocking: the pids in the cgroup at `path` and in its sub-cgroups (empty
    if it is gone). The common case, a cgroup with no sub-cgroup (on cgroupfs
    a directory's link count is 2 plus its subdirectories), costs one stat
    and one read; otherwise every sub-cgroup is read. Raises OSError for a
    failure other than the cgroup being gone."""
    try:
        if os.stat(path).st_nlink > 2:
            return _pids_below(path)
        return [int(p) for p in _read_small(path / "cgroup.procs").split()]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            return []
        raise


def _pids_below(path: pathlib.Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirnames, _filenames in os.walk(path):
        try:
            pids += [int(p) for p in _read_small(pathlib.Path(dirpath, "cgroup.procs")).split()]
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODEV):
                raise
    return pids


def read_rss(pid: int) -> int | None:
    """Blocking: the resident set of `pid` in bytes (/proc/PID/statm), or
    None if it is gone."""
    try:
        return int(_read_small(pathlib.Path(f"/proc/{pid}/statm")).split()[1]) * process.PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def measure_cgroup(pids: Iterable[int], *, limit: int | None, rss: bool) -> TreeFigures:
    """Blocking: the figures of the processes listed in an instance cgroup
    (`pids`, as `cgroup_pids` lists them: every pid there is a member, and
    one that has exited is not listed). With `rss`, each member's RSS is
    read. Never raises for a process that is gone meanwhile."""
    listed = list(pids)
    truncated = limit is not None and len(listed) > limit
    if not rss or truncated:
        return TreeFigures(pids=len(listed), rss_bytes=0, truncated=truncated)
    total = 0
    count = 0
    for pid in listed:
        resident = read_rss(pid)
        if resident is None:
            continue
        count += 1
        total += resident
    return TreeFigures(pids=count, rss_bytes=total, truncated=truncated)


class _Stat(msgspec.Struct, frozen=True, gc=False):
    """What a look needs of /proc/PID/stat."""

    stat: process.ProcStat
    threads: int


def _read_stat(pid: int) -> _Stat | None:
    """/proc/PID/stat with the thread count `process.ProcStat` leaves out;
    None if the process is gone (or hidden from us). Raises OSError when it
    cannot be read for want of a resource (EMFILE, ENOMEM): a look that
    could not see a member must not report it gone."""
    try:
        data = _read_small(pathlib.Path(f"/proc/{pid}/stat"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    try:
        stat = process.parse_stat(data)
        threads = int(data[data.rfind(b")") + 1 :].split()[_THREADS_INDEX])
    except (ValueError, IndexError):
        return None
    return _Stat(stat, threads)


# num_threads (field 20) among the fields after the command name.
_THREADS_INDEX = 17


def read_children(pid: int, threads: int = 0) -> list[int]:
    """Blocking: the pids of the children of every thread of `pid` (empty if
    it is gone or cannot be read). `threads` = 1 (a single-threaded process,
    as its stat says) reads one file instead of listing the threads."""
    if threads == 1:
        tids = [str(pid)]
    else:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
    children: list[int] = []
    for tid in tids:
        try:
            children += [int(p) for p in _read_small(pathlib.Path(f"/proc/{pid}/task/{tid}/children")).split()]
        except OSError:
            continue  # the thread (or the process) ended meanwhile
    return children


def measure_descendants(anchors: Iterable[process.ProcessId], *, limit: int | None) -> TreeFigures:
    """Blocking: the figures of a tree in process-table mode: each anchor (the
    root and the known members) that is still the same process, and every
    live descendant of those. A child counts only if its stat still names the
    parent it was listed under (a pid freed and reused meanwhile is a
    stranger's). Stops once more than `limit` processes were found."""
    members: dict[int, process.ProcStat] = {}
    frontier: list[_Stat] = []
    for anchor in anchors:
        read = _read_stat(anchor.pid)
        if read is None or read.stat.start_time != anchor.start_time or anchor.pid in members:
            continue
        if read.stat.state in process.EXITED_STATES:
            continue
        members[anchor.pid] = read.stat
        frontier.append(read)
    truncated = False
    while frontier and not truncated:
        parent = frontier.pop()
        for child in read_children(parent.stat.pid, parent.threads):
            if child in members:
                continue
            read = _read_stat(child)
            if read is None or read.stat.ppid != parent.stat.pid or read.stat.state in process.EXITED_STATES:
                continue
            members[child] = read.stat
            frontier.append(read)
            if limit is not None and len(members) > limit:
                truncated = True
                break
    stats = tuple(members.values())
    return TreeFigures(
        pids=len(stats), rss_bytes=sum(s.rss_bytes for s in stats), truncated=truncated,
        seen=None if truncated else stats,
    )


# -- the kernel's limits (cgroup v2 memory and pids controllers) -----------------


def parse_events(text: str) -> dict[str, int]:
    """The counters of a cgroup `*.events` file ("key value" lines); lines
    that are not that are skipped."""
    counters: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            counters[key] = int(value)
        except ValueError:
            continue
    return counters


def kernel_verdict(memory_events: dict[str, int] | None, pids_events: dict[str, int] | None) -> str | None:
    """Which of its kernel limits a cgroup hit, from its memory.events and
    pids.events counters (None where that controller is not in use): "memory"
    once the OOM killer acted in it (`oom_kill`, or `oom_group_kill` with
    memory.oom.group), "pids" once a fork was refused for pids.max (`max`);
    else None. A tree is stopped whole either way, so that no half-killed
    tree lives on."""
    if memory_events and (memory_events.get("oom_group_kill", 0) > 0 or memory_events.get("oom_kill", 0) > 0):
        return "memory"
    if pids_events and pids_events.get("max", 0) > 0:
        return "pids"
    return None


def enable_controllers(base: pathlib.Path) -> frozenset[str]:
    """Enable, for the instance cgroups under `base`, the KERNEL_CONTROLLERS
    on offer, and answer those enabled (`base`'s cgroup.subtree_control).
    They are first enabled for `base` itself in its parent when that parent
    is a delegated cgroup (one with a cgroup.type: never the hierarchy's
    root, whose children are the host's), as systemd's Delegate=yes offers
    them to the service's cgroup but leaves enabling them to the service.
    Never raises: a host that offers none (a hybrid layout without v2
    controllers, a delegation without them) answers an empty set, and the
    watch measures instead."""
    parent = base.parent
    if (parent / "cgroup.type").exists():
        _enable_offered(parent)
    try:
        _enable_offered(base)
        enabled = set((base / "cgroup.subtree_control").read_text().split())
    except OSError:
        return frozenset()
    return frozenset(c for c in KERNEL_CONTROLLERS if c in enabled)


def _enable_offered(cgroup: pathlib.Path) -> None:
    """Enable for the children of `cgroup` the KERNEL_CONTROLLERS it has;
    a refusal (processes of its own, no right to) is left to the caller to
    find in the outcome."""
    try:
        offered = set((cgroup / "cgroup.controllers").read_text().split())
        wanted = [c for c in KERNEL_CONTROLLERS if c in offered]
        if wanted:
            write_value(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted).encode())
    except OSError:
        pass


def apply_kernel_limits(
    path: pathlib.Path, *, controllers: frozenset[str], memory_limit: int | None, max_pids: int | None
) -> frozenset[str]:
    """Set the limits of one instance cgroup with the enabled `controllers`:
    memory.max (and memory.oom.group, so an OOM kill takes the whole tree)
    and pids.max. Answers the controllers now enforcing a limit there; one
    whose write failed is left to the watch's measuring. Never raises."""
    applied = set()
    if "memory" in controllers and memory_limit is not None:
        try:
            write_value(path / "memory.max", str(memory_limit).encode())
            write_value(path / "memory.oom.group", b"1")
            applied.add("memory")
        except OSError:
            pass
    if "pids" in controllers and max_pids is not None:
        try:
            write_value(path / "pids.max", str(max_pids).encode())
            applied.add("pids")
        except OSError:
            pass
    return frozenset(applied)


def read_kernel_events(path: pathlib.Path, controllers: frozenset[str]) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """Blocking: the memory.events and pids.events counters of an instance
    cgroup, for the `controllers` enforcing its limits (None for the others,
    and for a cgroup gone meanwhile)."""

    def read(name: str) -> dict[str, int] | None:
        try:
            return parse_events((path / name).read_text())
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return None
            raise

    return (
        read("memory.events") if "memory" in controllers else None,
        read("pids.events") if "pids" in controllers else None,
    )


# Enough for /proc/PID/statm and for the cgroup.procs of any tree within a
# sane max_pids (a longer one is read on until its end).
_READ_CHUNK = 65536


def _read_small(path: pathlib.Path) -> bytes:
    """The whole of a small /proc or cgroupfs file, with the fewest calls."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, _READ_CHUNK)
        if len(data) < _READ_CHUNK:
            return data
        chunks = [data]
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
