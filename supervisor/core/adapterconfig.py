"""The schema of one adapter (an `[adapters.NAME]` table): `AdapterConfig`,
the template of the process tree the daemon runs per job, and how a table of
the document becomes one (its command template, environment, user and
limits checked beyond what a schema can say)."""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from typing import Annotated, Any, Self

import msgspec
from msgspec import UNSET, Meta, UnsetType

from supervisor.core import identity
from supervisor.core.configerrors import _format_key, _show
from supervisor.core.configvalues import (
    _Choice,
    _Id,
    _given_fields,
    _NonZeroSize,
    _resolve_path,
    _StopSignal,
    parse_size,
)
from supervisor.core.errors import ConfigError
from supervisor.core.template import (
    PARAM_NAME,
    Placeholder,
    parse_template,
    render,
)

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
# Linger is bounded at a day so that `inf` (valid TOML) cannot disable
# stopping, which is what the daemon exists to do.
MAX_LINGER = 86400.0
# The kernel's PID_MAX_LIMIT: no tree can hold more processes than this, so a
# larger max_pids is a typo, not a wish.
MAX_PIDS_LIMIT = 4_194_304
# The accepted words of `stdio`, for the modules that act on them.
STDIO_MODES = ("pipe", "null")


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


class _Stdio(_Choice):
    CHOICES = STDIO_MODES


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
