"""Watching processes from the benchmark driver: identities, exits, reaping.

A process is a (pid, start time) pair, as in the product; an exit is observed
through a pidfd (readable once the process has exited, zombie or not), opened
and then checked against the start time so a reused pid is never mistaken for
a member. The driver makes itself a child subreaper so that the escapees of
the peers' trees (and of the raw floor) re-parent to it rather than to PID 1,
which on some hosts (containers, micro-VMs) never reaps them; `reap_orphans`
collects them by pid, never touching the children it runs with subprocess.
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

# From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# States of a process that has exited but is still in the process table.
EXITED_STATES = frozenset("ZX")


@dataclass(frozen=True)
class Member:
    """One recorded process of a tree."""

    role: str
    pid: int
    start_time: int
    recorded_ns: int


def become_subreaper() -> None:
    """Orphaned descendants of the driver re-parent to it. Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def terminate_with_parent() -> None:
    """In a child between fork and exec: SIGTERM it if the driver dies, so a
    killed benchmark does not leave daemons running (they then stop their trees)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of `pid`, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def is_alive(member: Member) -> bool:
    """True while that very process exists and has not exited."""
    stat = read_stat(member.pid)
    return stat is not None and stat[2] == member.start_time and stat[0] not in EXITED_STATES


def zombie_parent(member: Member) -> int | None:
    """The parent pid if `member` is an unreaped zombie, else None."""
    stat = read_stat(member.pid)
    if stat is None or stat[2] != member.start_time or stat[0] not in EXITED_STATES:
        return None
    return stat[1]


def read_pidfile(path: str) -> list[Member]:
    """The members a tree has recorded so far (see bench/tree.py)."""
    try:
        with open(path) as pidfile:
            lines = pidfile.read().splitlines()
    except FileNotFoundError:
        return []
    members = []
    for line in lines:
        parts = line.split()
        if len(parts) == 4:
            members.append(Member(parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    return members


def wait_for_members(path: str, count: int, timeout: float) -> list[Member]:
    """Poll `path` until `count` members are recorded. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        members = read_pidfile(path)
        if len(members) >= count:
            return members
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(members)} of {count} tree members recorded in {path}")
        time.sleep(0.0005)


@dataclass
class ExitWatch:
    """pidfds on a set of members; `poll` notes when each one exits."""

    members: list[Member]
    fds: dict[int, Member] = field(default_factory=dict)
    exited_ns: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.poller = select.poll()
        for member in self.members:
            try:
                fd = os.pidfd_open(member.pid)
            except ProcessLookupError:
                self.exited_ns[member.pid] = time.monotonic_ns()
                continue
            stat = read_stat(member.pid)
            if stat is None or stat[2] != member.start_time:
                os.close(fd)
                self.exited_ns[member.pid] = time.monotonic_ns()
                continue
            self.fds[fd] = member
            self.poller.register(fd, select.POLLIN)

    @property
    def all_exited(self) -> bool:
        return len(self.exited_ns) == len(self.members)

    def alive(self) -> list[Member]:
        return [m for m in self.members if m.pid not in self.exited_ns]

    def poll(self, timeout_s: float, extra_fd: int | None = None) -> bool:
        """Wait up to `timeout_s` for exits (or for `extra_fd` to be readable);
        returns whether `extra_fd` became readable."""
        if extra_fd is not None:
            self.poller.register(extra_fd, select.POLLIN)
        try:
            events = self.poller.poll(max(0, math.ceil(timeout_s * 1000)))
        finally:
            if extra_fd is not None:
                self.poller.unregister(extra_fd)
        now = time.monotonic_ns()
        extra_ready = False
        for fd, _ in events:
            if fd == extra_fd:
                extra_ready = True
                continue
            member = self.fds.get(fd)
            if member is not None and member.pid not in self.exited_ns:
                self.exited_ns[member.pid] = now
                self.poller.unregister(fd)
        return extra_ready

    def kill_alive(self) -> int:
        """SIGKILL every member still alive, through its pidfd; returns how many."""
        killed = 0
        for fd, member in self.fds.items():
            if member.pid in self.exited_ns:
                continue
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        return killed

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def reap_orphans(keep: Iterable[int] = ()) -> int:
    """Reap every zombie child of this process except the pids in `keep` (those
    that subprocess waits for itself). Returns how many were reaped."""
    me = os.getpid()
    keep = set(keep)
    reaped = 0
    for pid in list_pids():
        if pid in keep:
            continue
        stat = read_stat(pid)
        if stat is None or stat[1] != me or stat[0] not in EXITED_STATES:
            continue
        try:
            os.waitpid(pid, os.WNOHANG)
            reaped += 1
        except ChildProcessError:
            pass
    return reaped


def list_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> set[int]:
    """Pids of every live descendant of `root` (by ppid links, at this moment)."""
    children: dict[int, list[int]] = {}
    for pid in list_pids():
        stat = read_stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found: set[int] = set()
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, ()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole host since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user/nice
    return total - idle, total


def wait_for_quiet_host(busy_fraction: float, timeout: float, window: float = 0.25) -> bool:
    """Wait until the host's CPUs were busy less than `busy_fraction` of one
    `window`; False if that did not happen within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy0, total0 = host_cpu_ticks()
        time.sleep(window)
        busy1, total1 = host_cpu_ticks()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_fraction:
            return True
    return False


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return 0
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except FileNotFoundError:
        return 0.0
    fields = data[data.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def environ_has(pid: int, marker: bytes) -> bool:
    """True if `pid`'s initial environment contains the exact entry `marker`."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return marker in environ.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def environ_has_name(pid: int, name: bytes) -> bool:
    """True if `pid`'s initial environment defines the variable `name`."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return any(entry.startswith(name + b"=") for entry in environ.read().split(b"\0"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
