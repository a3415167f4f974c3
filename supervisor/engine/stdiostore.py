"""The daemon's ends of the adapters' stdin/stdout pipes, kept outside it.

An adapter whose stdin and stdout are pipes only the daemon holds would see
EOF on stdin (and EPIPE on stdout) the moment the daemon dies. Under systemd
the daemon hands duplicates of its ends to the service's file-descriptor
store when it spawns a root, and takes them back, by name, when it starts
again after a crash: the adopted instance then has its pipes again, for the
adapter and for `acquire` with `fds`. An in-place upgrade hands the pipes
over itself; the store keeps its copies meanwhile. Without a store (no
systemd, or `FileDescriptorStoreMax=` unset) nothing is kept, and such an
adapter sees EOF on stdin after a crash (docs/deploy-systemd.md).
"""

from __future__ import annotations

import os
from typing import Protocol

import structlog

log = structlog.get_logger()

# Prefix of the names the pipes are stored under (the systemd module reads it
# to tell them from passed sockets).
STDIO_FD_PREFIX = "stdio-"


class DescriptorStore(Protocol):
    """systemd's file-descriptor store (`supervisor.systemd.Notifier`)."""

    def store_fds(self, name: str, fds: list[int]) -> bool: ...

    def remove_fds(self, name: str) -> bool: ...


def stdio_names(instance_id: str) -> tuple[str, str]:
    """The store's names of an instance's stdin (write end) and stdout (read end)."""
    return f"{STDIO_FD_PREFIX}{instance_id}-in", f"{STDIO_FD_PREFIX}{instance_id}-out"


class StdioStore:
    """Keeps instances' pipes in a descriptor store and takes them back.

    `passed`: the pipes the store passed back at this start, by name (this
    owns them until `take` hands them on or `close_untaken` closes them).
    Every method runs on the trio thread and never raises.
    """

    def __init__(self, store: DescriptorStore | None, passed: dict[str, int] | None = None) -> None:
        self._store = store
        self._passed = dict(passed or {})

    def keep(self, instance_id: str, stdin_fd: int | None, stdout_fd: int | None) -> None:
        """Store the pipes of a root just spawned (no-op without a store)."""
        if self._store is None:
            return
        for name, fd in zip(stdio_names(instance_id), (stdin_fd, stdout_fd)):
            if fd is not None:
                self._store.store_fds(name, [fd])

    def forget(self, instance_id: str) -> None:
        """The tree of an instance that had pipes is gone: the store lets
        them go (whichever image stored them)."""
        if self._store is None:
            return
        for name in stdio_names(instance_id):
            self._store.remove_fds(name)

    def take(self, instance_id: str) -> tuple[int | None, int | None]:
        """The pipes passed back for an instance being adopted (None for
        each that was not); they are the caller's from now on, and stay in
        the store."""
        stdin_name, stdout_name = stdio_names(instance_id)
        return self._passed.pop(stdin_name, None), self._passed.pop(stdout_name, None)

    def close_untaken(self) -> list[str]:
        """Close the pipes passed back that no adopted instance took, and
        remove them from the store; returns their names."""
        names = sorted(self._passed)
        for name in names:
            try:
                os.close(self._passed.pop(name))
            except OSError:
                pass
            if self._store is not None:
                self._store.remove_fds(name)
        if names:
            log.info("daemon.stdio_released", pipes=names, reason="their instances were not adopted")
        return names
