"""The control socket as a file and as the other end of a connection:
creating it with its mode and group (`bind_control_socket`), and reading who
is at the other end (SO_PEERCRED, SO_PEERGROUPS)."""

from __future__ import annotations

import array
import contextlib
import errno
import grp
import json
import os
import socket as stdlib_socket
import stat
import struct
from collections.abc import Iterator

import trio

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# SO_PEERGROUPS (Linux >= 4.13, <asm-generic/socket.h>): the peer's supplementary
# groups as of connect(). Python does not export the constant.
SO_PEERGROUPS = getattr(stdlib_socket, "SO_PEERGROUPS", 59)

# Room for this many supplementary groups: CPython's getsockopt takes at most
# 1024 bytes. A peer in more groups is judged by uid and primary gid only (the
# kernel answers ERANGE rather than a partial list).
MAX_PEER_GROUPS = 256


def _peer_groups(sock: trio.socket.SocketType) -> list[int]:
    """The peer's supplementary groups (empty where the kernel cannot tell)."""
    try:
        raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
    except OSError:
        return []
    return list(array.array("I", raw[: len(raw) - len(raw) % 4]))


class SocketGroupRefused(Exception):
    """The kernel refused to give the socket file to `socket_group`: the
    daemon is neither root nor a member of the group. The message says so
    and what to do."""


async def bind_control_socket(path: str, mode: int, group: int | None = None) -> trio.socket.SocketType:
    """Create, bind and listen on the control socket at `path` with `mode`,
    its file given to the gid `group` if one is named.

    A stale socket file (nobody answers on it) is replaced; a live one raises
    `OSError(EADDRINUSE)`, since two daemons must never share a socket. Raises
    SocketGroupRefused (having removed the file it bound) if the daemon may
    not give the file to `group`. Clients can connect only once the file has
    its group and mode: the socket listens last.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            listener_pid = _UCRED.unpack(probe.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _UCRED.size))[0]
            raise OSError(
                errno.EADDRINUSE, f"another daemon is already serving on {path} (its socket was opened by pid {listener_pid})"
            )
        finally:
            probe.close()
    plain = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    # No window in which the socket file is more open than `mode` allows.
    # The bind is synchronous: no other task runs under the borrowed umask
    # and egid.
    old_umask = os.umask(0o777 & ~mode)
    try:
        with _creating_as_group(group):
            plain.bind(path)
    except BaseException:
        plain.close()
        raise
    finally:
        os.umask(old_umask)
    sock = trio.socket.from_stdlib_socket(plain)
    await trio.lowlevel.checkpoint()
    if group is not None and os.stat(path).st_gid != group:
        try:
            os.chown(path, -1, group)
        except PermissionError:
            sock.close()
            os.unlink(path)
            raise SocketGroupRefused(
                f"daemon.socket_group: the daemon (uid {os.geteuid()}) may not give {path} to group "
                f"{_group_label(group)}: only root or a member of the group may; add the daemon's user "
                "to the group (then restart its session or service), or leave socket_group unset"
            ) from None
    os.chmod(path, mode)
    sock.listen(stdlib_socket.SOMAXCONN)
    return sock


@contextlib.contextmanager
def _creating_as_group(group: int | None) -> Iterator[None]:
    """Files created inside get `group` where the daemon may take it as its
    effective gid (root with CAP_SETGID), so that root needs no CAP_CHOWN
    to give the socket file to socket_group; elsewhere nothing changes and
    the caller falls back to chown. The egid is restored on the way out."""
    own = os.getegid()
    if group is None or group == own:
        yield
        return
    try:
        os.setegid(group)
    except PermissionError:
        yield
        return
    try:
        yield
    finally:
        os.setegid(own)


def _group_label(gid: int) -> str:
    """`"agents" (gid 4242)`, or `gid 4242` for a gid without a name."""
    try:
        return f"{json.dumps(grp.getgrgid(gid).gr_name)} (gid {gid})"
    except KeyError:
        return f"gid {gid}"
