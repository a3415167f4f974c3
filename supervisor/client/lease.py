"""What both clients know of a lease (`LeaseInfo`: what the daemon said when
it granted it, and how it ended), and the running of a user's callbacks.
The blocking client's `Lease` and the async client's `AsyncLease` build on it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from supervisor.client.messages import AdapterExited

log = structlog.get_logger()


def run_callback(callback: Callable[[Any], None], lease: LeaseInfo) -> None:
    """Run a user's `on_end` callback; its failure is logged, never raised into
    the reader (which serves every other lease of the connection)."""
    try:
        callback(lease)
    except Exception:  # user code: anything may come out, and the reader must survive it
        log.exception("client.callback_failed", lease=lease.token[:8], instance=lease.instance)


class LeaseInfo:
    """What the daemon said when it granted a lease, and what happened since."""

    def __init__(self, result: Mapping[str, Any], *, detached: bool) -> None:
        self.token: str = result["lease"]
        self.instance: str = result["instance"]
        self.job: str = result["job"]
        self.adapter: str = result["adapter"]
        self.pid: int | None = result.get("pid")
        self.refcount: int = result.get("refcount", 1)
        self.spawned: bool = result.get("spawned", False)
        self.started_at: float | None = result.get("started_at")
        self.expires_at: float | None = result.get("expires_at")
        self.detached = detached
        # Set once the adapter is gone or going (see `AdapterExited`).
        self.exited: AdapterExited | None = None
        # True once the connection ended while the lease was held.
        self.lost = False
        # True once this client released the lease (or learnt it was gone).
        self.released = False

    def _note_end(self, exited: AdapterExited | None) -> None:
        """Record how the lease ended: the adapter exited (`exited`) or the
        connection ended (None; a detached lease survives that)."""
        if exited is None:
            self.lost = not self.detached
        elif self.exited is None:
            self.exited = exited

    def __repr__(self) -> str:
        state = "released" if self.released else "lost" if self.lost else "exited" if self.exited else "held"
        return f"<{type(self).__name__} {self.token[:8]} job={self.job!r} adapter={self.adapter!r} pid={self.pid} {state}>"


def describe(lease: LeaseInfo) -> str:
    return f"lease {lease.token[:8]} (job {lease.job!r}, adapter {lease.adapter!r})"
