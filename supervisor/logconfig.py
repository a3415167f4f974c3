"""Logging configuration, done once at start-up.

Library code only calls `structlog.get_logger()` and logs one event per thing
that happened, with ids as key-values. This module decides how those events are
rendered: JSON lines for services (and journald), a console renderer on a
terminal. Under journald every line also starts with its syslog priority as
``<N>`` (sd-daemon(3)), which journald strips and records as PRIORITY=, so that
`journalctl -p warning` shows warnings and worse.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import msgspec
import structlog

from supervisor.systemd import under_journald

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# syslog(3) priorities of structlog's method names: the numbers journald and
# `journalctl -p` use (2 crit, 3 err, 4 warning, 6 info, 7 debug).
SYSLOG_PRIORITIES = {
    "debug": 7,
    "info": 6,
    "msg": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}
# A method name not in the table (none today) is logged as info, never dropped.
DEFAULT_PRIORITY = 6


# A turn that has logged this many lines writes them at once: a runaway turn,
# or one that never ends (a hung exec), still leaves most of its lines behind.
MAX_HELD_LINES = 64


class TurnWriter:
    """Where the daemon's log lines go: `out`, a turn of the event loop later.

    A log line written between a request's work and its reply would delay the
    reply by a system call, and the first system calls after the CPU has been
    idle cost the most. As a trio instrument, this writer holds the lines
    logged on the trio thread during one scheduler turn and writes them in one
    go when the turn ends (`before_io_wait`), after that turn's replies went
    out; at most a turn late, in order. Lines from other threads, or while no
    trio run is going on, are written at once; a turn that logs MAX_HELD_LINES
    lines writes them then. A line that cannot be written (stderr closed) is
    dropped: there is nowhere else to say so. Lines held when the process is
    killed outright (SIGKILL, a crash in C) are lost: at most one turn's.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._pending: list[str] = []
        self._trio_thread: int | None = None
        # Writes from the trio thread's drain and from other threads go to one
        # stream: one at a time.
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        if threading.get_ident() != self._trio_thread:
            self._write(text)
            return
        self._pending.append(text)
        if len(self._pending) >= MAX_HELD_LINES:
            self.drain()

    def flush(self) -> None:
        if threading.get_ident() != self._trio_thread:
            self._flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def fileno(self) -> int:
        return self.out.fileno()

    # -- trio.abc.Instrument ---------------------------------------------------

    def before_run(self) -> None:
        self._trio_thread = threading.get_ident()

    def before_io_wait(self, timeout: float) -> None:
        if self._pending:
            self.drain()

    def after_run(self) -> None:
        self._trio_thread = None
        self.drain()

    def drain(self) -> None:
        """Write every held line now."""
        pending, self._pending = self._pending, []
        if pending:
            self._write("".join(pending))
        self._flush()

    def _write(self, text: str) -> None:
        # Never raises: trio drops an instrument whose hook raises, and a
        # dropped writer would hold every later line forever.
        try:
            with self._lock:
                self.out.write(text)
                self.out.flush()
        except Exception:  # noqa: BLE001 (a closed or broken stream: the line is lost)
            pass

    def _flush(self) -> None:
        try:
            with self._lock:
                self.out.flush()
        except Exception:  # noqa: BLE001
            pass


def configure_logging(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None, *, journald: bool | None = None
) -> None:
    """Configure structlog for the whole process.

    `log_format` is "json", "console" or "auto" (JSON under journald or when
    `stream` is not a terminal, console on a terminal). Events go to `stream`
    (default stderr). `journald` says whether `stream` is the journal (None:
    detect it from $JOURNAL_STREAM); when it is, each line gets its `<N>`
    priority prefix whatever the format. Raises KeyError for a `level` that is
    not in LEVELS; a `log_format` other than "json" and "auto" means console.
    """
    out = stream if stream is not None else sys.stderr
    if journald is None:
        journald = under_journald(out)
    if log_format == "auto":
        log_format = "json" if journald or not out.isatty() else "console"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer(serializer=json_line)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty() and not journald)
    rendering: list[structlog.types.Processor] = [renderer]
    if journald:
        rendering.append(add_priority_prefix)
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )


def json_line(event: dict[str, Any], **_: Any) -> str:
    """An event as one JSON object, encoded by msgspec (this runs on the
    daemon's request path). What JSON cannot hold is logged as its repr()."""
    return msgspec.json.encode(event, enc_hook=repr).decode()


def add_priority_prefix(logger: Any, method_name: str, rendered: Any) -> str:
    """Prefix every line of a rendered event with its `<N>` syslog priority.

    Runs after the renderer, so `rendered` is the finished text. Every line of
    a multi-line event (a console-rendered traceback) gets the prefix, since
    journald makes each line its own entry.
    """
    prefix = f"<{SYSLOG_PRIORITIES.get(method_name, DEFAULT_PRIORITY)}>"
    return "\n".join(prefix + line for line in str(rendered).split("\n"))
