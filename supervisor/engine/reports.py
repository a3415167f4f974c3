"""Sweep reports: their shape (see docs/protocol.md, `sweep`) and where they are kept.

A report is kept three ways: logged as one `sweep.report` event (at debug
level for a periodic sweep that found nothing, which is most of them), held in a
bounded in-memory history served by the `reports` method, and appended to
`state_dir/reports.jsonl`, which is rotated once it passes its size bound
(one previous generation, `reports.jsonl.1`, is kept), so the files never
take more than twice the bound.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import msgspec

# Reports held in memory for the `reports` method: a day of sweeps at the
# default 30 s interval would be 2880; the last few hundred are what an operator
# looks at, and each is small.
MEMORY_REPORTS = 500

REPORTS_FILE = "reports.jsonl"

# What one report holds in full, so that a host full of strangers' escapees
# cannot make every report (and the log, the history and reports.jsonl with
# it) megabytes long: this many orphans (the rest are counted in
# `orphans_omitted`), this many bytes of each one's command line (`cmdline_cut`
# says it was cut), this many errors of this many characters.
MAX_ORPHANS_IN_FULL = 50
MAX_CMDLINE_BYTES = 1024
MAX_ERRORS = 20
MAX_ERROR_CHARS = 500


class Orphan(msgspec.Struct, kw_only=True):
    """One process a sweep found without a live instance, and what it did about it."""

    pid: int
    ppid: int
    cmdline: list[str]
    instance: str | None
    job: str | None
    adapter: str | None
    age_s: float
    rss_bytes: int
    action: str  # terminated | killed | reaped_zombie
    result: str  # gone | failed
    # The command line was longer than MAX_CMDLINE_BYTES and is cut.
    cmdline_cut: bool = False


class SweepReport(msgspec.Struct, kw_only=True):
    id: str
    kind: str  # periodic | startup | manual
    started_at: float
    duration_ms: float
    scanned: int
    orphans: list[Orphan] = []
    expired_leases: list[str] = []
    over_memory: list[str] = []
    reclaimed_rss_bytes: int = 0
    errors: list[str] = []
    # Startup only: instances of the previous incarnation taken over, not reaped.
    adopted: list[str] = []
    # Orphans acted on but not listed (past MAX_ORPHANS_IN_FULL), and errors
    # not listed (past MAX_ERRORS).
    orphans_omitted: int = 0
    errors_omitted: int = 0


def bounded(report: SweepReport) -> SweepReport:
    """`report` cut to what one report holds in full (the constants above);
    counts and totals are kept. Pure; `report` is left as it was."""
    orphans = [_bounded_orphan(o) for o in report.orphans[:MAX_ORPHANS_IN_FULL]]
    errors = [e[:MAX_ERROR_CHARS] for e in report.errors[:MAX_ERRORS]]
    return msgspec.structs.replace(
        report, orphans=orphans, errors=errors,
        orphans_omitted=report.orphans_omitted + max(0, len(report.orphans) - MAX_ORPHANS_IN_FULL),
        errors_omitted=report.errors_omitted + max(0, len(report.errors) - MAX_ERRORS),
    )


def _bounded_orphan(orphan: Orphan) -> Orphan:
    kept: list[str] = []
    room = MAX_CMDLINE_BYTES
    for arg in orphan.cmdline:
        size = len(arg.encode(errors="replace"))
        if size > room:
            if room > 0:
                kept.append(arg.encode(errors="replace")[:room].decode(errors="ignore"))
            return msgspec.structs.replace(orphan, cmdline=kept, cmdline_cut=True)
        kept.append(arg)
        room -= size
    return orphan


def found_nothing(report: SweepReport) -> bool:
    """Whether the sweep found nothing to act on or tell: no orphan, expired
    lease, tree over its memory limit, adopted instance or error."""
    return not (report.orphans or report.expired_leases or report.over_memory or report.errors or report.adopted)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SweepReport)


class ReportStore:
    """The bounded history of reports, in memory and on disk.

    `remember` runs on the trio thread; `append_to_file` does blocking I/O and is
    meant for a worker thread (it touches nothing but the file).
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, max_file_bytes: int) -> None:
        self.path = Path(state_dir) / REPORTS_FILE
        self.max_file_bytes = max_file_bytes
        self.recent: collections.deque[SweepReport] = collections.deque(maxlen=MEMORY_REPORTS)

    def read_history(self) -> list[SweepReport]:
        """Blocking, changes nothing: the reports earlier runs left on disk,
        oldest first (for `remember`). Lines that do not parse (a torn last
        write) are skipped."""
        history: collections.deque[SweepReport] = collections.deque(maxlen=MEMORY_REPORTS)
        for path in (self.path.with_name(REPORTS_FILE + ".1"), self.path):
            try:
                lines = path.read_bytes().splitlines()
            except FileNotFoundError:
                continue
            for line in lines[-MEMORY_REPORTS:]:
                try:
                    history.append(_decoder.decode(line))
                except msgspec.DecodeError:
                    continue
        return list(history)

    def remember(self, report: SweepReport) -> None:
        self.recent.append(report)

    def latest(self, limit: int) -> list[SweepReport]:
        """Up to `limit` reports, newest first."""
        return list(reversed(self.recent))[:limit]

    def append_to_file(self, report: SweepReport) -> None:
        """Blocking: append one line, rotating first if the file would pass its bound."""
        line = _encoder.encode(report) + b"\n"
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.max_file_bytes:
            os.replace(self.path, self.path.with_name(REPORTS_FILE + ".1"))
        # Never through a symlink, and readable by the daemon's uid alone.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # A line torn by an earlier crash (or a full disk) is ended first,
            # so this report is not glued onto it and lost with it.
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)


def to_builtins(report: SweepReport) -> dict[str, object]:
    """The report as plain JSON-ready values (for the wire and the log)."""
    return msgspec.to_builtins(report)
