"""An instance's stderr: read without pause, kept as a bounded tail for
`logs`, and logged within a budget.

The root's stderr pipe is inherited by its whole tree. `capture_stderr` reads
it until the last writer is gone, keeps the last STDERR_LINES lines raw
(decoded only when asked for, by `decode_tail`), and passes lines on to the
daemon's log as a `LineBudget` allows; past the budget lines are only counted,
and the pipe is read a pipe's worth at a time, so a flooding adapter can
neither busy the trio thread nor grow the log without bound.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, Protocol

import trio

# Lines of adapter stderr kept per instance for the `logs` method. Enough for a
# stack trace or two; bounded so a chatty adapter cannot grow the daemon.
STDERR_LINES = 1000

# Longest stderr line kept as one; a longer line is cut into pieces this long.
STDERR_LINE_BYTES = 4096

# Bytes of stderr kept per instance (at most STDERR_LINES lines of them), and
# for all instances together, live and finished: past the total, each tail is
# cut to an equal share of it as it grows, down to STDERR_TAIL_MIN_BYTES. A
# thousand instances of 4 KiB lines kept 4 MB each before (docs/performance.md).
STDERR_TAIL_BYTES = 256 * 1024
STDERR_TAILS_TOTAL_BYTES = 64 * 1024 * 1024
STDERR_TAIL_MIN_BYTES = 16 * 1024

# Stderr lines of one instance that go to the daemon's log: this many at
# once, then this many a second (a token bucket); the rest only reach the
# tail (`logs`), and their number is logged at most every
# STDERR_DROPS_REPORT_S. Rendering and writing every line of an adapter that
# writes stderr in a loop would take the trio thread from every client
# (docs/performance.md, "stderr"); journald's own default for a whole service
# is 10,000 messages per 30 s.
STDERR_LOG_BURST = 1000
STDERR_LOG_PER_S = 100.0
STDERR_DROPS_REPORT_S = 1.0

# Past its budget, an instance's stderr is read at most once in this long,
# a pipe's worth (64 KiB) at a time, rather than a few lines at a time as
# fast as they come. The writer blocks on a full pipe meanwhile, which caps a
# flood at about a pipe's worth per pause; below the budget nothing waits.
STDERR_FLOOD_PAUSE_S = 0.02


class TailBudget:
    """The bytes every `StderrTail` registered with it holds together."""

    def __init__(self, max_bytes: int = STDERR_TAILS_TOTAL_BYTES) -> None:
        self.max_bytes = max_bytes
        self.total = 0
        self.tails = 0

    def share(self) -> int:
        """The most one tail may hold while they all together hold too much."""
        return max(STDERR_TAIL_MIN_BYTES, self.max_bytes // max(1, self.tails))


class StderrTail:
    """The last lines of an instance's stderr, raw: at most `max_lines` lines
    and `max_bytes` bytes, and less while the tails of its `budget` hold more
    than the budget's total (then its share). The oldest lines go first."""

    def __init__(
        self,
        lines: Iterable[bytes] = (),
        *,
        budget: TailBudget | None = None,
        max_lines: int = STDERR_LINES,
        max_bytes: int = STDERR_TAIL_BYTES,
    ) -> None:
        # Made at the first line: most adapters write no stderr, and an empty
        # deque costs hundreds of bytes per instance.
        self._lines: collections.deque[bytes] | None = None
        self.bytes = 0
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._budget = budget
        if budget is not None:
            budget.tails += 1
        self.extend(lines)

    def extend(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            if self._lines is None:
                self._lines = collections.deque()
            self._lines.append(line)
            self._grow(len(line))
        self._trim()

    def append(self, line: bytes) -> None:
        self.extend((line,))

    def release(self) -> None:
        """Drop every line and leave the budget (the tail is forgotten)."""
        self._grow(-self.bytes)
        self._lines = None
        if self._budget is not None:
            self._budget.tails -= 1
            self._budget = None

    def _grow(self, by: int) -> None:
        self.bytes += by
        if self._budget is not None:
            self._budget.total += by

    def _trim(self) -> None:
        limit = self.max_bytes
        budget = self._budget
        if budget is not None and budget.total > budget.max_bytes:
            limit = min(limit, budget.share())
        lines = self._lines
        while lines and (len(lines) > self.max_lines or self.bytes > limit):
            self._grow(-len(lines.popleft()))

    def __len__(self) -> int:
        return len(self._lines) if self._lines is not None else 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._lines if self._lines is not None else ())


class StderrSource(Protocol):
    """What `capture_stderr` fills, and reads when no `receive` is given: a
    root's (`spawner.RootProcess`) stderr pipe."""

    stderr_fd: int | None
    stderr_tail: StderrTail


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


def capture_stderr(
    root: StderrSource,
    on_line: Callable[[str], None],
    on_dropped: Callable[[int], None] = lambda lines: None,
    receive: Callable[[], Awaitable[bytes]] | None = None,
) -> Coroutine[Any, Any, None]:
    """Read the root's stderr (which every descendant inherits) until its
    end, keeping the tail in `root.stderr_tail` and passing lines to
    `on_line` as a `LineBudget` allows; `on_dropped(count)` is told how many
    it did not allow, STDERR_DROPS_REPORT_S after the first of them (input or
    not) and at the end, so that every line is logged or counted. A line
    longer than STDERR_LINE_BYTES is cut into pieces. Past the budget, reads
    come at most every STDERR_FLOOD_PAUSE_S, and each costs a few C-level
    passes over its bytes, however many lines it holds.

    The bytes come from `receive()` (b"" at the end: a followed file's, see
    `stderrfile.FollowedFile`), or else from the root's stderr pipe until all
    its writers are gone; the pipe is closed at the end either way.
    Cancellation: stops reading, still reports what was dropped.

    (A plain function returning the coroutine to await: a frame less for
    each of the many readers that wait at once.)"""
    if receive is not None:
        return _capture(receive, root, on_line, on_dropped)
    return _capture_pipe(root, on_line, on_dropped)


async def _capture_pipe(root: StderrSource, on_line: Callable[[str], None], on_dropped: Callable[[int], None]) -> None:
    assert root.stderr_fd is not None, "no pipe to read and no receive given"
    stream = trio.lowlevel.FdStream(root.stderr_fd)

    async def from_pipe() -> bytes:
        try:
            return await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async with stream:
        await _capture(from_pipe, root, on_line, on_dropped)


async def _capture(
    receive: Callable[[], Awaitable[bytes]],
    root: StderrSource,
    on_line: Callable[[str], None],
    on_dropped: Callable[[int], None],
) -> None:
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

    try:
        buffer = b""
        while True:
            due = budget.report_due_at()
            chunk = None
            if due is None:
                # No cancel scope while nothing is due: one per waiting
                # reader costs each instance most of a kilobyte.
                chunk = await receive()
            else:
                with trio.move_on_at(due):
                    chunk = await receive()
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


def decode_tail(tail: StderrTail, last: int) -> list[str]:
    """The last `last` lines of a stderr tail, decoded, oldest first."""
    skip = max(0, len(tail) - last)
    return [_decode_line(raw) for raw in itertools.islice(tail, skip, None)]


def _decode_line(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r")
