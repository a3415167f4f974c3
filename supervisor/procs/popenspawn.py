"""Spawning a root with `subprocess.Popen`: the fallback where the clone3
spawner is not built or the kernel refuses it (and `spawner = "subprocess"`).

The child joins the instance's cgroup and takes the adapter's `ChildSetup`
in a preexec, between fork and exec, in the order the clone3 child takes
it. Popen's own `user=`, `group=` and `extra_groups=` are not used: its
preexec runs after them, when a root daemon's child could no longer raise a
hard limit for the user it became, and a failing step would come back as
Popen's bare "Exception occurred in preexec_fn". A step that fails writes
what failed to a pipe instead, and Popen's error becomes a
`clonespawn.SetupFailed` saying it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import subprocess
from collections.abc import Callable

from supervisor.core.identity import ChildSetup
from supervisor.procs import clonespawn


def nothing_to_do(setup: ChildSetup) -> bool:
    """Whether `setup` leaves the child as the daemon made it."""
    switches_ids = setup.credentials is not None and may_switch_ids()
    return not (switches_ids or setup.umask is not None or setup.limits or setup.no_new_privs)


def may_switch_ids() -> bool:
    """Whether a child may change its ids: only a root daemon's. Any other
    runs adapters as itself (the config allows it no other user)."""
    return os.geteuid() == 0


# prctl(2), called in the forked child: loaded now, since loading a library
# after fork in a threaded process may deadlock.
_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS = 38
# The longest message a child's setup reports: one pipe write, under PIPE_BUF.
_SETUP_REPORT_BYTES = 512


def popen(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    stdio: tuple[int, int, int],
    cgroup_procs_fd: int | None,
    setup: ChildSetup,
) -> subprocess.Popen[bytes]:
    """Popen with a preexec that joins the cgroup and applies `setup` in the
    order the clone3 child does (limits, umask, no_new_privs, groups, gid,
    uid), after chdir and before exec. Raises clonespawn.SetupFailed naming
    the step that failed, or what Popen raises."""
    if cgroup_procs_fd is None and nothing_to_do(setup):
        # Without a preexec Popen may use vfork: no copy of the daemon's page tables.
        return _start(argv, env=env, cwd=cwd, stdio=stdio, preexec=None)
    switch_ids = may_switch_ids() and setup.credentials is not None
    report_r, report_w = os.pipe2(os.O_CLOEXEC)

    def preexec() -> None:
        # Runs in the child between fork and exec.
        call = "joining the cgroup"
        try:
            if cgroup_procs_fd is not None:
                # Joined first, so that everything it will ever fork is born inside.
                os.write(cgroup_procs_fd, b"0")
            for limit in setup.limits:
                call = f"setrlimit(RLIMIT_{limit.name.upper()}, {'unlimited' if limit.value < 0 else limit.value})"
                resource.setrlimit(limit.resource, (limit.value, limit.value))
            if setup.umask is not None:
                os.umask(setup.umask)
            if setup.no_new_privs:
                call = "prctl(PR_SET_NO_NEW_PRIVS)"
                if _LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            if switch_ids and setup.credentials is not None:
                ids = setup.credentials
                call = f"setgroups({list(ids.groups)})"
                os.setgroups(list(ids.groups))
                call = f"setgid({ids.gid})"
                os.setresgid(ids.gid, ids.gid, ids.gid)
                call = f"setuid({ids.uid})"
                os.setresuid(ids.uid, ids.uid, ids.uid)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError):
                error = exc.errno or errno.EPERM
            else:
                # resource.setrlimit turns EPERM and EINVAL into ValueError.
                error = errno.EPERM if "not allowed" in str(exc) else errno.EINVAL
            message = f"{error} {call} failed: {errno.errorcode.get(error, str(error))} ({os.strerror(error)})"
            os.write(report_w, message.encode()[:_SETUP_REPORT_BYTES])
            raise

    try:
        return _start(argv, env=env, cwd=cwd, stdio=stdio, preexec=preexec)
    except subprocess.SubprocessError:
        os.close(report_w)
        report_w = -1
        report = os.read(report_r, _SETUP_REPORT_BYTES).decode(errors="replace")
        if report:
            error, message = report.split(" ", 1)
            raise clonespawn.SetupFailed(int(error), message) from None
        raise
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)


def _start(
    argv: list[str], *, env: dict[str, str], cwd: str | None, stdio: tuple[int, int, int],
    preexec: Callable[[], None] | None,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=stdio[0],
        stdout=stdio[1],
        stderr=stdio[2],
        cwd=cwd,
        env=env,
        start_new_session=True,
        close_fds=True,
        preexec_fn=preexec,
    )
