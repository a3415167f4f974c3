"""Everything one benchmark run starts, so that all of it is stopped at the end.

A `Session` owns the temporary directory, the systems, the client processes, the
pidfd watches on tree members and the filler processes. Leaving it (normally,
on an error or on SIGINT/SIGTERM) stops the daemons, kills whatever tree member
or filler is still alive, reaps the driver's orphans, and finally kills any
process that still carries this run's mark; those are reported as leftovers.
"""

from __future__ import annotations

import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import procwatch, systems

# The variable our daemon puts into every process it starts.
OURS_TAG = b"ADAPTER_SUPERVISOR_INSTANCE"

# Soft fd limit to ask for when the hard limit is unlimited (the kernel's
# nr_open still caps it): ample for 1000 connections and the pidfds.
FD_LIMIT_WITHOUT_HARD = 65536

# The daemons get this long to stop their trees before being killed.
DAEMON_STOP_TIMEOUT_S = 30.0


@dataclass
class Session:
    mark: str
    workdir: Path
    env: dict[str, str]
    log: Callable[[str], None]
    systems: list[systems.System] = field(default_factory=list)
    agents: list[systems.Agent] = field(default_factory=list)
    watches: list[procwatch.ExitWatch] = field(default_factory=list)
    fillers: list[int] = field(default_factory=list)
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    # Leftovers that our daemon started (they carry its instance tag).
    ours_leftovers: int = 0

    def add_system(self, system: systems.System) -> systems.System:
        self.systems.append(system)
        return system

    def start_systems(self, *started: systems.System) -> None:
        """Start several systems at once and wait until each answers."""
        for system in started:
            self.add_system(system)
            system.start()
        for system in started:
            system.wait_ready()

    def stop_system(self, system: systems.System) -> None:
        system.stop(DAEMON_STOP_TIMEOUT_S)
        self.errors.extend(system.errors)
        system.errors.clear()
        self.reap()

    def agent(self, system: systems.System) -> systems.Agent:
        agent = system.agent()
        self.agents.append(agent)
        return agent

    def raw_agent(self, pidfile: Path) -> systems.Agent:
        agent = systems.raw_agent(pidfile, self.env)
        self.agents.append(agent)
        return agent

    def watch(self, members: list[procwatch.Member]) -> procwatch.ExitWatch:
        watch = procwatch.ExitWatch(members)
        self.watches.append(watch)
        return watch

    def child_pids(self) -> set[int]:
        """Children that subprocess will wait for itself."""
        pids = {s.popen.pid for s in self.systems if s.popen is not None}
        pids |= {a.popen.pid for a in self.agents}
        pids |= {h.pid for h in self.helpers}
        return pids

    def reap(self) -> None:
        procwatch.reap_orphans(self.child_pids() | set(self.fillers))

    def spawn_fillers(self, count: int) -> None:
        """Start `count` idle processes that belong to no system (`sleep`)."""
        for _ in range(count):
            self.fillers.append(os.posix_spawn("/bin/sleep", ["sleep", "86400"], self.env))

    def kill_fillers(self) -> None:
        for pid in self.fillers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.fillers:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.fillers.clear()

    def close(self) -> None:
        """Stop and kill everything this session started. Every step runs even
        if an earlier one failed; failures are recorded in `errors`."""
        steps: list[tuple[str, Callable[[], None]]] = [
            (f"stopping {system.name}", functools.partial(self._close_system, system)) for system in self.systems
        ]
        steps += [
            ("closing clients", self._close_clients),
            ("killing tree members", self._kill_members),
            ("killing fillers", self.kill_fillers),
            ("killing leftovers", self._kill_leftovers),
        ]
        for what, step in steps:
            try:
                step()
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
                self.errors.append(f"cleanup: {what} failed: {type(exc).__name__}: {exc}")

    def _close_system(self, system: systems.System) -> None:
        self.stop_system(system)
        if isinstance(system, systems.Ours):
            self.errors.extend(f"{system.name}: {line}" for line in system.crash_lines())

    def _close_clients(self) -> None:
        for agent in self.agents:
            agent.close()
        for helper in self.helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait()

    def _kill_members(self) -> None:
        for watch in self.watches:
            alive = len(watch.alive())
            if watch.kill_alive():
                self.leftovers.append(f"{alive} tree member(s) still alive at the end; killed")
            watch.close()

    def _kill_leftovers(self) -> None:
        time.sleep(0.1)
        self.reap()
        left = systems.leftover_processes(self.mark, self.child_pids())
        for pid in left:
            self.leftovers.append(f"pid {pid} {_cmdline(pid)} outlived the run; killed")
            if procwatch.environ_has_name(pid, OURS_TAG):
                self.ours_leftovers += 1
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if left:
            time.sleep(0.1)
            self.reap()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        return "?"


def _raise_fd_limit() -> None:
    """The footprint workload holds 1000 connections and the daemons inherit
    the limit: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, FD_LIMIT_WITHOUT_HARD)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def open_session(log: Callable[[str], None], keep: bool = False) -> Iterator[Session]:
    """A session in a fresh temporary directory; everything is cleaned up on exit.
    The directory (daemon logs, configs) is kept if `keep` or if the run failed."""
    procwatch.become_subreaper()
    _raise_fd_limit()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    mark = secrets.token_hex(8)
    workdir = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    env = dict(os.environ, **{systems.MARK_ENV: mark})
    env.pop("PYTHONPATH", None)
    session = Session(mark=mark, workdir=workdir, env=env, log=log)
    failed = True
    try:
        yield session
        failed = False
    finally:
        try:
            session.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if keep or failed or session.errors or session.leftovers:
                print(f"bench: logs and configs kept in {workdir}", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
