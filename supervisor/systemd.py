"""Speaking to systemd: readiness notification, socket activation, the journal.

Three small protocols, implemented on the standard library so that the daemon
depends on nothing when it runs outside systemd:

* sd_notify(3): newline-separated ``KEY=VALUE`` assignments sent as one datagram
  to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the
  abstract namespace). Without the variable every notification is a no-op.
* sd_listen_fds(3): ``$LISTEN_PID`` names the process the descriptors are for,
  ``$LISTEN_FDS`` how many there are (numbered from 3), ``$LISTEN_FDNAMES`` their
  colon-separated names.
* The file-descriptor store (sd_pid_notify_with_fds(3), ``FDSTORE=1`` with
  ``FDNAME=``): descriptors sent with a notification are kept by systemd and
  passed back, named, through ``$LISTEN_FDS`` when the service starts again
  (after a crash, with ``FileDescriptorStoreMax=`` set). The daemon keeps its
  ends of the adapters' stdin/stdout pipes there (`STDIO_FD_PREFIX`).
* systemd.exec(5) ``$JOURNAL_STREAM``: ``DEVICE:INODE`` of the stream connected to
  the journal, so a process can tell whether its stderr still goes there.

The variables of the first two are removed from ``os.environ`` once read, as
``sd_listen_fds(1)`` does, so that adapters spawned later neither see
descriptors that are not theirs nor try to notify on the daemon's behalf.

Everything here runs on the trio thread; notifications are sent without
blocking, and one that cannot be sent is logged and dropped.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TextIO

import structlog
import trio

from supervisor.engine.stdiostore import STDIO_FD_PREFIX

log = structlog.get_logger()

# The first descriptor passed by socket activation; fixed by the protocol
# (0, 1 and 2 are stdio).
LISTEN_FDS_START = 3

# sd_listen_fds_with_names(3) reports this name for descriptors without one.
UNNAMED_FD = "unknown"

# The FileDescriptorName= of systemd/adapter-supervisor.socket: the passed
# descriptor the daemon serves on when more than one is passed.
CONTROL_FD_NAME = "control"

# sd_watchdog_enabled(3) asks for a keep-alive ping at half the timeout, so that
# one late wake-up never lets the timer run out.
WATCHDOG_FRACTION = 0.5

# How often the STATUS= line is recomputed (it is sent only when it changes):
# often enough that `systemctl status` is current, cheap because the counts are
# dictionary sizes.
STATUS_POLL_S = 1.0

# A FDSTORE=1 that finds systemd's queue full is sent again this many times,
# after 1, 2, ... times this long: a few ms at most on the trio thread, in a
# burst of spawns only.
FDSTORE_ATTEMPTS = 5
FDSTORE_RETRY_S = 0.001

LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ActivationError(Exception):
    """The socket-activation variables or descriptors are unusable."""


# ----------------------------------------------------------------------------
# Pure parsing and formatting.


def parse_notify_address(value: str) -> str | bytes:
    """The address to send notifications to, from a `$NOTIFY_SOCKET` value.

    An absolute path is returned as is; ``@name`` becomes the abstract address
    ``b"\\0name"``. Raises ValueError for anything else (relative paths, and
    the ``vsock:`` addresses of newer systemd, which this daemon does not speak).
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    raise ValueError(f"NOTIFY_SOCKET must be an absolute path or @abstract-name, got {value!r}")


def format_notification(fields: Mapping[str, object]) -> bytes:
    """One sd_notify datagram: ``KEY=VALUE`` lines in the order given.

    Raises ValueError if there is nothing to send or a key or value would break
    the line format (an empty key, ``=`` in a key, a newline anywhere).
    """
    if not fields:
        raise ValueError("a notification needs at least one field")
    lines = []
    for key, value in fields.items():
        text = str(value)
        if not key or "=" in key or "\n" in key or "\n" in text:
            raise ValueError(f"cannot send {key!r}={text!r} as a notification line")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between keep-alive pings, or None when no watchdog is asked of `pid`.

    Asked of us: `$WATCHDOG_USEC` is a positive integer and `$WATCHDOG_PID` is
    unset or `pid`. A malformed value counts as no watchdog, as in
    sd_watchdog_enabled(3).
    """
    usec = _positive_int(environ.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and _positive_int(owner) != pid:
        return None
    return usec * WATCHDOG_FRACTION / 1_000_000


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """The descriptors passed to `pid` by socket activation, with their names.

    Empty when `$LISTEN_PID` is unset or names another process (the variables
    were inherited, not meant for us). Descriptors without a name, or all of
    them when `$LISTEN_FDNAMES` does not have one name per descriptor, are
    called `UNNAMED_FD`. Raises ActivationError when the variables are meant
    for `pid` but malformed.
    """
    owner = environ.get("LISTEN_PID")
    if owner is None or _positive_int(owner) != pid:
        return []
    count_text = environ.get("LISTEN_FDS", "")
    try:
        count = int(count_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS is not a number: {count_text!r}") from None
    if count < 0:
        raise ActivationError(f"LISTEN_FDS is negative: {count}")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count:
        names = [UNNAMED_FD] * count
    return [(LISTEN_FDS_START + i, name or UNNAMED_FD) for i, name in enumerate(names)]


def choose_listener(passed: list[tuple[int, str]], name: str = CONTROL_FD_NAME) -> int | None:
    """Which passed descriptor to serve on: the one called `name`, else the only one.

    None when nothing was passed. Raises ActivationError when several were
    passed and none is called `name`, or several are.
    """
    if not passed:
        return None
    named = [fd for fd, fd_name in passed if fd_name == name]
    if len(named) == 1:
        return named[0]
    if not named and len(passed) == 1:
        return passed[0][0]
    names = ", ".join(f"{fd}={fd_name}" for fd, fd_name in passed)
    raise ActivationError(f"cannot tell which passed socket is the control socket ({names}); name it {name!r}")


def _positive_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


# ----------------------------------------------------------------------------
# sd_notify.


class Notifier:
    """Sends sd_notify messages; every method is a no-op without an address.

    Sending never blocks and never raises: a notification that cannot be sent
    (systemd's queue full, the socket gone) is logged as `systemd.notify_failed`
    and dropped, since the daemon's job must not depend on it. Making one with an
    address raises OSError if no socket can be created (no descriptor left).
    """

    def __init__(self, address: str | bytes | None, *, watchdog_period: float | None = None) -> None:
        self.address = address
        # Seconds between WATCHDOG=1 pings; None: no watchdog was asked for.
        self.watchdog_period = watchdog_period if address is not None else None
        self._sock: socket.socket | None = None
        # The variables it was made from, for this process re-executed in
        # place (`for_reexec`).
        self._variables: dict[str, str] = {}
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, pid: int | None = None) -> Notifier:
        """A notifier for `$NOTIFY_SOCKET` (and the watchdog of `$WATCHDOG_USEC`).

        Removes the three variables from `environ` (default `os.environ`) so
        that child processes do not inherit them. A value that is not an
        address this module speaks is logged and gives a no-op notifier. Raises
        OSError if the notification socket cannot be created.
        """
        env = os.environ if environ is None else environ
        values = {name: env.pop(name) for name in NOTIFY_VARIABLES if name in env}
        raw = values.get("NOTIFY_SOCKET")
        if not raw:
            return cls(None)
        try:
            address = parse_notify_address(raw)
        except ValueError as exc:
            log.warning("systemd.notify_unsupported", error=str(exc))
            return cls(None)
        notifier = cls(address, watchdog_period=watchdog_period(values, os.getpid() if pid is None else pid))
        notifier._variables = values
        return notifier

    def for_reexec(self) -> dict[str, str]:
        """The variables to give this same process when it re-executes itself
        (an in-place upgrade keeps the pid systemd knows as MAINPID)."""
        variables = dict(self._variables)
        if "WATCHDOG_PID" in variables:
            variables["WATCHDOG_PID"] = str(os.getpid())
        return variables

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: object) -> bool:
        """Send `fields` as one message; True if it was sent.

        Raises ValueError only for fields that cannot be encoded (a programming
        error, see `format_notification`).
        """
        if self._sock is None or self.address is None:
            return False
        message = format_notification(fields)
        try:
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("systemd.notify_failed", fields=sorted(fields), error=exc.strerror or str(exc))
            return False
        return True

    def store_fds(self, name: str, fds: list[int]) -> bool:
        """FDSTORE=1: systemd keeps duplicates of `fds` under `name` and passes
        them back when the service starts again. True if it was sent (systemd
        still refuses past FileDescriptorStoreMax=, and says so in its log)."""
        if self._sock is None or self.address is None:
            return False
        message = format_notification({"FDSTORE": 1, "FDNAME": name})
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        for attempt in range(FDSTORE_ATTEMPTS):
            try:
                self._sock.sendmsg([message], ancillary, 0, self.address)
                return True
            except BlockingIOError:
                # systemd's queue is full (a burst of spawns): a pipe not
                # stored is an adapter lost in a crash, so wait a little.
                time.sleep(FDSTORE_RETRY_S * (attempt + 1))
            except OSError as exc:
                log.warning("systemd.fdstore_failed", name=name, error=exc.strerror or str(exc))
                return False
        log.warning("systemd.fdstore_failed", name=name, error="systemd's notification queue stayed full")
        return False

    def remove_fds(self, name: str) -> bool:
        """FDSTOREREMOVE=1: systemd closes what it keeps under `name`."""
        return self.notify(FDSTOREREMOVE=1, FDNAME=name)

    def ready(self, status: str | None = None) -> bool:
        """READY=1: the daemon accepts connections (again, after a reload).
        Raises ValueError for a `status` that holds a newline."""
        return self.notify(READY=1, **({"STATUS": status} if status is not None else {}))

    def reloading(self) -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC time systemd asks to accompany it."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun. Raises ValueError for a `status` that
        holds a newline."""
        return self.notify(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog(notifier: Notifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Send WATCHDOG=1 every `notifier.watchdog_period` seconds, forever.

    Returns at once when no watchdog was asked for. The pings come from a trio
    task, so a wedged event loop stops them and systemd's watchdog fires, which
    is the point. Cancellation stops the pings.
    """
    period = notifier.watchdog_period
    task_status.started()
    if period is None:
        return
    log.info("systemd.watchdog", period_s=period)
    while True:
        notifier.notify(WATCHDOG=1)
        await trio.sleep(period)


async def report_status(
    notifier: Notifier,
    describe: Callable[[], str],
    *,
    interval: float = STATUS_POLL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send STATUS=`describe()` every `interval` seconds when the text changed.

    `describe` runs on the trio thread and must not block; what it raises
    propagates and ends the reports, and so does the ValueError of a text
    that holds a newline. Returns at once without a notify socket;
    cancellation stops the reports.
    """
    task_status.started()
    if not notifier.enabled:
        return
    sent: str | None = None
    while True:
        text = describe()
        if text != sent and notifier.notify(STATUS=text):
            sent = text
        await trio.sleep(interval)


# ----------------------------------------------------------------------------
# Socket activation.


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None, *, stored: dict[str, int] | None = None
) -> list[tuple[str, socket.socket]]:
    """The sockets passed to this process by socket activation, with their names.

    Implements sd_listen_fds_with_names(unset_environment=1): the variables are
    removed from `environ` (default `os.environ`) whatever they held, and each
    descriptor is made close-on-exec so adapters never inherit it. Stored
    stdio pipes (names starting with STDIO_FD_PREFIX) go into `stored`, by
    name, or are closed when it is None. Raises ActivationError if the
    variables are malformed or a descriptor is not open.
    """
    env = os.environ if environ is None else environ
    values = {name: env.pop(name) for name in LISTEN_VARIABLES if name in env}
    passed = parse_listen_fds(values, os.getpid())
    sockets = []
    duplicated: set[str] = set()
    for fd, name in list(passed):
        if name.startswith(STDIO_FD_PREFIX):
            passed.remove((fd, name))
            try:
                os.set_inheritable(fd, False)
            except OSError:
                continue  # not open: nothing to take back
            if stored is None or not _is_stdio_pipe(fd, name):
                os.close(fd)
            elif name in stored:
                duplicated.add(name)  # which one is the pipe? neither is trusted
                os.close(fd)
            else:
                stored[name] = fd
    for name in duplicated:
        os.close(stored.pop(name))
    for fd, name in passed:
        try:
            os.set_inheritable(fd, False)
            sockets.append((name, socket.socket(fileno=fd)))
        except OSError as exc:
            for _, sock in sockets:
                sock.close()
            raise ActivationError(f"passed descriptor {fd} ({name}) is unusable: {exc.strerror or exc}") from None
    return sockets


def _is_stdio_pipe(fd: int, name: str) -> bool:
    """Whether a stored descriptor is what its name says: a pipe's write end
    (`-in`, an adapter's stdin) or read end (`-out`, its stdout)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        return False
    return mode == (os.O_WRONLY if name.endswith("-in") else os.O_RDONLY)


def activated_listener(
    environ: MutableMapping[str, str] | None = None,
    *,
    name: str = CONTROL_FD_NAME,
    stored: dict[str, int] | None = None,
) -> socket.socket | None:
    """The listening control socket passed by socket activation, or None.

    Picks the descriptor called `name` (or the only one passed) and checks that
    it is a listening AF_UNIX stream socket; the other passed sockets are closed
    (systemd keeps its own copies). Stored stdio pipes go into `stored` (see
    `listen_fds_with_names`). Raises ActivationError if nothing passed is
    usable, naming what was wrong.
    """
    passed = listen_fds_with_names(environ, stored=stored)
    try:
        chosen_fd = choose_listener([(sock.fileno(), fd_name) for fd_name, sock in passed], name)
    except ActivationError:
        for _, sock in passed:
            sock.close()
        raise
    chosen = None
    for _, sock in passed:
        if sock.fileno() == chosen_fd:
            chosen = sock
        else:
            sock.close()
    if chosen is None:
        return None
    problem = _listener_problem(chosen)
    if problem is not None:
        chosen.close()
        raise ActivationError(f"passed descriptor {chosen_fd} {problem}")
    return chosen


def _listener_problem(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return "is not a Unix stream socket (peer credentials need one; ListenStream= a path)"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is not listening (the socket unit needs Accept=no)"
    return None


# ----------------------------------------------------------------------------
# The journal.


def under_journald(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` (default stderr) is the journal stream systemd connected.

    True when `$JOURNAL_STREAM` is ``DEVICE:INODE`` of the very file `stream`
    writes to; a child whose stderr was redirected elsewhere inherits the
    variable but not the stream, and gets False.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        expected = (int(device), int(inode))
    except ValueError:
        return False
    out = stream if stream is not None else sys.stderr
    try:
        info = os.fstat(out.fileno())
    except (OSError, ValueError):
        # No descriptor behind the stream: io.StringIO raises
        # io.UnsupportedOperation, a closed file ValueError.
        return False
    return (info.st_dev, info.st_ino) == expected
