"""Directories only the daemon's uid may change: its state_dir, and the
directory of its socket.

The state_dir holds lease tokens and names processes the next start will
adopt or kill; the socket's directory decides who answers the clients. A
local user who could create, replace or write into either (a directory
pre-created in /tmp, a symlink to somewhere else) could make the daemon
write into files of their choosing, signal processes it did not start, or
take its clients. So the daemon starts only if:

* the directory itself belongs to the daemon's uid, is a directory and not a
  symlink, and nobody else may write to it (no group or other write bit);
* every directory above it belongs to root or to the daemon's uid, and is
  not writable by others unless it is a sticky directory owned by root (as
  /tmp is: others may add entries there, but not replace ours).

A missing directory, and each missing directory above it, is created with
the mode given (0700 for the state_dir and a per-user runtime directory).
Blocking: call from a worker thread or before the event loop runs.
"""

from __future__ import annotations

import os
import stat

ROOT_UID = 0


class UnsafeDirectory(Exception):
    """A directory the daemon must not use; the message names it and says why."""


def ensure_private_dir(path: str, *, mode: int = 0o700) -> None:
    """Create `path` and any missing directory above it with `mode`, then
    check that it is safe to use (module docstring). Raises UnsafeDirectory,
    or OSError if it cannot be created."""
    path = os.path.abspath(path)
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    if missing:
        # Nothing is made below a directory someone else controls.
        _check_ancestors(probe, os.geteuid())
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue  # made meanwhile: checked below like any other
        os.chmod(directory, mode)  # whatever the umask took away
    check_private_dir(path)


def check_private_dir(path: str, *, uid: int | None = None) -> None:
    """Raise UnsafeDirectory unless `path` is safe for the daemon of `uid`
    (default: this process's effective uid) to keep its state in."""
    uid = os.geteuid() if uid is None else uid
    path = os.path.abspath(path)
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise UnsafeDirectory(f"{path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDirectory(f"{path} is a symlink; the daemon uses only a real directory there")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    if info.st_uid != uid:
        raise UnsafeDirectory(f"{path} belongs to uid {info.st_uid}, not to the daemon's uid {uid}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(
            f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
            "make it 0700 or 0755, owned by the daemon's uid"
        )
    _check_ancestors(os.path.dirname(path), uid)


def _check_ancestors(path: str, uid: int) -> None:
    while True:
        try:
            link = os.lstat(path)
            # A symlink above is fine if it is root's or ours (nobody else
            # can point it elsewhere) and its target is fine.
            info = os.stat(path) if stat.S_ISLNK(link.st_mode) else link
        except OSError as exc:
            raise UnsafeDirectory(f"{path}: {exc.strerror}") from None
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (ROOT_UID, uid):
            raise UnsafeDirectory(f"{path} is a symlink of uid {link.st_uid}, who could point it elsewhere")
        if info.st_uid not in (ROOT_UID, uid):
            raise UnsafeDirectory(
                f"{path} belongs to uid {info.st_uid}: it could replace what the daemon keeps below it"
            )
        writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable_by_others and not (info.st_mode & stat.S_ISVTX and info.st_uid == ROOT_UID):
            raise UnsafeDirectory(
                f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):04o}) without the sticky bit: "
                "anyone could replace what the daemon keeps below it"
            )
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
