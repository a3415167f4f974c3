"""Starting the root process of an instance.

The root starts in a new session with the instance tag in its environment and,
in cgroup mode, inside the instance's cgroup before it runs one instruction of
its own, so every descendant is born there. There are two ways to start it:

* the clone3 spawner (`supervisor.clonespawn`), when it was built: the root is
  created like posix_spawn creates a child, and in cgroup mode it is born in
  the instance cgroup (CLONE_INTO_CGROUP). It takes about as long as exec,
  so the daemon calls it on the trio thread.
* `subprocess.Popen`, everywhere else: in cgroup mode a `preexec_fn` joins the
  cgroup between fork and exec (a fork of the whole daemon plus an RCU grace
  period in the kernel: milliseconds), so the daemon calls it in a worker
  thread.

The daemon does all waiting itself (see `supervisor.subreaper`). A `Popen`
object is kept only so that its pid and pipes stay together, and it is told the
root's return code when the daemon reaps it, so `subprocess` never waits for
the child on its own.
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import math
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

from supervisor.procs import clonespawn
from supervisor.procs import process
from supervisor.core.config import AdapterConfig
from supervisor.core.errors import SpawnFailed

# Lines of adapter stderr kept per instance for the `logs` method. Enough for a
# stack trace or two; bounded so a chatty adapter cannot grow the daemon.
STDERR_LINES = 1000

# Longest stderr line kept as one; a longer line is cut into pieces this long.
STDERR_LINE_BYTES = 4096

# Stderr lines of one instance that go to the daemon's log: this many at
# once, then this many a second (a token bucket); the rest only reach the
# tail (`logs`), and their number is logged at most every
# STDERR_DROPS_REPORT_S. One adapter writing stderr in a loop used to have
# every line rendered and written by the trio thread, about 140,000 a second:
# `status` went from 66 us to 16 ms (136 ms p99) for every client, and the
# log grew by 80 MB a second. journald's default for a whole service is
# 10,000 messages per 30 s.
STDERR_LOG_BURST = 1000
STDERR_LOG_PER_S = 100.0
STDERR_DROPS_REPORT_S = 1.0

# Past its budget, an instance's stderr is read at most once in this long,
# a pipe's worth (64 KiB) at a time: a loop writing a line per system call
# otherwise had the daemon read a few lines at a time, as fast as they came,
# and kept the trio thread busy. The writer blocks on a full pipe meanwhile,
# which caps a flood at about 3 MB/s; below the budget nothing waits.
STDERR_FLOOD_PAUSE_S = 0.02


@dataclass
class RootProcess:
    """A spawned root with the daemon's ends of its pipes."""

    id: process.ProcessId
    stdin_fd: int | None
    stdout_fd: int | None
    stderr_fd: int
    # Only when subprocess started it.
    popen: subprocess.Popen[bytes] | None = None
    # Raw, decoded only when asked for (`decode_tail`): an adapter may write
    # thousands of lines between two `logs` calls.
    stderr_tail: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=STDERR_LINES))

    @property
    def pid(self) -> int:
        return self.id.pid

    def reaped(self, returncode: int) -> None:
        """The daemon reaped the root: a Popen must not wait for it itself."""
        if self.popen is not None and self.popen.returncode is None:
            self.popen.returncode = returncode

    def close_stdio(self) -> None:
        """Close the daemon's stdin/stdout ends (clients hold their own duplicates)."""
        for name in ("stdin_fd", "stdout_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def instance_environment(
    adapter: AdapterConfig,
    *,
    instance_id: str,
    job: str,
    daemon_key: str,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a root: the daemon's, then the adapter's `env`, then the tags."""
    env = _adapter_environment(adapter, daemon_key=daemon_key, base=base)
    env[process.INSTANCE_ENV] = instance_id
    env[process.JOB_ENV] = job
    return env


def _adapter_environment(adapter: AdapterConfig, *, daemon_key: str, base: Mapping[str, str] | None) -> dict[str, str]:
    """What every root of the adapter gets: the daemon's environment, the
    adapter's `env`, and the tags naming the adapter and the daemon."""
    env = dict(os.environ if base is None else base)
    env.update(adapter.env)
    env[process.ADAPTER_ENV] = adapter.name
    env[process.DAEMON_ENV] = daemon_key
    return env


# The tags whose values differ from one instance of an adapter to the next.
INSTANCE_TAGS = (process.INSTANCE_ENV, process.JOB_ENV)


def adapter_environment(
    adapter: AdapterConfig, *, daemon_key: str, base: Mapping[str, str] | None = None
) -> clonespawn.Environment:
    """`instance_environment` prepared once for every clone3 spawn of the
    adapter: each spawn brings only the values of INSTANCE_TAGS."""
    shared = _adapter_environment(adapter, daemon_key=daemon_key, base=base)
    return clonespawn.Environment(shared, own=INSTANCE_TAGS)


def spawn_root(
    adapter: AdapterConfig,
    *,
    instance_id: str,
    job: str,
    params: Mapping[str, str],
    daemon_key: str,
    cgroup_fd: int | None = None,
    clone3: bool = False,
    base_env: Mapping[str, str] | None = None,
    environment: clonespawn.Environment | None = None,
) -> RootProcess:
    """Start the adapter's root for one instance.

    With `clone3`, the clone3 spawner starts it and `cgroup_fd` is the instance's
    cgroup directory (`CgroupManager.dir_fd`); without, subprocess does and
    `cgroup_fd` is its cgroup.procs (`CgroupManager.join_fd`). The environment
    is `base_env` (default: os.environ) with the adapter's and the tags; a clone3
    spawn may bring it prepared instead (`environment`, from
    `adapter_environment` with the same base and daemon key). Raises
    `InvalidParams` (from rendering the command), `SpawnFailed` with the OS
    reason (missing executable, bad cwd, permission), or
    `clonespawn.Unsupported` (nothing was started; subprocess will work). On
    failure nothing is left open or running.
    """
    argv = adapter.render_argv(job, params)
    env: Mapping[str, str] | clonespawn.Environment
    env_values: tuple[str, ...] = ()
    if clone3 and environment is not None:
        env, env_values = environment, (instance_id, job)
    else:
        env = instance_environment(adapter, instance_id=instance_id, job=job, daemon_key=daemon_key, base=base_env)
    parent_fds: list[int] = []
    child_fds: list[int] = []

    def pipe(*, child_reads: bool) -> tuple[int, int]:
        """A pipe with one end for the child: (parent's end, child's end).
        Both are recorded the moment they exist, so a failure half-way (EMFILE
        on the third pipe) still closes everything."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        parent, child = (write_end, read_end) if child_reads else (read_end, write_end)
        parent_fds.append(parent)
        child_fds.append(child)
        return parent, child

    stdin_w: int | None = None
    stdout_r: int | None = None
    stdin: int = subprocess.DEVNULL
    stdout: int = subprocess.DEVNULL
    try:
        stderr_r, stderr_w = pipe(child_reads=False)
        if adapter.stdio == "pipe":
            stdin_w, stdin = pipe(child_reads=True)
            stdout_r, stdout = pipe(child_reads=False)
        if clone3:
            if stdin == subprocess.DEVNULL or stdout == subprocess.DEVNULL:
                null = _devnull()
                stdin = null if stdin == subprocess.DEVNULL else stdin
                stdout = null if stdout == subprocess.DEVNULL else stdout
            popen = None
            pid, start_time = clonespawn.spawn(
                argv, env=env, env_values=env_values, cwd=adapter.cwd, stdio=(stdin, stdout, stderr_w),
                cgroup_fd=cgroup_fd,
            )
        else:
            assert isinstance(env, dict)
            popen = _popen(argv, env=env, cwd=adapter.cwd, stdio=(stdin, stdout, stderr_w), cgroup_procs_fd=cgroup_fd)
            pid, start_time = popen.pid, 0
    except BaseException as exc:
        for fd in parent_fds:
            os.close(fd)
        if isinstance(exc, OSError) and not isinstance(exc, clonespawn.Unsupported):
            raise SpawnFailed(_describe_spawn_error(adapter, argv, exc)) from exc
        if isinstance(exc, subprocess.SubprocessError):
            raise SpawnFailed(f"adapter {adapter.name!r} could not be started: {exc}") from exc
        raise
    finally:
        for fd in child_fds:
            os.close(fd)
    # Our unreaped child: its pid cannot have been reused in between.
    identity = process.ProcessId(pid, start_time) if start_time else process.identify(pid) or process.ProcessId(pid, 0)
    return RootProcess(id=identity, stdin_fd=stdin_w, stdout_fd=stdout_r, stderr_fd=stderr_r, popen=popen)


@functools.cache
def _devnull() -> int:
    """/dev/null, opened once (close-on-exec) for every clone3 spawn's stdio:
    two system calls fewer per spawn."""
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


def _popen(
    argv: list[str], *, env: dict[str, str], cwd: str | None, stdio: tuple[int, int, int], cgroup_procs_fd: int | None
) -> subprocess.Popen[bytes]:
    preexec: Callable[[], None] | None = None
    if cgroup_procs_fd is not None:
        fd = cgroup_procs_fd

        def preexec() -> None:
            # Runs in the child between fork and exec: join the instance's
            # cgroup so that everything it will ever fork is born inside.
            os.write(fd, b"0")

    return subprocess.Popen(
        argv,
        stdin=stdio[0],
        stdout=stdio[1],
        stderr=stdio[2],
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
        preexec_fn=preexec,
    )


class LineBudget:
    """How many of an instance's stderr lines may be logged: `burst` at once,
    refilled at `per_s` a second. Pure: the caller passes the time."""

    def __init__(self, now: float, *, burst: int = STDERR_LOG_BURST, per_s: float = STDERR_LOG_PER_S) -> None:
        self.burst = burst
        self.per_s = per_s
        self._tokens = float(burst)
        self._refilled_at = now
        self._dropped = 0
        self._reported_at = now

    def take(self, lines: int, now: float) -> int:
        """How many of `lines` new lines to log (the first ones); the rest are
        counted as dropped."""
        self._tokens = min(float(self.burst), self._tokens + (now - self._refilled_at) * self.per_s)
        self._refilled_at = now
        granted = min(lines, int(self._tokens))
        self._tokens -= granted
        self._dropped += lines - granted
        return granted

    def report_due_at(self) -> float | None:
        """When the dropped lines not yet reported are due to be, if any are."""
        return self._reported_at + STDERR_DROPS_REPORT_S if self._dropped else None

    def dropped_to_report(self, now: float, *, final: bool = False) -> int:
        """The lines dropped since the last report, if one is due (every
        STDERR_DROPS_REPORT_S, or `final`ly); else 0."""
        if not self._dropped or (not final and now - self._reported_at < STDERR_DROPS_REPORT_S):
            return 0
        dropped, self._dropped, self._reported_at = self._dropped, 0, now
        return dropped


async def capture_stderr(
    root: RootProcess, on_line: Callable[[str], None], on_dropped: Callable[[int], None] = lambda lines: None
) -> None:
    """Read the root's stderr pipe (which every descendant inherits) until all
    writers are gone, keeping the tail in `root.stderr_tail` and passing lines
    to `on_line` as a `LineBudget` allows; `on_dropped(count)` is told how many
    it did not allow, STDERR_DROPS_REPORT_S after the first of them (input or
    not) and at the end, so that every line is logged or counted. A line
    longer than STDERR_LINE_BYTES is cut into pieces. Past the budget, reads
    come at most every STDERR_FLOOD_PAUSE_S, and each costs a few C-level
    passes over its bytes, however many lines it holds. Cancellation: stops
    reading, still reports what was dropped; the pipe is closed either way."""
    stream = trio.lowlevel.FdStream(root.stderr_fd)
    budget = LineBudget(trio.current_time())

    def report_dropped(*, final: bool = False) -> None:
        dropped = budget.dropped_to_report(trio.current_time(), final=final)
        if dropped:
            on_dropped(dropped)

    def emit(pieces: list[bytes]) -> bool:
        """Log and keep `pieces`; False if the budget did not cover them all."""
        logged = budget.take(len(pieces), trio.current_time())
        for raw in pieces[:logged]:
            on_line(_decode_line(raw))
        root.stderr_tail.extend(pieces[-STDERR_LINES:])
        report_dropped()
        return logged == len(pieces)

    async with stream:
        try:
            buffer = b""
            while True:
                due = budget.report_due_at()
                chunk = None
                with trio.move_on_at(math.inf if due is None else due):
                    try:
                        chunk = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                if chunk is None:
                    report_dropped()  # quiet since lines were dropped: say so now
                    continue
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                while len(buffer) > STDERR_LINE_BYTES:
                    lines.append(buffer[:STDERR_LINE_BYTES])
                    buffer = buffer[STDERR_LINE_BYTES:]
                pieces = lines
                if max(map(len, lines), default=0) > STDERR_LINE_BYTES:
                    pieces = [
                        raw[start:start + STDERR_LINE_BYTES]
                        for raw in lines
                        for start in range(0, max(len(raw), 1), STDERR_LINE_BYTES)
                    ]
                if pieces and not emit(pieces):
                    await trio.sleep(STDERR_FLOOD_PAUSE_S)
            if buffer:
                emit([buffer])
        finally:
            report_dropped(final=True)


def decode_tail(tail: collections.deque[bytes], last: int) -> list[str]:
    """The last `last` lines of a stderr tail, decoded, oldest first."""
    skip = max(0, len(tail) - last)
    return [_decode_line(raw) for raw in itertools.islice(tail, skip, None)]


def _decode_line(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r")


def _describe_spawn_error(adapter: AdapterConfig, argv: list[str], exc: OSError) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENOENT and exc.filename == adapter.cwd and adapter.cwd is not None:
        what = f"its cwd {adapter.cwd!r} does not exist"
    elif exc.errno == errno.ENOENT:
        what = f"executable {argv[0]!r} not found (check the command and PATH)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        what = f"permission denied running {argv[0]!r} (or entering cwd {adapter.cwd!r})"
    elif exc.errno == errno.ENOTDIR:
        what = f"cwd {adapter.cwd!r} is not a directory"
    else:
        what = reason
    return f"adapter {adapter.name!r} could not be started: {what} [{errno.errorcode.get(exc.errno or 0, 'error')}: {reason}]"
