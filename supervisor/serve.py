"""`adapter-supervisor serve`: wire the parts together and run until a signal.

Start-up order matters: become a child subreaper before the first spawn, take
the state-directory lock before touching the socket (two daemons must never
share either), decide the cgroup mode once, then accept connections.
Shutdown is the reverse: stop accepting, tell clients, stop every tree, remove
the socket, exit 0.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import pathlib
import resource
import signal
import socket as stdlib_socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import structlog
import trio

from supervisor import __version__, gcpauses, upgrade
from supervisor.core import protocol
from supervisor.procs import timeslice
from supervisor.procs import subreaper
from supervisor import systemd
from supervisor.procs.cgroup import CgroupManager, CgroupUnavailable
from supervisor.procs.spawner import command_warnings
from supervisor.core.config import Config, load_config
from supervisor.engine.engine import Engine
from supervisor.core.errors import ConfigError
from supervisor.logconfig import TurnWriter, configure_logging
from supervisor.server.listener import ControlServer, SocketGroupRefused, bind_control_socket
from supervisor.engine.privatedir import UnsafeDirectory, ensure_private_dir
from supervisor.engine.staterecord import daemon_key
from supervisor.engine.stdiostore import StdioStore

log = structlog.get_logger()

# When this image had imported its code (for `daemon.upgrade_pause`).
IMPORTED_NS = time.monotonic_ns()

EX_OK = 0
EX_UNAVAILABLE = 69  # sysexits: a required resource (socket, lock) is taken
EX_CONFIG = 78  # sysexits: the configuration is unusable

LOCK_FILE = "daemon.lock"

STOP_AND_RELOAD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# How long a worker thread (a tree scan, a record write) may keep the GIL
# while the trio thread waits for it. Python's default, 5 ms, let one scan of
# 10,000 trees hold a request for tens of ms (each of the request's system
# calls gave the GIL up and waited that long to get it back).
GIL_SWITCH_INTERVAL_S = 0.0005

# The size the fd table is grown to at start (`presize_fd_table`): enough for
# 10,000 instances and as many connections, in 512 KiB of kernel memory.
FD_TABLE_SLOTS = 65536


class StartupError(Exception):
    """The daemon cannot start for a reason an operator must fix (not the config)."""


def serve(config_path: str, *, check_upgrade: bool = False) -> int:
    """Run the daemon on `config_path`; returns the process exit status. With
    `check_upgrade`, only load the config, compile this code's modules to
    bytecode where that is missing, and print what an in-place upgrade needs
    to know of this code (`supervisor.upgrade.check_output`)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        configure_logging("auto", "info")
        log.error("config.invalid", error=str(exc))
        return EX_CONFIG
    if check_upgrade:
        upgrade.write_bytecode()
        sys.stdout.buffer.write(upgrade.check_output(config_path) + b"\n")
        sys.stdout.flush()
        return EX_OK
    # Lines logged during a turn of the event loop are written when it ends.
    writer = TurnWriter(sys.stderr)
    configure_logging(config.daemon.log_format, config.daemon.log_level, writer)  # type: ignore[arg-type]
    try:
        handover = upgrade.read_handover(os.environ)
    except ValueError as exc:
        log.critical("daemon.handover_unreadable", error=str(exc))
        return EX_UNAVAILABLE
    if handover is None:
        _log_command_warnings(config)
    try:
        trio.run(partial(run_daemon, config, handover=handover, flush_logs=writer.drain), instruments=[writer])
    except StartupError as exc:
        log.error("daemon.start_failed", error=str(exc))
        return EX_UNAVAILABLE
    return EX_OK


def _log_command_warnings(config: Config) -> None:
    """Log each adapter whose program a spawn would not find or could not
    run, looked up in this daemon's own environment (as check-config
    warns)."""
    for warning in command_warnings(config):
        log.warning("config.command_warning", config=warning.path, key=warning.key, warning=warning.message)


def _lock_holder(fd: int) -> str:
    """Who holds the state_dir lock, as its holder wrote it: "pid N", or
    "pid unknown" if it has not written it yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


@contextmanager
def state_dir_lock(state_dir: str, inherited: int | None = None) -> Iterator[int]:
    """Hold an exclusive lock on `state_dir` for the daemon's life; yields
    the lock file's fd. `inherited`: that fd, still locked, handed over by
    the previous image of this process."""
    if inherited is not None:
        os.set_inheritable(inherited, False)
        try:
            yield inherited
        finally:
            os.close(inherited)
        return
    try:
        ensure_private_dir(state_dir, mode=0o700)
    except UnsafeDirectory as exc:
        raise StartupError(
            f"refusing state_dir {state_dir}: {exc} (it holds lease tokens and names processes to adopt)"
        ) from None
    except OSError as exc:
        raise StartupError(f"cannot create state_dir {state_dir}: {exc.strerror or exc}") from None
    if os.stat(state_dir).st_mode & 0o077:
        log.warning("daemon.state_dir_mode", state_dir=state_dir, mode="0700",
                    reason="it holds lease tokens; it was open to others")
        os.chmod(state_dir, 0o700)
    path = os.path.join(state_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(
                f"another daemon ({_lock_holder(fd)}) is already running on state_dir {state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield fd
    finally:
        os.close(fd)


def detect_cgroups(config: Config, handover: upgrade.Handover | None = None) -> CgroupManager | None:
    """The cgroup manager for this run, or None for the process-table
    fallback. After an upgrade, the mode the previous image used: its trees
    are tracked that way, and its probe already proved the base works."""
    handed = handover.engine.mode if handover is not None else None
    if handed is not None:
        if handed.cgroup_base is None:
            log.info("daemon.mode", mode="process-table", reason="handed over")
            return None
        log.info("daemon.mode", mode="cgroup", base=handed.cgroup_base, reason="handed over")
        return CgroupManager(pathlib.Path(handed.cgroup_base))
    setting = config.daemon.cgroup
    if setting == "off":
        log.info("daemon.mode", mode="process-table", reason="cgroup = \"off\" in the config")
        return None
    try:
        # Named after the state directory: two daemons on one host never see
        # each other's instance cgroups as orphans.
        manager = CgroupManager.detect(
            explicit_root=None if setting == "auto" else setting,
            name=f"adapter-supervisor-{daemon_key(config.daemon.state_dir)}",
        )
    except CgroupUnavailable as exc:
        log.info("daemon.mode", mode="process-table", reason=str(exc))
        return None
    log.info("daemon.mode", mode="cgroup", base=str(manager.base))
    return manager


def freeze_startup_objects(*, collect: bool = True) -> None:
    """Keep what start-up made (modules, classes, the config) out of every
    later garbage collection. A full collection of the daemon's ~30,000
    start-up objects takes milliseconds, and the collector runs one whenever
    requests have allocated enough, in the middle of whichever request that
    is. Frozen objects live for the whole run anyway. Without `collect`
    (an upgrade, which answers no request until this is done) start-up's
    little garbage is frozen with the rest instead of collected first.
    Turns the collector on (it may have been off through start-up)."""
    if collect:
        gc.collect()
    gc.freeze()
    gc.enable()  # (the command line starts `serve` with it off)
    gcpauses.install()


def request_latency_slice(slice_us: int) -> None:
    """Give the trio thread a short time slice (supervisor/procs/timeslice.py), so that
    replies are not queued behind the adapters just started. Not fatal: the
    daemon works the same without it, only slower to answer on a busy CPU."""
    if slice_us == 0:
        return
    try:
        timeslice.request_slice(slice_us)
    except OSError as exc:
        log.warning("daemon.latency_slice_refused", slice_us=slice_us, error=exc.strerror)
        return
    log.info("daemon.latency_slice", slice_us=slice_us, kernel_slice_ns=timeslice.thread_slice_ns())


async def run_daemon(
    config: Config,
    *,
    handover: upgrade.Handover | None = None,
    flush_logs: Callable[[], None] = lambda: None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT. Raises StartupError if the socket or state dir is taken.

    Under systemd: serves on a socket passed by socket activation instead of
    binding one (and leaves its file alone), and speaks sd_notify. SIGUSR2 (or
    the `upgrade` method) re-executes the daemon in place; `handover` is what
    the previous image of this process handed over, if it is such an upgrade.
    """
    notifier = systemd.Notifier.from_environ()
    activated = None
    # The adapters' pipes systemd's file-descriptor store passed back.
    stored: dict[str, int] = {}
    if handover is None:
        try:
            activated = systemd.activated_listener(stored=stored)
        except systemd.ActivationError as exc:
            raise StartupError(str(exc)) from None
    subreaper.become_child_subreaper()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    request_latency_slice(config.daemon.latency_slice_us)
    raise_fd_limit()
    presize_fd_table()
    inherited_lock = handover.lock_fd if handover is not None else None
    with state_dir_lock(config.daemon.state_dir, inherited_lock) as lock_fd:
        # What the receiver puts back when it closes: a stop signal that comes
        # after the shutdown (`timeout` sends SIGTERM to the daemon and then to
        # its process group) must not kill the process on its way out.
        for signum in STOP_AND_RELOAD_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        with trio.open_signal_receiver(*STOP_AND_RELOAD_SIGNALS, signal.SIGUSR2) as signals:
            if handover is not None:
                os.set_inheritable(handover.listener_fd, False)
                plain = stdlib_socket.socket(fileno=handover.listener_fd)
                listener = trio.socket.from_stdlib_socket(plain)
                socket_activated = handover.socket_activated
                bound_inode = handover.bound_inode
            elif activated is not None:
                listener = trio.socket.from_stdlib_socket(activated)
                socket_activated, bound_inode = True, None
            else:
                socket_dir = os.path.dirname(os.path.abspath(config.daemon.socket))
                try:
                    ensure_private_dir(socket_dir, mode=socket_dir_mode(config))
                except UnsafeDirectory as exc:
                    raise StartupError(f"refusing the socket's directory: {exc}") from None
                except OSError as exc:
                    raise StartupError(f"cannot create {socket_dir}: {exc.strerror or exc}") from None
                try:
                    listener = await bind_control_socket(
                        config.daemon.socket, config.daemon.socket_mode, config.daemon.socket_group
                    )
                except SocketGroupRefused as exc:
                    raise StartupError(str(exc)) from None
                except OSError as exc:
                    if exc.errno in (errno.EADDRINUSE, errno.EEXIST):
                        raise StartupError(str(exc.strerror or exc)) from None
                    raise StartupError(f"cannot bind {config.daemon.socket}: {exc}") from None
                socket_activated = False
                # The file we bound, by inode: at exit we remove it only if it
                # is still ours (a later daemon may have bound the path since).
                bound_inode = os.stat(config.daemon.socket).st_ino
            socket_path = listener.getsockname()
            if handover is not None:
                _take_inheritable_back(handover)
            engine = Engine(
                config, cgroups=detect_cgroups(config, handover), handed=handover.engine if handover is not None else None,
                stdio=StdioStore(notifier if notifier.enabled else None, stored),
            )
            server = ControlServer(engine, handed=handover.server if handover is not None else None)
            upgrader = upgrade.Upgrader(
                engine=engine, server=server, config_path=config.path, lock_fd=lock_fd,
                listener_fd=listener.fileno(), bound_inode=bound_inode, socket_activated=socket_activated,
                notifier=notifier, flush_logs=flush_logs,
            )
            engine.upgrade_hook = upgrader.upgrade
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(engine.run)
                    freeze_startup_objects(collect=handover is None)
                    await nursery.start(server.serve, listener)
                    log.info(
                        "daemon.ready", pid=os.getpid(), socket=socket_path,
                        adapters=sorted(config.adapters), config=config.path,
                        socket_activated=socket_activated,
                        cgroup_mode=engine.cgroups is not None,
                        spawner=engine.spawner_name, generation=engine.generation,
                        upgraded_from=handover.from_version if handover is not None else None,
                    )
                    if handover is not None:
                        _log_upgrade_pause(handover)
                    if handover is not None and handover.requester is not None:
                        _answer_upgrade(server, engine, handover.requester)
                    notifier.ready(status=engine.status_line())
                    await nursery.start(systemd.watchdog, notifier)
                    await nursery.start(systemd.report_status, notifier, engine.status_line)
                    task_status.started()
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            notifier.reloading()
                            await _reload(engine)
                            server.drop_disallowed()
                            notifier.ready(status=engine.status_line())
                            continue
                        if signum == signal.SIGUSR2:
                            nursery.start_soon(upgrader.upgrade, None, None)
                            continue
                        log.info("daemon.stopping", signal=signal.Signals(signum).name)
                        notifier.stopping(status="stopping every adapter tree")
                        break
                    server.stop_accepting()
                    await engine.shutdown()
                    nursery.cancel_scope.cancel()
            except BaseException:
                # Only a bug gets here (clients cannot crash the daemon). The
                # trees are left running and recorded: the next start adopts
                # them (adoption after a crash), so a bug never takes an adapter down.
                log.critical("daemon.crashed", exc_info=True)
                raise
            finally:
                # A passed socket belongs to the socket unit: its file stays.
                if bound_inode is not None:
                    _unlink_socket(config.daemon.socket, bound_inode)
    log.info("daemon.stopped")


def _take_inheritable_back(handover: upgrade.Handover) -> None:
    """The fds the previous image left open for this one go back to
    close-on-exec, so that no adapter inherits them."""
    fds = [c.fd for c in handover.server.connections]
    for tree in handover.engine.trees:
        fds += [fd for fd in (tree.stdin_fd, tree.stdout_fd, tree.stderr_fd) if fd is not None]
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass


def _log_upgrade_pause(handover: upgrade.Handover) -> None:
    """How long an upgrade stopped serving, and where that time went: the
    old image pausing and handing over, this image starting and importing
    its code, and rebuilding what was handed over; and the CPU time this
    image took to start serving."""
    if not handover.paused_ns:
        return
    now = time.monotonic_ns()
    log.info(
        "daemon.upgrade_pause",
        total_ms=round((now - handover.paused_ns) / 1e6, 1),
        handing_over_ms=round((handover.exec_ns - handover.paused_ns) / 1e6, 1),
        starting_ms=round((IMPORTED_NS - handover.exec_ns) / 1e6, 1),
        rebuilding_ms=round((now - IMPORTED_NS) / 1e6, 1),
        cpu_ms=round((time.process_time_ns() - handover.exec_cpu_ns) / 1e6, 1) if handover.exec_cpu_ns else None,
    )


def _answer_upgrade(server: ControlServer, engine: Engine, requester: upgrade.Requester) -> None:
    """Answer the `upgrade` request that made this image, on its connection."""
    connection = server.connection(requester.connection)
    if connection is None:
        return
    result = {"pid": engine.pid, "version": __version__, "generation": engine.generation}
    line = protocol.encode_result(requester.request_id, result)
    # At once if the socket takes it (before the connection's task first runs,
    # which may find the peer's input ended and close it); else queued.
    if not connection.try_send(line):
        connection.queue_line(line)


async def _reload(engine: Engine) -> None:
    path = engine.config.path
    try:
        config = await trio.to_thread.run_sync(load_config, path)
    except ConfigError as exc:
        log.error("config.reload_rejected", error=str(exc), kept=path)
        return
    if config.daemon.socket != engine.config.daemon.socket or config.daemon.state_dir != engine.config.daemon.state_dir:
        log.warning("config.reload_partial", note="socket and state_dir changes apply on restart only")
    engine.reload(config)
    log.info("config.reloaded", config=path, adapters=sorted(config.adapters))
    _log_command_warnings(config)


def _unlink_socket(path: str, inode: int) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def socket_dir_mode(config: Config) -> int:
    """The mode a missing socket directory is created with: 0700 when only
    the daemon's own uid may connect (no allowed_uids, allowed_gids or
    socket_group), else 0755 (others must reach the socket file, whose own
    mode and group and the peer checks decide who may talk)."""
    daemon = config.daemon
    if os.geteuid() != 0 and not daemon.allowed_uids and not daemon.allowed_gids and daemon.socket_group is None:
        return 0o700
    return 0o755


def presize_fd_table(slots: int = FD_TABLE_SLOTS) -> None:
    """Grow this process's fd table to `slots` (no further than the soft
    limit on open files allows) now, at start, while growing it is cheap.

    The kernel grows a process's fd table by doubling it, in whichever call
    opened the fd that did not fit, and in a process of more than one thread
    each growth first waits for an RCU grace period: 10-30 ms here, on the
    trio thread as often as not (four such waits filling to 10,000
    instances). The table never shrinks, so one growth now saves them all.
    Nothing is raised: a table that cannot grow now grows later."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = slots - 1 if soft == resource.RLIM_INFINITY else min(slots, soft) - 1
    try:
        probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        # The lowest free fd at or above `highest`: never one in use.
        os.close(fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, highest))
    except OSError as exc:
        log.debug("daemon.fd_table_unsized", slots=slots, error=str(exc))
    finally:
        os.close(probe)


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard limit.

    Each connection, instance pipe, pidfd and /proc read takes an fd; the
    common soft default of 1024 is no more than the default max_connections.
    Running out would turn routine scans into errors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("daemon.fd_limit_unchanged", soft=soft, hard=hard, error=str(exc))
