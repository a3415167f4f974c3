"""The config document and its TOML loader (docs/configuration.md): the public
face of the config schema.

`load_config` and `parse_config` turn a TOML document into frozen `Config` values or
raise `ConfigError` naming the file, the key path and what was expected; nothing else
escapes them. `check_config` and `check_config_file` report every error of a
document instead of the first. msgspec checks the shape against private "raw" structs whose special
scalars (sizes, signals, file modes, choices) are small custom types decoded by
`_dec_hook`; the loader then checks what a schema cannot express (command templates,
environment names, path limits) and builds the public structs, whose defaults are the
only defaults.

The schema is split by what it describes: one adapter in `adapterconfig.py`,
the daemon's settings in `daemonconfig.py`, the scalar types and the helpers
that build structs in `configvalues.py`, and the error messages in
`configerrors.py`. The names of each are re-exported here, where the rest
of the package and its users import them.
"""

from __future__ import annotations

import os
import pathlib
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from supervisor.core.adapterconfig import (
    ADAPTER_NAME,
    ENV_NAME,
    MAX_LINGER,
    MAX_PIDS_LIMIT,
    MAX_STOP_TIMEOUT,
    RESERVED_ENV_PREFIX,
    STDIO_MODES,
    AdapterConfig,
    _build_adapter,
    _RawAdapter,
)
from supervisor.core.configerrors import _format_key, _show, _toml_error, _validation_error
from supervisor.core.configvalues import (
    BYTES_UNITS,
    MAX_ID,
    NON_TERMINATING_SIGNALS,
    _dec_hook,
    parse_signal,
    parse_size,
)
from supervisor.core.daemonconfig import (
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_SOCKET_MODE,
    MAX_SOCKET_PATH_BYTES,
    MAX_SWEEP_INTERVAL,
    MIN_MESSAGE_BYTES,
    SPAWNERS,
    DaemonConfig,
    _build_daemon,
    _RawDaemon,
    default_socket_path,
    default_state_dir,
)
from supervisor.core.errors import ConfigError

__all__ = [
    "ADAPTER_NAME", "BYTES_UNITS", "ENV_NAME", "LOG_FORMATS", "LOG_LEVELS", "MAX_ID", "MAX_LINGER",
    "MAX_PIDS_LIMIT", "MAX_SOCKET_MODE", "MAX_SOCKET_PATH_BYTES", "MAX_STOP_TIMEOUT", "MAX_SWEEP_INTERVAL",
    "MIN_MESSAGE_BYTES", "NON_TERMINATING_SIGNALS", "RESERVED_ENV_PREFIX", "SPAWNERS", "STDIO_MODES",
    "AdapterConfig", "Config", "ConfigCheck", "ConfigError", "ConfigWarning", "DaemonConfig",
    "bundled_config_path", "check_config", "check_config_file", "default_socket_path", "default_state_dir",
    "load_config", "parse_config", "parse_signal", "parse_size",
]

_STRING_PATH = "<string>"


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


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """A whole validated configuration and the file it came from."""

    path: str
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    adapters: dict[str, AdapterConfig] = {}


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


def _convert(data: Any, type_: type[Any], path: str, prefix: tuple[str, ...]) -> Any:
    """msgspec.convert, with a ValidationError turned into a ConfigError."""
    try:
        return msgspec.convert(data, type_, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _validation_error(str(exc), data, type_, path, prefix) from None
