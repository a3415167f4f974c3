"""Who an adapter's tree runs as, and the limits it runs under.

The values here are what the config loader resolves (`user`, `group`, `umask`,
`limits`, `no_new_privileges` of an adapter) and what both spawners apply in
the child before exec (`ChildSetup`). Resolving a user or group reads the
host's user and group databases (as `grp` lookups of the loader already do);
nothing here starts a process or keeps state.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import resource
from collections.abc import Mapping
from typing import Any

import msgspec

# The `user` value that runs each instance as the client that acquired it.
PEER = "@peer"

# The resource limits an adapter may set, by the name `ulimit`, systemd
# (LimitNOFILE=) and prlimit(1) use, without the RLIMIT_ prefix. Those missing
# from this platform's `resource` module are left out.
LIMIT_NAMES: dict[str, int] = {
    name: getattr(resource, "RLIMIT_" + name.upper())
    for name in (
        "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue",
        "nice", "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack",
    )
    if hasattr(resource, "RLIMIT_" + name.upper())
}  # fmt: skip
# The limits counted in bytes, which also take a size such as "512MiB".
SIZE_LIMITS = frozenset({"as", "core", "data", "fsize", "memlock", "msgqueue", "rss", "stack"})
# What `limits = { core = "unlimited" }` sets.
UNLIMITED = "unlimited"
# The largest finite limit: rlim_t is 64 bits and its all-ones value means
# "unlimited" (RLIM_INFINITY).
MAX_LIMIT = 2**64 - 2

# Environment variables that follow the user an adapter runs as (as login(1),
# su(1) and systemd's User= set them), unless the adapter's `env` sets them.
USER_ENV = ("HOME", "USER", "LOGNAME")
# HOME of a uid without a passwd entry: systemd's choice for the same case.
HOMELESS = "/"

_NUMBER = re.compile(r"[0-9]+")


class Credentials(msgspec.Struct, frozen=True):
    """The ids a tree runs as, and the passwd name and home behind them
    (None for a uid without a passwd entry)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None = None
    home: str | None = None

    def environment(self) -> dict[str, str]:
        """HOME, USER and LOGNAME for these credentials: from the passwd
        entry; for a uid without one, HOME is "/" and USER and LOGNAME are
        the uid in decimal (what systemd does for such a User=)."""
        name = self.name if self.name is not None else str(self.uid)
        return {"HOME": self.home or HOMELESS, "USER": name, "LOGNAME": name}


def credentials_of(uid: int, gid: int | None = None) -> Credentials:
    """The credentials of `uid` as a login would give them: primary gid `gid`
    (default: the passwd entry's), plus the supplementary groups the group
    database gives the user (initgroups). A uid without a passwd entry gets
    `gid` alone (raises ValueError if `gid` is None: no group to give it)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        if gid is None:
            raise ValueError(f"uid {uid} has no passwd entry, so it has no group: name one (group = ...)") from None
        return Credentials(uid=uid, gid=gid, groups=(gid,))
    primary = entry.pw_gid if gid is None else gid
    groups = tuple(dict.fromkeys([primary, *os.getgrouplist(entry.pw_name, primary)]))
    return Credentials(uid=uid, gid=primary, groups=groups, name=entry.pw_name, home=entry.pw_dir)


def resolve_user(value: str | int) -> int:
    """The uid of a user name or a uid (an int or a decimal string). Raises
    ValueError (saying what was expected) for a name this host does not know."""
    if isinstance(value, int) or _NUMBER.fullmatch(value):
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError(
            f"expected a user that exists on this host (create it with useradd, or give its uid), got {_show(value)}"
        ) from None


def resolve_group(value: str | int) -> int:
    """The gid of a group name or a gid (an int or a decimal string). Raises
    ValueError for a name this host does not know."""
    if isinstance(value, int) or _NUMBER.fullmatch(value):
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(
            f"expected a group that exists on this host (create it with groupadd, or give its gid), got {_show(value)}"
        ) from None


class Limit(msgspec.Struct, frozen=True, gc=False):
    """One resource limit, soft and hard alike (see docs/configuration.md)."""

    name: str
    resource: int
    # RLIM_INFINITY for "unlimited".
    value: int


def parse_limit(name: str, value: Any, parse_size: Any) -> Limit:
    """The limit `name = value` of an adapter's `limits` table: a
    non-negative integer, "unlimited", or for the byte limits a size
    (`parse_size`). Raises ValueError saying what was expected."""
    if name not in LIMIT_NAMES:
        raise ValueError(f"expected one of the limits {', '.join(sorted(LIMIT_NAMES))}")
    if value == UNLIMITED:
        return Limit(name, LIMIT_NAMES[name], resource.RLIM_INFINITY)
    sizes = name in SIZE_LIMITS
    expected = (
        f'expected a whole number, a size such as "512MiB", or "{UNLIMITED}"' if sizes
        else f'expected a whole number or "{UNLIMITED}"'
    )
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{expected}, got {_show(value)}")
    if isinstance(value, str) and not sizes:
        raise ValueError(f"{expected}, got {_show(value)}")
    try:
        number = parse_size(value)
    except ValueError:
        raise ValueError(f"{expected}, got {_show(value)}") from None
    if number > MAX_LIMIT:
        raise ValueError(f'expected at most {MAX_LIMIT} (or "{UNLIMITED}"), got {_show(value)}')
    return Limit(name, LIMIT_NAMES[name], number)


class ChildSetup(msgspec.Struct, frozen=True):
    """What the child applies before exec, in this order: the limits, the
    umask, no_new_privs, then (with `credentials`) the supplementary groups,
    the gid, and the uid last."""

    credentials: Credentials | None = None
    umask: int | None = None
    limits: tuple[Limit, ...] = ()
    no_new_privs: bool = True


def user_environment(env: Mapping[str, str], credentials: Credentials, adapter_env: Mapping[str, str]) -> dict[str, str]:
    """`env` with HOME, USER and LOGNAME following `credentials`, except
    those the adapter's own `env` sets."""
    changed = dict(env)
    for key, value in credentials.environment().items():
        if key not in adapter_env:
            changed[key] = value
    return changed


def _show(value: object) -> str:
    """`value` as TOML would write it, for an error message."""
    return json.dumps(value) if isinstance(value, (str, bool)) else str(value)
