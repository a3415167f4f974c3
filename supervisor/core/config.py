"""The configuration schema and its TOML loader (docs/configuration.md).

`load_config` and `parse_config` turn a TOML document into frozen `Config` values or
raise `ConfigError` naming the file, the key path and what was expected; nothing else
escapes them. `check_config` and `check_config_file` report every error of a
document instead of the first. msgspec checks the shape against private "raw" structs whose special
scalars (sizes, signals, file modes, choices) are small custom types decoded by
`_dec_hook`; the loader then checks what a schema cannot express (command templates,
environment names, path limits) and builds the public structs, whose defaults are the
only defaults.
"""

from __future__ import annotations

import grp
import json
import os
import pathlib
import re
import signal
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any, Self

import msgspec
from msgspec import UNSET, Meta, UnsetType

from supervisor.core import identity
from supervisor.core.errors import ConfigError
from supervisor.core.template import (
    PARAM_NAME,
    Placeholder,
    parse_template,
    render,
)

# Size suffixes. SI and IEC units mean what they say; the bare letters follow systemd
# (MemoryMax=512M is 512 MiB), the convention an operator of a Linux host knows.
# Matching ignores case, so "512mib" and "512MiB" are the same size.
BYTES_UNITS: dict[str, int] = {
    "": 1, "B": 1,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
_UNITS_BY_LOWER = {unit.lower(): factor for unit, factor in BYTES_UNITS.items()}
_SIZE_TEXT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")

# Adapter names appear in instance ids, logs and CLI arguments: keep them to
# characters that need no quoting anywhere, and short enough to read.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The portable POSIX environment name: every shell and runtime can read it back.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The daemon tags every process with variables under this prefix (how it proves
# a process is its own); a
# config that set them could make the daemon lose track of, or claim, a tree.
RESERVED_ENV_PREFIX = "ADAPTER_SUPERVISOR_"

# An adapter that needs more than an hour to stop is hung; waiting longer only
# delays the SIGKILL that will end it anyway.
MAX_STOP_TIMEOUT = 3600.0
# Linger and sweep interval are bounded at a day so that `inf` (valid TOML) cannot
# disable stopping or sweeping, which is what the daemon exists to do.
MAX_LINGER = 86400.0
MAX_SWEEP_INTERVAL = 86400.0
# The kernel's PID_MAX_LIMIT: no tree can hold more processes than this, so a
# larger max_pids is a typo, not a wish.
MAX_PIDS_LIMIT = 4_194_304
# A JSON-RPC acquire with a few parameters needs a few hundred bytes; below 1 KiB
# ordinary requests would be refused.
MIN_MESSAGE_BYTES = 1024
# sun_path in struct sockaddr_un is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# Permission bits only: setuid, setgid and sticky mean nothing on a socket file.
MAX_SOCKET_MODE = 0o777
# uid_t is 32 bits and (uid_t)-1 means "no change" to chown, so it is no one's id.
MAX_ID = 2**32 - 2
# Signals whose default action neither terminates nor kills: as a stop signal they
# would only make every stop wait out stop_timeout.
NON_TERMINATING_SIGNALS = frozenset(
    {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
    | {signal.SIGCONT, signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH}
)
# The accepted words of the enumerated settings, for the modules that act on them.
STDIO_MODES = ("pipe", "null")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
# How roots are started: "auto" uses the clone3 spawner when it was built (and
# the kernel allows clone3), else subprocess; "subprocess" always uses subprocess.
SPAWNERS = ("auto", "subprocess")
# Longest value shown back in an error message; a pasted blob must not flood a log.
_SHOW_LIMIT = 60

_SYSTEM_RUNTIME_DIR = "/run/adapter-supervisor"
_SYSTEM_STATE_DIR = "/var/lib/adapter-supervisor"
_SOCKET_NAME = "control.sock"
_STRING_PATH = "<string>"


def parse_size(value: str | int) -> int:
    """Return the number of bytes `value` denotes: an int, or text like "1.5GiB".

    A bare number is bytes and must be whole; a fraction with a unit is rounded down.
    Raises ValueError (saying what was expected) for negative numbers, booleans,
    unknown units and anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value}")
        return value
    expected = 'expected a size such as "512MiB" or "1GiB"'
    match = _SIZE_TEXT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{expected}, got {_show(value)}")
    number, unit = match.groups()
    factor = _UNITS_BY_LOWER.get(unit.lower())
    if factor is None:
        units = ", ".join(unit for unit in BYTES_UNITS if unit)
        raise ValueError(f"{expected} (units: {units}), got {_show(value)}")
    if factor == 1 and "." in number:
        raise ValueError(f"expected a whole number of bytes, got {_show(value)}")
    return int(Decimal(number) * factor)


def parse_signal(value: str | int) -> signal.Signals:
    """Return the signal named or numbered by `value`: "SIGTERM", "term", 15 or "15".

    Raises ValueError (saying what was expected) for anything that is not a signal
    of this platform.
    """
    expected = 'expected a signal such as "SIGTERM", "TERM" or 15'
    if isinstance(value, str) and value.strip().isdigit():
        number: object = int(value.strip())
    else:
        number = value
    if isinstance(number, int) and not isinstance(number, bool):
        try:
            return signal.Signals(number)
        except ValueError:
            raise ValueError(f"{expected}, got {_show(value)}") from None
    if isinstance(number, str):
        name = number.strip().upper()
        try:
            return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except KeyError:
            pass
    raise ValueError(f"{expected}, got {_show(value)}")


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


def bundled_config_path() -> pathlib.Path:
    """The config that `serve` uses without --config.

    In a checkout or editable install that is <repo>/config/supervisor.toml; in an
    installed wheel, the copy packaged as supervisor/_bundled/supervisor.toml. The
    path is returned whether or not the file exists; load_config reports a missing one.
    """
    package = pathlib.Path(__file__).resolve().parent.parent
    checkout = package.parent
    in_checkout = checkout / "config" / "supervisor.toml"
    if (checkout / "pyproject.toml").is_file() and in_checkout.is_file():
        return in_checkout
    return package / "_bundled" / "supervisor.toml"


class AdapterConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One adapter: the template of the process tree the daemon runs per job."""

    name: str
    command: tuple[str, ...]
    params: tuple[str, ...] = ()
    env: dict[str, str] = {}
    cwd: str | None = None
    stdio: str = "null"
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 5.0
    linger: float = 0.0
    max_instances: int = 64
    memory_limit: int | None = None
    # Processes (not threads) in the tree; more and the tree is stopped with
    # reason pids_limit. None (0 in the file): no limit.
    max_pids: int | None = 512
    # -- who the tree runs as and what bounds it (docs/configuration.md) --
    # `user` as written (a name, a uid, or "@peer"); None: the daemon's own.
    user: str | None = None
    # Resolved at load (a reload resolves again); None with "@peer" (resolved
    # per acquire) or without `user`.
    credentials: identity.Credentials | None = None
    umask: int | None = None
    limits: tuple[identity.Limit, ...] = ()
    no_new_privileges: bool = True

    @property
    def runs_as_peer(self) -> bool:
        """Whether each instance runs as the client that acquired it."""
        return self.user == identity.PEER

    def child_setup(self, peer: identity.Credentials | None = None) -> identity.ChildSetup:
        """What the child applies before exec; `peer` is who acquired the
        instance (used with `user = "@peer"` only)."""
        credentials = peer if self.runs_as_peer else self.credentials
        return identity.ChildSetup(credentials, self.umask, self.limits, self.no_new_privileges)

    def render_argv(self, job: str, params: Mapping[str, str]) -> list[str]:
        """The argv for `job`: each `{job}` and `{param:NAME}` replaced in place.

        No shell is involved: a value stays inside the one element that names it,
        whatever spaces, quotes or semicolons it holds. Raises InvalidParams for a
        param this adapter does not declare (used or not), a declared param the
        command uses but `params` lacks, or a job or value that is not a non-empty
        string of at most MAX_PARAM_CHARS characters free of control characters.
        Raises ValueError if `command` is not a valid template, which only an
        AdapterConfig built by hand rather than by the loader can be.
        """
        return render(self.command, job, params, adapter=self.name, declared=self.params)


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


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """A whole validated configuration and the file it came from."""

    path: str
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    adapters: dict[str, AdapterConfig] = {}


# The raw schema. Each custom scalar type decodes itself in `from_toml`, raising
# ValueError with an "expected ..., got ..." message that msgspec places at its path.


class _Size(int):
    """A byte count written as an integer or a size string."""

    MINIMUM = 0

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        size = parse_size(value)
        if size < cls.MINIMUM:
            least = "1 byte" if cls.MINIMUM == 1 else f"{cls.MINIMUM} bytes"
            raise ValueError(f"expected a size of at least {least}, got {_show(value)}")
        return cls(size)


class _NonZeroSize(_Size):
    MINIMUM = 1


class _MessageSize(_Size):
    MINIMUM = MIN_MESSAGE_BYTES


class _ReportsSize(_Size):
    # Room for a few reports at least; below that rotation would discard the
    # report it was just given.
    MINIMUM = 4096


class _StopSignal(int):
    """A signal that ends a process by default, by name or number."""

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        sig = parse_signal(value)
        if sig in NON_TERMINATING_SIGNALS:
            raise ValueError(f"expected a signal that ends a process, got {sig.name}")
        return cls(sig)


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


class _Choice(str):
    """One of a fixed set of words."""

    CHOICES: tuple[str, ...] = ()

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        if isinstance(value, str) and value in cls.CHOICES:
            return cls(value)
        choices = ", ".join(json.dumps(choice) for choice in cls.CHOICES)
        raise ValueError(f"expected one of {choices}, got {_show(value)}")


class _Stdio(_Choice):
    CHOICES = STDIO_MODES


class _LogFormat(_Choice):
    CHOICES = LOG_FORMATS


class _LogLevel(_Choice):
    CHOICES = LOG_LEVELS


class _Spawner(_Choice):
    CHOICES = SPAWNERS


class _Umask(int):
    """A umask as a string of octal digits ("0077")."""

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        if isinstance(value, str) and re.fullmatch(r"(0o)?[0-7]{1,4}", value):
            mask = int(value.removeprefix("0o"), 8)
            if mask <= 0o777:
                return cls(mask)
        raise ValueError(f'expected an octal umask from "0000" to "0777" such as "0077", got {_show(value)}')


class _ParamName(str):
    """A name a client may fill in."""

    @classmethod
    def from_toml(cls, value: Any) -> Self:
        if isinstance(value, str) and PARAM_NAME.fullmatch(value):
            return cls(value)
        raise ValueError(
            'expected a param name (a letter or "_", then letters, digits or "_"),'
            f" got {_show(value)}"
        )


def _dec_hook(type_: type, value: Any) -> Any:
    """msgspec's hook for the custom scalar types above."""
    from_toml = getattr(type_, "from_toml", None)
    if from_toml is None:
        raise NotImplementedError(f"no TOML decoding for {type_!r}")
    return from_toml(value)


_Id = Annotated[int, Meta(ge=0, le=MAX_ID)]


class _RawAdapter(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    command: Annotated[tuple[str, ...], Meta(min_length=1)]
    params: tuple[_ParamName, ...] | UnsetType = UNSET
    env: dict[str, str] | UnsetType = UNSET
    cwd: str | UnsetType = UNSET
    stdio: _Stdio | UnsetType = UNSET
    stop_signal: _StopSignal | UnsetType = UNSET
    stop_timeout: Annotated[float, Meta(gt=0, le=MAX_STOP_TIMEOUT)] | UnsetType = UNSET
    linger: Annotated[float, Meta(ge=0, le=MAX_LINGER)] | UnsetType = UNSET
    max_instances: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    memory_limit: _NonZeroSize | UnsetType = UNSET
    max_pids: Annotated[int, Meta(ge=0, le=MAX_PIDS_LIMIT)] | UnsetType = UNSET
    # Resolved by `_build_identity`.
    user: str | _Id | UnsetType = UNSET
    group: str | _Id | UnsetType = UNSET
    umask: _Umask | UnsetType = UNSET
    limits: dict[str, Any] | UnsetType = UNSET
    no_new_privileges: bool | UnsetType = UNSET


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


class _RawConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Each table is converted on its own in `check_config`, and each adapter
    # too, so that an error can name the adapter (msgspec reports a dict
    # value's path as `[...]`) and every table's errors are found, not only
    # the first error of the document.
    daemon: dict[str, Any] = {}
    adapters: dict[str, Any] = {}


@dataclass(frozen=True)
class ConfigWarning:
    """Something in a config that works but probably not as meant (e.g. an
    adapter command whose program is missing): reported, never refused."""

    path: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.key}: {self.message}"


@dataclass(frozen=True)
class ConfigCheck:
    """What `check_config` found: the config, if it is valid, else every error."""

    path: str
    config: Config | None
    errors: list[ConfigError]


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at `path`.

    `Config.path` is the absolute path. Raises ConfigError, and nothing else, when
    the file cannot be read, is not UTF-8 or is not a valid config (the first
    error `check_config_file` would report).
    """
    return _valid(check_config_file(path))


def parse_config(text: str, path: str = _STRING_PATH) -> Config:
    """Validate the TOML document `text`, reporting errors against `path`.

    Relative paths in the document are resolved against the directory of `path`,
    or against the current directory when `path` is "<string>". Raises
    ConfigError (the first error `check_config` would report).
    """
    return _valid(check_config(text, path))


def _valid(checked: ConfigCheck) -> Config:
    if checked.config is None:
        raise checked.errors[0]
    return checked.config


def check_config_file(path: str | os.PathLike[str]) -> ConfigCheck:
    """`check_config` of the file at `path` (made absolute). A file that cannot
    be read or is not UTF-8 is one error. Raises nothing."""
    absolute = os.path.abspath(os.fspath(path))
    try:
        with open(absolute, "rb") as file:
            content = file.read()
    except OSError as exc:
        return ConfigCheck(absolute, None, [ConfigError(absolute, "", f"cannot read the file: {exc.strerror or exc}")])
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ConfigCheck(absolute, None, [ConfigError(absolute, f"byte {exc.start}", "expected UTF-8 text")])
    return check_config(text, absolute)


def check_config(text: str, path: str = _STRING_PATH, *, daemon_ids: tuple[int, int] | None = None) -> ConfigCheck:
    """Validate the TOML document `text` (see `parse_config`) and collect every
    error: a TOML syntax error is the only one reported (nothing after it can
    be read); otherwise each key of each table is checked on its own (the
    top level's, then the daemon's, then each adapter's), and each table as a
    whole once its keys are valid (the checks between keys: at most one
    error per table). `daemon_ids` are the (uid, gid) the daemon will run
    as (default: this process's effective ones), which decide what `user`
    and `group` it may name. Raises nothing."""
    if daemon_ids is None:
        daemon_ids = (os.geteuid(), os.getegid())
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return ConfigCheck(path, None, [_toml_error(exc, text, path)])
    base_dir = os.getcwd() if path == _STRING_PATH else os.path.dirname(os.path.abspath(path))
    errors = _key_errors(data, _RawConfig, path, ())
    daemon = None
    table = data.get("daemon", {})
    if isinstance(table, dict):
        daemon = _checked(errors, table, _RawDaemon, path, ("daemon",), lambda raw: _build_daemon(raw, path, base_dir))
    adapters = {}
    tables = data.get("adapters", {})
    for name, table in tables.items() if isinstance(tables, dict) else ():
        if not ADAPTER_NAME.fullmatch(name):
            errors.append(ConfigError(
                path,
                _format_key(("adapters", name)),
                "expected an adapter name of 1 to 64 letters, digits, '_', '.' or '-',"
                " starting with a letter or digit",
            ))
            continue
        if not isinstance(table, dict):
            errors.append(ConfigError(path, _format_key(("adapters", name)), f"expected a table, got {_show(table)}"))
            continue
        adapter = _checked(
            errors, table, _RawAdapter, path, ("adapters", name),
            lambda raw, name=name: _build_adapter(name, raw, path, base_dir, daemon_ids),  # type: ignore[misc]
        )
        if adapter is not None:
            adapters[name] = adapter
    if errors or daemon is None:
        return ConfigCheck(path, None, errors)
    return ConfigCheck(path, Config(path=path, daemon=daemon, adapters=adapters), [])


def _checked(
    errors: list[ConfigError],
    table: dict[str, Any],
    raw_type: type[Any],
    path: str,
    prefix: tuple[str, ...],
    build: Callable[[Any], Any],
) -> Any:
    """The public struct `build` makes of `table` once its keys are valid,
    or None with what is wrong added to `errors`."""
    found = _key_errors(table, raw_type, path, prefix)
    if found:
        errors.extend(found)
        return None
    try:
        return build(_convert(table, raw_type, path, prefix))
    except ConfigError as exc:
        errors.append(exc)
        return None


def _key_errors(table: dict[str, Any], raw_type: type[Any], path: str, prefix: tuple[str, ...]) -> list[ConfigError]:
    """Every key of `table` that is unknown to `raw_type` or whose value is
    wrong, and every required key it lacks: each key converted on its own."""
    fields = {field.name: field for field in msgspec.structs.fields(raw_type)}
    errors = []
    for key, value in table.items():
        field = fields.get(key)
        if field is None:
            errors.append(ConfigError(path, _format_key(prefix + (key,)), f"unknown key (allowed here: {', '.join(fields)})"))
            continue
        try:
            msgspec.convert(value, field.type, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            errors.append(_validation_error(str(exc), value, field.type, path, prefix + (key,)))
    for name, field in fields.items():
        if field.required and name not in table:
            errors.append(ConfigError(path, _format_key(prefix + (name,)), "missing required key"))
    return errors


def _build_adapter(
    name: str, raw: _RawAdapter, path: str, base_dir: str, daemon_ids: tuple[int, int]
) -> AdapterConfig:
    """The public AdapterConfig for `raw`, after the checks a schema cannot express."""
    prefix = ("adapters", name)
    fields = _given_fields(raw)
    params = fields.get("params", ())
    duplicates = sorted({param for param in params if params.count(param) > 1})
    if duplicates:
        raise ConfigError(path, _format_key(prefix + ("params",)), f'duplicate param "{duplicates[0]}"')
    command_key = _format_key(prefix + ("command",))
    for index, element in enumerate(raw.command):
        where = f"element {index} ({_show(element)})"
        if "\0" in element:
            raise ConfigError(path, command_key, f"{where}: expected no NUL character")
        try:
            pieces = parse_template(element)
        except ValueError as exc:
            raise ConfigError(path, command_key, f"{where}: {exc}") from None
        if index == 0 and (not element or any(isinstance(p, Placeholder) for p in pieces)):
            raise ConfigError(
                path, command_key, f"{where}: expected a fixed, non-empty program (no placeholders)"
            )
        for piece in pieces:
            if isinstance(piece, Placeholder) and piece.param is not None and piece.param not in params:
                raise ConfigError(
                    path, command_key, f'{where}: param "{piece.param}" is not declared in params'
                )
    for key, value in fields.get("env", {}).items():
        env_key = _format_key(prefix + ("env", key))
        if not ENV_NAME.fullmatch(key):
            raise ConfigError(path, env_key, "expected a variable name of letters, digits and '_'")
        if key.startswith(RESERVED_ENV_PREFIX):
            raise ConfigError(path, env_key, f"names starting with {RESERVED_ENV_PREFIX} are reserved")
        if "\0" in value:
            raise ConfigError(path, env_key, "expected a value without NUL characters")
    if "cwd" in fields:
        fields["cwd"] = _resolve_path(fields["cwd"], base_dir, path, prefix + ("cwd",))
    if fields.get("max_pids") == 0:
        fields["max_pids"] = None  # 0 turns the limit off (TOML has no null)
    fields.update(_build_identity(fields.pop("user", None), fields.pop("group", None), fields, path, prefix, daemon_ids))
    return AdapterConfig(name=name, **fields)


def _build_identity(
    user: str | int | None,
    group: str | int | None,
    fields: dict[str, Any],
    path: str,
    prefix: tuple[str, ...],
    daemon_ids: tuple[int, int],
) -> dict[str, Any]:
    """The identity fields of an adapter: `user` and `group` resolved to
    credentials, `limits` parsed. A daemon that is not root (its uid and gid
    are `daemon_ids`) may name only its own user and group. Raises ConfigError."""
    built: dict[str, Any] = {}
    daemon_uid, daemon_gid = daemon_ids
    if "limits" in fields:
        limits = []
        for name, value in fields["limits"].items():
            try:
                limits.append(identity.parse_limit(name, value, parse_size))
            except ValueError as exc:
                raise ConfigError(path, _format_key(prefix + ("limits", name)), str(exc)) from None
        built["limits"] = tuple(limits)
    if user is None:
        if group is not None:
            raise ConfigError(path, _format_key(prefix + ("group",)), "expected `user` beside it: a group applies to a user")
        return built
    user_key = _format_key(prefix + ("user",))
    built["user"] = str(user)
    if user == identity.PEER:
        if group is not None:
            raise ConfigError(
                path, _format_key(prefix + ("group",)),
                'expected no group with user = "@peer": the tree takes the acquiring client\'s gid',
            )
        return built
    if isinstance(user, str) and (not user or user.startswith("@")):
        raise ConfigError(path, user_key, f'expected a user name, a uid or "{identity.PEER}", got {_show(user)}')
    try:
        uid = identity.resolve_user(user)
    except ValueError as exc:
        raise ConfigError(path, user_key, str(exc)) from None
    gid = None
    if group is not None:
        try:
            gid = identity.resolve_group(group)
        except ValueError as exc:
            raise ConfigError(path, _format_key(prefix + ("group",)), str(exc)) from None
    try:
        credentials = identity.credentials_of(uid, gid)
    except ValueError as exc:
        raise ConfigError(path, user_key, str(exc)) from None
    if daemon_uid != 0:
        if credentials.uid != daemon_uid:
            raise ConfigError(
                path, user_key,
                f"expected the daemon's own user (uid {daemon_uid}): a daemon that is not root cannot"
                f" run adapters as another user, got {_show(user)} (uid {credentials.uid})",
            )
        if credentials.gid != daemon_gid:
            raise ConfigError(
                path, _format_key(prefix + ("group",) if group is not None else ("user",)),
                f"expected the daemon's own group (gid {daemon_gid}): a daemon that is not root cannot"
                f" run adapters in another group, got gid {credentials.gid}",
            )
    built["credentials"] = credentials
    return built


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


def _given_fields(raw: msgspec.Struct) -> dict[str, Any]:
    """The fields the document set, as plain values (custom scalars unwrapped)."""
    return {
        name: _plain(value)
        for name in raw.__struct_fields__
        if (value := getattr(raw, name)) is not UNSET
    }


def _plain(value: Any) -> Any:
    """`value` with the loader's custom scalar types turned into the public ones."""
    if isinstance(value, _StopSignal):
        return signal.Signals(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return value


def _resolve_path(value: str, base_dir: str, path: str, key: tuple[str, ...]) -> str:
    """`value` made absolute against `base_dir`; raises ConfigError if unusable."""
    if not value or "\0" in value:
        raise ConfigError(path, _format_key(key), f"expected a path, got {_show(value)}")
    if os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def _convert(data: Any, type_: type[Any], path: str, prefix: tuple[str, ...]) -> Any:
    """msgspec.convert, with a ValidationError turned into a ConfigError."""
    try:
        return msgspec.convert(data, type_, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc), data, type_, path, prefix) from None


_AT_PATH = re.compile(r"(?P<message>.*) - at `\$(?P<path>[^`]*)`", re.DOTALL)
_PATH_SEGMENT = re.compile(r"\.(\w+)|\[(\d+)\]|\[\.\.\.\]")
_EXPECTED_TYPE = re.compile(r"Expected `(\w+)`(?P<rest>.*?)(?:, got `(?P<got>\w+)`)?", re.DOTALL)
_FIELD_MESSAGE = re.compile(r"Object (?P<what>contains unknown|missing required) field `(?P<field>[^`]*)`")
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "array": "an array",
    "object": "a table",
    "datetime": "a date-time",
    "date": "a date",
    "time": "a time",
}


def _validation_error(
    message: str, data: Any, type_: type[Any], path: str, prefix: tuple[str, ...]
) -> ConfigError:
    """Translate one msgspec ValidationError message into a ConfigError."""
    match = _AT_PATH.fullmatch(message)
    text, where = (match["message"], match["path"]) if match else (message, "")
    segments: list[str | int] = []
    in_entry = False
    for segment in _PATH_SEGMENT.finditer(where):
        if segment[0] == "[...]":
            in_entry = True
            break
        segments.append(segment[1] if segment[1] is not None else int(segment[2]))
    field = _FIELD_MESSAGE.fullmatch(text)
    if field is not None:
        key = _format_key(prefix + tuple(segments) + (field["field"],))
        if field["what"] == "missing required":
            return ConfigError(path, key, "missing required key")
        known = ", ".join(_struct_at(type_, segments).__struct_fields__)
        return ConfigError(path, key, f"unknown key (allowed here: {known})")
    found, value = _value_at(data, segments) if not in_entry else (False, None)
    expected = _EXPECTED_TYPE.fullmatch(text)
    if expected is not None:
        rest = re.sub(r"-?\d+\.\d+", lambda number: f"{float(number[0]):g}", expected["rest"])
        got = _show(value) if found else _TYPE_WORDS.get(expected["got"] or "", expected["got"])
        text = f"expected {_TYPE_WORDS.get(expected[1], expected[1])}{rest}"
        text += f", got {got}" if got else ""
    if in_entry:
        text += " (in one of its entries)"
    return ConfigError(path, _format_key(prefix + tuple(segments)), text)


def _struct_at(type_: type[Any], names: list[str | int]) -> type[Any]:
    """The raw struct type reached from `type_` by following field `names`."""
    for name in names:
        type_ = next(field.type for field in msgspec.structs.fields(type_) if field.name == name)
    return type_


def _value_at(data: Any, segments: list[str | int]) -> tuple[bool, Any]:
    """(True, value) at `segments` inside the parsed TOML `data`, else (False, None)."""
    for segment in segments:
        if isinstance(segment, str) and isinstance(data, dict) and segment in data:
            data = data[segment]
        elif isinstance(segment, int) and isinstance(data, list) and segment < len(data):
            data = data[segment]
        else:
            return False, None
    return True, data


def _format_key(segments: tuple[str | int, ...]) -> str:
    """A dotted TOML key path; segments that are not bare keys are quoted."""
    key = ""
    for segment in segments:
        if isinstance(segment, int):
            key += f"[{segment}]"
        else:
            bare = re.fullmatch(r"[A-Za-z0-9_-]+", segment)
            key += ("." if key else "") + (segment if bare else json.dumps(segment))
    return key


def _toml_error(exc: tomllib.TOMLDecodeError, text: str, path: str) -> ConfigError:
    """A ConfigError naming the line of a TOML syntax error."""
    message = str(exc)
    position = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if position is not None:
        reason = message[: position.start()]
        return ConfigError(path, f"line {position[1]}", f"invalid TOML: {reason} (column {position[2]})")
    if message.endswith(" (at end of document)"):
        reason = message.removesuffix(" (at end of document)")
        last_line = len(text.rstrip().splitlines()) or 1
        return ConfigError(path, f"line {last_line}", f"invalid TOML: {reason} at the end of the file")
    return ConfigError(path, "", f"invalid TOML: {message}")


def _show(value: object) -> str:
    """`value` written the way TOML would, shortened to _SHOW_LIMIT characters."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array" if value else "an empty array"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."
