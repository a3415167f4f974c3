"""The schema of the daemon-wide settings (the `[daemon]` table):
`DaemonConfig`, the default socket and state paths, and how the table of the
document becomes one (paths resolved, the socket path's length checked)."""

from __future__ import annotations

import grp
import os
import re
from typing import Annotated, Any, Self

import msgspec
from msgspec import UNSET, Meta, UnsetType

from supervisor.core.configerrors import _show
from supervisor.core.configvalues import (
    MAX_ID,
    _Choice,
    _given_fields,
    _Id,
    _NonZeroSize,
    _resolve_path,
    _Size,
)
from supervisor.core.errors import ConfigError

# The sweep interval is bounded at a day so that `inf` (valid TOML) cannot
# disable sweeping, which is what the daemon exists to do.
MAX_SWEEP_INTERVAL = 86400.0
# A JSON-RPC acquire with a few parameters needs a few hundred bytes; below 1 KiB
# ordinary requests would be refused.
MIN_MESSAGE_BYTES = 1024
# sun_path in struct sockaddr_un is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# Permission bits only: setuid, setgid and sticky mean nothing on a socket file.
MAX_SOCKET_MODE = 0o777
# The accepted words of the enumerated settings, for the modules that act on them.
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
# How roots are started: "auto" uses the clone3 spawner when it was built (and
# the kernel allows clone3), else subprocess; "subprocess" always uses subprocess.
SPAWNERS = ("auto", "subprocess")

_SYSTEM_RUNTIME_DIR = "/run/adapter-supervisor"
_SYSTEM_STATE_DIR = "/var/lib/adapter-supervisor"
_SOCKET_NAME = "control.sock"


def default_socket_path() -> str:
    """The control socket path used when the config names none.

    Root gets the system path under /run; anyone else a per-user path, so that a
    developer can run the daemon without privileges.
    """
    if os.geteuid() == 0:
        return os.path.join(_SYSTEM_RUNTIME_DIR, _SOCKET_NAME)
    return os.path.join(_user_runtime_dir(), _SOCKET_NAME)


def default_state_dir() -> str:
    """The state directory used when the config names none (see default_socket_path)."""
    if os.geteuid() == 0:
        return _SYSTEM_STATE_DIR
    return os.path.join(_user_runtime_dir(), "state")


def _user_runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/adapter-supervisor, or a per-uid directory in /tmp.

    The XDG spec says a relative XDG_RUNTIME_DIR is invalid and must be ignored.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return os.path.join(runtime, "adapter-supervisor")
    return f"/tmp/adapter-supervisor-{os.geteuid()}"


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The daemon-wide settings of the `[daemon]` table."""

    socket: str = msgspec.field(default_factory=default_socket_path)
    socket_mode: int = 0o660
    # The gid the socket file is given after bind (None: the daemon's own);
    # its members may connect, as if it were in allowed_gids.
    socket_group: int | None = None
    state_dir: str = msgspec.field(default_factory=default_state_dir)
    sweep_interval: float = 30.0
    max_connections: int = 1024
    max_message_bytes: int = 65536
    memory_budget: int | None = None
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    log_format: str = "auto"
    log_level: str = "info"
    # "auto": use a writable cgroup v2 hierarchy if one is found; "off": the
    # process-table fallback; or the absolute path of a cgroup v2 directory.
    cgroup: str = "auto"
    spawner: str = "auto"
    # Time slice the trio thread asks the kernel for, in microseconds (0: the
    # kernel's default; the kernel raises anything under 100 to 100); see
    # supervisor/procs/timeslice.py.
    latency_slice_us: int = 100
    # Bound of state_dir/reports.jsonl; one rotated generation is kept beside it.
    reports_max_bytes: int = 1024 * 1024
    # Where to keep a Prometheus text file for node_exporter (unset: none).
    metrics_textfile: str | None = None
    # A client that does not read what the daemon sends for this long is dropped.
    send_timeout: float = 10.0
    # After a crash, the bound leases of the previous incarnation wait this
    # long for their holders to `resume` them before they are released.
    resume_grace: float = 30.0


class _MessageSize(_Size):
    MINIMUM = MIN_MESSAGE_BYTES


class _ReportsSize(_Size):
    # Room for a few reports at least; below that rotation would discard the
    # report it was just given.
    MINIMUM = 4096


class _FileMode(int):
    """Permission bits as a string of octal digits ("0660") or an integer."""

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= MAX_SOCKET_MODE:
                return cls(value)
            raise ValueError(
                'expected octal permission bits such as "0660" (a bare integer is decimal:'
                f' write "0660" or 0o660), got {_show(value)}'
            )
        if not isinstance(value, str) or not re.fullmatch(r"(0o)?[0-7]{1,4}", value):
            raise ValueError(f'expected octal permission bits such as "0660", got {_show(value)}')
        mode = int(value.removeprefix("0o"), 8)
        if mode > MAX_SOCKET_MODE:
            raise ValueError(f'expected permission bits no higher than "0777", got {_show(value)}')
        return cls(mode)


class _Group(int):
    """A group by name (looked up on this host) or by gid."""

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value <= MAX_ID:
                return cls(value)
            raise ValueError(f"expected a gid from 0 to {MAX_ID}, got {_show(value)}")
        if not isinstance(value, str) or not value:
            raise ValueError(f'expected a group name such as "agents" or a gid, got {_show(value)}')
        try:
            return cls(grp.getgrnam(value).gr_gid)
        except KeyError:
            raise ValueError(
                "expected a group that exists on this host (create it with groupadd, or give its gid),"
                f" got {_show(value)}"
            ) from None


class _LogFormat(_Choice):
    CHOICES = LOG_FORMATS


class _LogLevel(_Choice):
    CHOICES = LOG_LEVELS


class _Spawner(_Choice):
    CHOICES = SPAWNERS


class _RawDaemon(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    socket: str | UnsetType = UNSET
    socket_mode: _FileMode | UnsetType = UNSET
    socket_group: _Group | UnsetType = UNSET
    state_dir: str | UnsetType = UNSET
    sweep_interval: Annotated[float, Meta(gt=0, le=MAX_SWEEP_INTERVAL)] | UnsetType = UNSET
    max_connections: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    max_message_bytes: _MessageSize | UnsetType = UNSET
    reports_max_bytes: _ReportsSize | UnsetType = UNSET
    metrics_textfile: str | UnsetType = UNSET
    send_timeout: Annotated[float, Meta(gt=0, le=3600)] | UnsetType = UNSET
    resume_grace: Annotated[float, Meta(ge=0, le=3600)] | UnsetType = UNSET
    memory_budget: _NonZeroSize | UnsetType = UNSET
    allowed_uids: tuple[_Id, ...] | UnsetType = UNSET
    allowed_gids: tuple[_Id, ...] | UnsetType = UNSET
    log_format: _LogFormat | UnsetType = UNSET
    log_level: _LogLevel | UnsetType = UNSET
    cgroup: str | UnsetType = UNSET
    spawner: _Spawner | UnsetType = UNSET
    latency_slice_us: Annotated[int, Meta(ge=0, le=100_000)] | UnsetType = UNSET


def _build_daemon(raw: _RawDaemon, path: str, base_dir: str) -> DaemonConfig:
    """The public DaemonConfig for `raw`, after the checks a schema cannot express."""
    fields = _given_fields(raw)
    for name in ("socket", "state_dir", "metrics_textfile"):
        if name in fields:
            fields[name] = _resolve_path(fields[name], base_dir, path, ("daemon", name))
    cgroup = fields.get("cgroup", "auto")
    if cgroup not in ("auto", "off") and not os.path.isabs(cgroup):
        raise ConfigError(
            path, "daemon.cgroup", f'expected "auto", "off" or an absolute path, got {_show(cgroup)}'
        )
    daemon = DaemonConfig(**fields)
    length = len(os.fsencode(daemon.socket))
    if length > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            path,
            "daemon.socket",
            f"expected a path of at most {MAX_SOCKET_PATH_BYTES} bytes (the Unix socket limit),"
            f" got {length} bytes: {_show(daemon.socket)}",
        )
    return daemon
