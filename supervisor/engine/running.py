"""The shell's record of one spawned instance (`RunningInstance`), and what
acquires parked on a spawn wait for (`PendingSpawn`). Plain records; the
code that changes them is in `instances.py`, `stopping.py` and
`treehandover.py`, on the trio thread."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from supervisor.core.config import AdapterConfig
from supervisor.core.errors import SupervisorError
from supervisor.procs.spawner import RootProcess
from supervisor.procs.stderrfile import FollowedFile
from supervisor.procs.tree import InstanceTree


@dataclass(slots=True)
class RunningInstance:
    """The shell's side of one spawned instance, until its tree is gone."""

    adapter: AdapterConfig
    root: RootProcess
    tree: InstanceTree
    root_reaped: trio.Event = field(default_factory=trio.Event)
    returncode: int | None = None
    stopped: trio.Event = field(default_factory=trio.Event)
    rss_bytes: int = 0
    # The file the tree writes its stderr to, followed by the daemon.
    stderr: FollowedFile | None = None
    # Taken over from a previous incarnation: the root is not the daemon's child.
    adopted: bool = False
    # Wall-clock time its stop began (its stop_timeout counts from then,
    # across an upgrade too).
    stop_began: float | None = None
    # Whether the root settler has seen it (`Instances._settle_roots`): only
    # then is its root's exit reported, once (`exit_reported`).
    settled: bool = False
    exit_reported: bool = False


@dataclass
class PendingSpawn:
    """Acquires parked on a STARTING instance wait for this."""

    settled: trio.Event = field(default_factory=trio.Event)
    error: SupervisorError | None = None


def record_root_exit(running: RunningInstance, returncode: int) -> None:
    """The root has been reaped with `returncode`: say so to whoever waits."""
    running.returncode = returncode
    # Tell subprocess the child is gone, so it never waits for it itself.
    running.root.reaped(returncode)
    running.root_reaped.set()
