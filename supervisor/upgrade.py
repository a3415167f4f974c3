"""In-place upgrade: the daemon re-executes its entry point from disk, same pid,
and hands the new image everything it holds (docs/architecture.md, "What
crosses from one incarnation to the next").

The old image first proves the new code can take over: it runs the entry
point as a child in check mode (`serve --check-upgrade`), which loads the
config from the same path and says which handover formats it reads, under
CHECK_TIMEOUT_S. Then it pauses the server (the listening socket stays open,
so new clients wait in its backlog; every connection is brought to a point
with nothing half done), waits for the engine to be idle (no spawn in a
worker thread, no sweep), writes the handover (`Handover`, msgspec JSON, in a
memfd) and `execve`s with every fd it names left open. The daemon stays the
parent and the child subreaper of its trees: both survive `execve`. If the
check fails, or anything before the exec does, or `execve` itself, the old
image carries on serving as if nothing happened and says why.

The new image finds the handover through HANDOVER_ENV, takes everything
back (`supervisor.serve`), and answers the `upgrade` request that asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import py_compile
import subprocess
import sys
import time
from collections.abc import Callable, MutableSet
from dataclasses import dataclass

import msgspec
import structlog
import trio

from supervisor import __version__, systemd
from supervisor.core.config import load_config
from supervisor.core.errors import ConfigError
from supervisor.engine.engine import Engine
from supervisor.engine.handoff import EngineState
from supervisor.server.listener import ControlServer, ServerState

log = structlog.get_logger()

# The handover format this code writes, and the ones it reads.
HANDOVER_VERSION = 1
READABLE_HANDOVERS = frozenset({1})

HANDOVER_ENV = "ADAPTER_SUPERVISOR_HANDOVER"

# How long the new code's check may take (a cold Python start on a busy host).
CHECK_TIMEOUT_S = 30.0

# How long connections and the engine get to finish what they have under way.
QUIESCE_TIMEOUT_S = 10.0


class Requester(msgspec.Struct, frozen=True):
    """The `upgrade` request the new image answers."""

    connection: int
    request_id: int | str


class Handover(msgspec.Struct, frozen=True, kw_only=True):
    version: int = HANDOVER_VERSION
    from_version: str
    lock_fd: int
    listener_fd: int
    # The socket file this daemon bound (to remove at exit), by inode; None
    # when systemd passed the socket.
    bound_inode: int | None
    socket_activated: bool
    engine: EngineState
    server: ServerState
    requester: Requester | None = None
    # CLOCK_MONOTONIC (ns, the same clock in the new image) when the old
    # image paused serving and when it called execve: the new image logs
    # how long serving stopped, and where the time went.
    paused_ns: int = 0
    exec_ns: int = 0
    # The process's CPU time (ns) when it called execve: CPU time survives
    # execve, so the new image tells how much CPU its start took, a figure
    # a busy host does not stretch as it does the wall-clock times.
    exec_cpu_ns: int = 0


def write_bytecode() -> int:
    """Compile the daemon's own imported modules whose bytecode cache is
    missing or older than their source; returns how many were written.

    Run by the check of new code, so that the new image, which answers no
    request until it has imported everything, loads bytecode instead of
    compiling its sources (about 0.1 s of a 0.25 s start where nothing was
    compiled: an editable install, or PYTHONDONTWRITEBYTECODE set). It
    writes what `pip install` writes for an installed package, and only
    into a package directory that belongs to the daemon's uid: never into
    the standard library, other packages, or a tree someone else owns."""
    written = 0
    for name, module in list(sys.modules.items()):
        if name != "supervisor" and not name.startswith("supervisor."):
            continue
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        cached = getattr(spec, "cached", None)
        if not origin or not cached or not origin.endswith(".py"):
            continue
        try:
            if os.stat(os.path.dirname(origin)).st_uid != os.geteuid():
                continue
            if os.stat(cached).st_mtime >= os.stat(origin).st_mtime:
                continue
        except OSError:
            pass  # no cache yet
        try:
            py_compile.compile(origin, cfile=cached, doraise=True)
        except (OSError, py_compile.PyCompileError):
            continue
        written += 1
    return written


def check_output(config_path: str) -> bytes:
    """What `serve --check-upgrade` prints: the version and the handover
    formats this code reads (the config was loaded first)."""
    return json.dumps({"version": __version__, "handovers": sorted(READABLE_HANDOVERS)}).encode()


async def check_new_code(config_path: str, helpers: MutableSet[int]) -> str | None:
    """Run the entry point on disk in check mode; None if it can take over,
    else why not. The child's pid is in `helpers` while it runs (the
    daemon's own child, which no sweep may take for an orphan).
    Cancellation: the child is killed."""
    # -P and cwd "/": the code checked is the installed package, never a
    # `supervisor` directory that happens to be where the daemon was started.
    command = [sys.executable, "-P", "-m", "supervisor", "serve", "--config", config_path, "--check-upgrade"]
    finished: list[subprocess.CompletedProcess[bytes]] = []
    failed: list[OSError] = []

    async def run(task_status: trio.TaskStatus[trio.Process | None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            finished.append(await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False, cwd="/", task_status=task_status,
            ))
        except OSError as exc:
            failed.append(exc)
            with contextlib.suppress(RuntimeError):  # (started already: it failed later)
                task_status.started(None)

    child: trio.Process | None = None
    try:
        with trio.fail_after(CHECK_TIMEOUT_S):
            try:
                async with trio.open_nursery() as nursery:
                    child = await nursery.start(run)
                    if child is not None:
                        helpers.add(child.pid)
            finally:
                # Reaped by now: run_process waits for it (killing it first
                # if cancelled), so its pid is no one else's yet.
                if child is not None:
                    helpers.discard(child.pid)
        if failed:
            raise failed[0]
        result = finished[0]
    except trio.TooSlowError:
        return f"the new code's check did not finish within {CHECK_TIMEOUT_S:g} s"
    except OSError as exc:
        return f"the new code's check could not start: {exc}"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        return f"the new code's check failed (exit {result.returncode}): {detail[-1] if detail else 'no output'}"
    try:
        answer = json.loads(result.stdout)
        handovers = set(answer["handovers"])
        version = answer["version"]
    except (ValueError, KeyError, TypeError):
        return f"the new code's check answered {result.stdout[:200]!r}, not its formats"
    if HANDOVER_VERSION not in handovers:
        return f"the new code ({version}) reads handover formats {sorted(handovers)}, not {HANDOVER_VERSION}"
    return None


def safe_argv(argv: list[str]) -> list[str]:
    """The command line to re-execute: `argv` with -P (Python's safe path:
    nothing from the working directory or the script's directory is put
    first on sys.path) unless it has it, so that the new image loads the
    installed package, not a `supervisor` directory in whatever directory the
    daemon was started from."""
    if "-P" in argv[1:2] or len(argv) < 2:
        return list(argv)
    return [argv[0], "-P", *argv[1:]]


def read_handover(environ: dict[str, str] | os._Environ[str]) -> Handover | None:
    """The handover the previous image left, if this process is an upgrade
    (the variable is removed so that adapters never inherit it). Raises
    ValueError for a handover this code cannot read."""
    value = environ.pop(HANDOVER_ENV, None)
    if value is None:
        return None
    fd = int(value)
    try:
        with os.fdopen(fd, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ValueError(f"cannot read the handover (fd {fd}): {exc}") from None
    version = msgspec.json.decode(data, type=dict).get("version")
    if version not in READABLE_HANDOVERS:
        raise ValueError(f"handover format {version!r} is not one this code reads ({sorted(READABLE_HANDOVERS)})")
    return msgspec.json.decode(data, type=Handover)


@dataclass
class Upgrader:
    """Re-executes this daemon in place when asked (the `upgrade` method, SIGUSR2)."""

    engine: Engine
    server: ControlServer
    config_path: str
    lock_fd: int
    listener_fd: int
    bound_inode: int | None
    socket_activated: bool
    notifier: systemd.Notifier
    flush_logs: Callable[[], None]

    def __post_init__(self) -> None:
        self._lock = trio.Lock()

    async def upgrade(self, connection: int | None, request_id: int | str | None) -> str:
        """Upgrade now; returns only if that did not happen, with the reason
        (the daemon then serves on). One upgrade at a time: another asked for
        meanwhile is refused at once."""
        if self._lock.locked():
            return "an upgrade is already under way"
        async with self._lock:
            log.info("daemon.upgrade_requested", connection=connection)
            reason = await self._check()
            if reason is not None:
                log.error("daemon.upgrade_refused", reason=reason)
                return reason
            if self.engine.shutting_down:
                return "the daemon began shutting down"
            self.notifier.reloading()
            paused_ns = time.monotonic_ns()
            try:
                reason = await self.server.pause(requester=connection, timeout=QUIESCE_TIMEOUT_S)
                if reason is None:
                    reason = await self._engine_idle()
                if reason is None:
                    requester = Requester(connection, request_id) if connection is not None and request_id is not None else None
                    reason = self._exec(requester, paused_ns)
            finally:
                self.server.resume_serving()
                if not self.engine.shutting_down:
                    self.notifier.ready(status=self.engine.status_line())
            log.error("daemon.upgrade_failed", reason=reason)
            return reason

    async def _check(self) -> str | None:
        """Why the code on disk may not take over now, or None."""
        if self.engine.shutting_down:
            return "the daemon is shutting down"
        try:
            config = await trio.to_thread.run_sync(load_config, self.config_path)
        except ConfigError:
            config = None  # the check of the new code says why
        if config is not None:
            current = self.engine.config.daemon
            if (config.daemon.state_dir, config.daemon.socket) != (current.state_dir, current.socket):
                return ("the config file names another state_dir or socket than the daemon uses; "
                        "those change only with a restart")
        return await check_new_code(self.config_path, self.engine.helper_processes)

    async def _engine_idle(self) -> str | None:
        with trio.move_on_after(QUIESCE_TIMEOUT_S):
            while self.engine.busy() is not None:
                await trio.sleep(0.005)
            return None
        return f"{self.engine.busy()} after {QUIESCE_TIMEOUT_S:g} s"

    def _exec(self, requester: Requester | None, paused_ns: int) -> str:
        """Write the handover and execve; returns only on failure, with the
        reason, having undone what it did. No checkpoint in here."""
        if self.engine.shutting_down:
            return "the daemon began shutting down"
        engine_state, engine_fds = self.engine.export_state()
        server_state, server_fds = self.server.export_state()
        handover = Handover(
            from_version=__version__, lock_fd=self.lock_fd, listener_fd=self.listener_fd,
            bound_inode=self.bound_inode, socket_activated=self.socket_activated,
            engine=engine_state, server=server_state, requester=requester,
            paused_ns=paused_ns, exec_ns=time.monotonic_ns(), exec_cpu_ns=time.process_time_ns(),
        )
        keep = [self.lock_fd, self.listener_fd, *engine_fds, *server_fds]
        try:
            memfd = os.memfd_create("adapter-supervisor-handover", 0)
        except OSError as exc:
            return f"cannot create the handover: {exc}"
        try:
            data = memoryview(msgspec.json.encode(handover))
            while data:
                data = data[os.write(memfd, data):]
            os.lseek(memfd, 0, os.SEEK_SET)
            for fd in keep:
                os.set_inheritable(fd, True)
            env = dict(os.environ, **self.notifier.for_reexec(), **{HANDOVER_ENV: str(memfd)})
            # The command line it was started with (the console script, or
            # `python -m supervisor`), run anew from disk: same config, and
            # the same name in `ps` and for pgrep.
            argv = safe_argv(sys.orig_argv)
            log.info("daemon.upgrading", pid=os.getpid(), connections=len(server_state.connections),
                     trees=len(engine_state.trees), executable=sys.executable)
            self.flush_logs()
            os.execve(sys.executable, argv, env)
        except OSError as exc:
            for fd in keep:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass
            return f"execve failed: {exc}"
        finally:
            os.close(memfd)
        raise AssertionError("execve returned")  # pragma: no cover
