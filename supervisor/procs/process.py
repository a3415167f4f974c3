"""Identify, find and signal processes through /proc, safely against pid reuse.

A pid alone does not name a process: once it is reaped the kernel may hand the same
number to a stranger. Everything here therefore works on `ProcessId`, a pid together
with the process's start time (field 22 of /proc/<pid>/stat, in clock ticks since
boot), and re-checks that pair before acting.

All functions are synchronous and may block on /proc reads; the daemon runs full scans
in a worker thread and calls the cheap single-process ones directly. The module holds
no mutable state. Linux only.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

import msgspec

# The environment variables the daemon puts into every adapter it spawns. The
# instance tag is what lets a sweep recognise a process as ours after it escaped its
# tree (setsid, double fork) or outlived a previous run of the daemon.
INSTANCE_ENV = "ADAPTER_SUPERVISOR_INSTANCE"
JOB_ENV = "ADAPTER_SUPERVISOR_JOB"
ADAPTER_ENV = "ADAPTER_SUPERVISOR_ADAPTER"
# Names the daemon (by its state directory) that started the process, so a
# start-up sweep reaps what its own previous run left and never what another
# daemon on the same host runs.
DAEMON_ENV = "ADAPTER_SUPERVISOR_DAEMON"
SUPERVISOR_ENVS = (INSTANCE_ENV, JOB_ENV, ADAPTER_ENV, DAEMON_ENV)

# /proc/<pid>/stat reports resident set size in pages.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# States of a process that has exited: zombie (waiting for its parent to reap it)
# and dead (being torn down; visible only for an instant).
EXITED_STATES = frozenset({"Z", "X"})

# Index of each field in the part of /proc/<pid>/stat after the command name. The
# kernel numbers fields from 1 (pid) and 2 (comm), so field N sits at index N - 3.
_STATE_INDEX = 0  # field 3
_PPID_INDEX = 1  # field 4
_STARTTIME_INDEX = 19  # field 22
_RSS_INDEX = 21  # field 24

# Errors that mean "this process is gone or not ours to look at": ENOENT once it has
# been reaped, ESRCH when it exits in the middle of a read, EACCES for files the
# kernel hides from other users (environ of another uid).
_UNREADABLE = (FileNotFoundError, ProcessLookupError, PermissionError)


class ProcessId(msgspec.Struct, frozen=True, gc=False):
    """A process as one specific incarnation of a pid."""

    pid: int
    start_time: int


class ProcStat(msgspec.Struct, frozen=True, gc=False):
    """The fields of /proc/<pid>/stat the daemon needs."""

    pid: int
    ppid: int
    state: str
    start_time: int
    rss_bytes: int

    @property
    def process_id(self) -> ProcessId:
        return ProcessId(self.pid, self.start_time)


def parse_stat(data: bytes) -> ProcStat:
    """Parse the contents of a /proc/<pid>/stat file.

    The command name (field 2) is in parentheses and may itself contain spaces and
    parentheses, so the fixed fields are found after the *last* ')'.

    Raises ValueError if `data` is not in that format.
    """
    open_paren = data.find(b"(")
    close_paren = data.rfind(b")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError(f"not a /proc/<pid>/stat line: {data[:80]!r}")
    fields = data[close_paren + 1 :].split()
    if len(fields) <= _RSS_INDEX:
        raise ValueError(f"/proc/<pid>/stat line has too few fields: {data[:80]!r}")
    return ProcStat(
        pid=int(data[:open_paren]),
        ppid=int(fields[_PPID_INDEX]),
        state=fields[_STATE_INDEX].decode("ascii"),
        start_time=int(fields[_STARTTIME_INDEX]),
        rss_bytes=int(fields[_RSS_INDEX]) * PAGE_SIZE,
    )


def _read_proc_file(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except _UNREADABLE:
        return None


def read_stat(pid: int) -> ProcStat | None:
    """Return the current stat of `pid`, or None if it does not exist or cannot be read."""
    data = _read_proc_file(pid, "stat")
    if not data:
        return None
    return parse_stat(data)


def identify(pid: int) -> ProcessId | None:
    """Return the identity of whatever process holds `pid` now, or None if none does.

    A zombie still has an identity: it keeps its pid until it is reaped.
    """
    stat = read_stat(pid)
    return None if stat is None else stat.process_id


def is_running(proc: ProcessId) -> bool:
    """True while `proc` exists (same pid and start time) and has not exited."""
    stat = read_stat(proc.pid)
    return (
        stat is not None
        and stat.start_time == proc.start_time
        and stat.state not in EXITED_STATES
    )


def is_gone(proc: ProcessId, *, our_pid: int | None = None) -> bool:
    """True when nothing is left of `proc` that the caller has to deal with.

    That is: no process with that pid and start time exists, or it has exited and
    its parent is not `our_pid`. A zombie whose parent is someone else (PID 1, a
    subreaper) is dead and not ours to reap; a zombie child of `our_pid` is not gone,
    because it stays in the process table until `our_pid` reaps it.
    """
    stat = read_stat(proc.pid)
    if stat is None or stat.start_time != proc.start_time:
        return True
    if stat.state not in EXITED_STATES:
        return False
    return our_pid is None or stat.ppid != our_pid


def read_supervisor_env(pid: int) -> dict[str, str]:
    """Return the ADAPTER_SUPERVISOR_* variables in the environment `pid` was started with.

    Only the variables present are in the result; it is empty if the process is
    gone, is a zombie or kernel thread (no environment), or cannot be read. Values
    that are not UTF-8 are decoded with surrogate escapes rather than dropped.
    """
    data = _read_proc_file(pid, "environ")
    if not data:
        return {}
    found: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if not sep:
            continue
        key = name.decode("utf-8", "surrogateescape")
        if key in SUPERVISOR_ENVS:
            found[key] = value.decode("utf-8", "surrogateescape")
    return found


def hidden_environ_owner(pid: int) -> int | None:
    """The uid owning `pid` if its environment exists but this process may
    not read it (another user's process, without CAP_SYS_PTRACE); None if
    it can be read, or the process is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb"):
            return None
    except PermissionError:
        try:
            return os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return None
    except OSError:
        return None


def read_environ_tag(pid: int) -> str | None:
    """Return the instance tag (ADAPTER_SUPERVISOR_INSTANCE) of `pid`, or None.

    None means the variable is absent or the environment cannot be read.
    """
    return read_supervisor_env(pid).get(INSTANCE_ENV)


def read_cmdline(pid: int) -> list[str]:
    """Return the argument vector of `pid`; empty if gone, a zombie or a kernel thread."""
    data = _read_proc_file(pid, "cmdline")
    if not data:
        return []
    if data.endswith(b"\0"):
        # The kernel terminates every argument with NUL; drop only the final
        # terminator so that a genuinely empty last argument survives.
        data = data[:-1]
    return [arg.decode("utf-8", "surrogateescape") for arg in data.split(b"\0")]


def signal_process(proc: ProcessId, sig: int) -> bool:
    """Send `sig` to `proc` if, and only if, it is still that process and still running.

    Race-free against pid reuse: a pidfd pins the process that holds the pid at the
    moment it is opened, its start time is then checked, and the signal goes through
    the pidfd, so it can never reach a process that took the pid over afterwards.

    Returns True if the signal was delivered; False if the process is gone, the pid
    now belongs to another process, or it is already a zombie. Raises PermissionError
    if we may not signal it, and OSError (EMFILE, ENFILE) when no descriptor is left
    for the pidfd.
    """
    if proc.pid <= 0:
        return False  # no process has such a pid; never let it reach the kernel
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return False
    try:
        stat = read_stat(proc.pid)
        if (
            stat is None
            or stat.start_time != proc.start_time
            or stat.state in EXITED_STATES
        ):
            return False
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return False
        return True
    finally:
        os.close(pidfd)


def open_pidfd(proc: ProcessId) -> int | None:
    """A pidfd of `proc` if it is still that process and still running (the
    caller closes it); None if it is gone, exited, or the pid is another's now.
    The pidfd is opened first and the identity checked after, so the fd can
    never name a process that took the pid over. Raises OSError (EMFILE,
    ENFILE) when no descriptor is left."""
    if proc.pid <= 0:
        return None
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return None
    stat = read_stat(proc.pid)
    if stat is None or stat.start_time != proc.start_time or stat.state in EXITED_STATES:
        os.close(pidfd)
        return None
    return pidfd


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def uptime_ticks() -> int:
    """Clock ticks since boot now, comparable with `ProcStat.start_time`.

    Raises OSError if /proc/uptime cannot be read (no /proc mounted).
    """
    with open("/proc/uptime") as uptime:
        return int(float(uptime.read().split()[0]) * CLOCK_TICKS)


def scan_processes() -> list[ProcStat]:
    """Return the stat of every process (not thread) in /proc at about this moment.

    Processes that exit during the scan are left out. Raises OSError if /proc
    cannot be listed (no /proc mounted).
    """
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = read_stat(int(name))
        if stat is not None:
            table.append(stat)
    return table


def descendants(root_pid: int, table: Iterable[ProcStat]) -> list[ProcStat]:
    """Return every descendant of `root_pid` in `table`, following ppid links.

    Pure: uses only `table`, nearest generations first; `root_pid` itself is not
    included. A process that was re-parented away (double fork, setsid) is no longer
    linked to the root and is not found here; the instance tag and the cgroup exist
    for those.
    """
    children: dict[int, list[ProcStat]] = {}
    for stat in table:
        children.setdefault(stat.ppid, []).append(stat)
    found: list[ProcStat] = []
    seen = {root_pid}
    frontier = [root_pid]
    while frontier:
        next_frontier = []
        for pid in frontier:
            for child in children.get(pid, ()):
                if child.pid in seen:
                    continue
                seen.add(child.pid)
                found.append(child)
                next_frontier.append(child.pid)
        frontier = next_frontier
    return found

