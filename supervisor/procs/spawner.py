"""Starting the root process of an instance.

The root starts in a new session with the instance tag in its environment and,
in cgroup mode, inside the instance's cgroup before it runs one instruction of
its own, so every descendant is born there. There are two ways to start it:

* the clone3 spawner (`supervisor.clonespawn`), when it was built: the root is
  created like posix_spawn creates a child, and in cgroup mode it is born in
  the instance cgroup (CLONE_INTO_CGROUP). It takes about as long as exec,
  so the daemon calls it on the trio thread.
* `subprocess.Popen` (`supervisor.procs.popenspawn`), everywhere else: in
  cgroup mode a `preexec_fn` joins the cgroup between fork and exec (a fork
  of the whole daemon plus an RCU grace period in the kernel: milliseconds),
  so the daemon calls it in a worker thread.

Either way the root takes the adapter's user, groups, umask, limits and
no_new_privs (`ChildSetup`) before exec, in the same order.

The daemon does all waiting itself (see `supervisor.subreaper`). A `Popen`
object is kept only so that its pid and pipes stay together, and it is told the
root's return code when the daemon reaps it, so `subprocess` never waits for
the child on its own.
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
from collections.abc import Mapping
from typing import Protocol

import msgspec
import structlog

from supervisor.core.config import AdapterConfig, Config, ConfigWarning
from supervisor.core.errors import SpawnFailed
from supervisor.core.identity import USER_ENV, Credentials, user_environment
from supervisor.procs import clonespawn, popenspawn, process
from supervisor.procs.cgroup import CgroupManager
from supervisor.procs.stderr import StderrTail

class PendingExec(msgspec.Struct):
    """A root started with `clonespawn.launch` that had not exec'd when the
    spawn returned, and what its failure would be described with."""

    launch: clonespawn.Launch
    adapter: AdapterConfig
    argv: list[str]


class RootProcess(msgspec.Struct):
    """A spawned root with the daemon's ends of its pipes."""

    id: process.ProcessId
    stdin_fd: int | None
    stdout_fd: int | None
    # The read end of the root's stderr pipe; None when its stderr is a file
    # the caller gave (`spawn_root(stderr=...)`).
    stderr_fd: int | None
    # Only when subprocess started it.
    popen: subprocess.Popen[bytes] | None = None
    # Raw, decoded only when asked for (`decode_tail`): an adapter may write
    # thousands of lines between two `logs` calls.
    stderr_tail: StderrTail = msgspec.field(default_factory=StderrTail)
    # Set while a root of the clone3 spawner has not exec'd yet (it is not
    # the daemon's to reap or signal until then): see `exec_settled`.
    pending: PendingExec | None = None

    @property
    def pid(self) -> int:
        return self.id.pid

    def exec_settled(self, wait_ns: int = 0) -> bool:
        """Whether the root has exec'd, waiting for it at most `wait_ns`
        (True at once for a root that was not pending). Raises SpawnFailed
        if it failed before exec: it has been reaped, and the daemon's ends of
        its pipes are closed."""
        pending = self.pending
        if pending is None:
            return True
        try:
            if not pending.launch.settle(wait_ns):
                return False
        except OSError as exc:
            self.pending = None
            self.close_stdio()
            if self.stderr_fd is not None:
                os.close(self.stderr_fd)
                self.stderr_fd = None
            raise SpawnFailed(_spawn_failure(pending.adapter, pending.argv, exc)) from exc
        self.pending = None
        return True

    def reaped(self, returncode: int) -> None:
        """The daemon reaped the root: a Popen must not wait for it itself."""
        if self.popen is not None and self.popen.returncode is None:
            self.popen.returncode = returncode

    def close_stdio(self) -> None:
        """Close the daemon's stdin/stdout ends (clients hold their own duplicates)."""
        for name in ("stdin_fd", "stdout_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def instance_environment(
    adapter: AdapterConfig,
    *,
    instance_id: str,
    job: str,
    daemon_key: str,
    base: Mapping[str, str] | None = None,
    credentials: Credentials | None = None,
) -> dict[str, str]:
    """The environment of a root: the daemon's, then HOME, USER and LOGNAME
    of the user it runs as (`credentials`, if any), then the adapter's `env`,
    then the tags."""
    env = _adapter_environment(adapter, daemon_key=daemon_key, base=base)
    if credentials is not None:
        env = user_environment(env, credentials, adapter.env)
    env[process.INSTANCE_ENV] = instance_id
    env[process.JOB_ENV] = job
    return env


def _adapter_environment(adapter: AdapterConfig, *, daemon_key: str, base: Mapping[str, str] | None) -> dict[str, str]:
    """What every root of the adapter gets: the daemon's environment, the
    adapter's `env`, and the tags naming the adapter and the daemon."""
    env = dict(os.environ if base is None else base)
    env.update(adapter.env)
    env[process.ADAPTER_ENV] = adapter.name
    env[process.DAEMON_ENV] = daemon_key
    return env


# The tags whose values differ from one instance of an adapter to the next.
INSTANCE_TAGS = (process.INSTANCE_ENV, process.JOB_ENV)


def adapter_environment(
    adapter: AdapterConfig, *, daemon_key: str, base: Mapping[str, str] | None = None
) -> clonespawn.Environment:
    """`instance_environment` prepared once for every clone3 spawn of the
    adapter: each spawn brings only the values of `spawn_keys(adapter)`."""
    shared = _adapter_environment(adapter, daemon_key=daemon_key, base=base)
    if adapter.credentials is not None:
        shared = user_environment(shared, adapter.credentials, adapter.env)
    return clonespawn.Environment(shared, own=spawn_keys(adapter))


def spawn_keys(adapter: AdapterConfig) -> tuple[str, ...]:
    """The variables whose values each spawn of `adapter` brings: the
    instance tags, and with "@peer" the user's variables its `env` leaves."""
    if not adapter.runs_as_peer:
        return INSTANCE_TAGS
    return INSTANCE_TAGS + tuple(key for key in USER_ENV if key not in adapter.env)


def spawn_values(adapter: AdapterConfig, instance_id: str, job: str, peer: Credentials | None) -> tuple[str, ...]:
    """The values of `spawn_keys(adapter)` for one spawn."""
    values = (instance_id, job)
    if not adapter.runs_as_peer:
        return values
    assert peer is not None, 'an adapter with user = "@peer" is spawned for a peer'
    user_env = peer.environment()
    return values + tuple(user_env[key] for key in USER_ENV if key not in adapter.env)


def spawn_root(
    adapter: AdapterConfig,
    *,
    instance_id: str,
    job: str,
    params: Mapping[str, str],
    daemon_key: str,
    cgroup_fd: int | None = None,
    clone3: bool = False,
    base_env: Mapping[str, str] | None = None,
    environment: clonespawn.Environment | None = None,
    stderr: int | None = None,
    peer: Credentials | None = None,
    identity: clonespawn.Identity | None = None,
    exec_wait_ns: int | None = None,
) -> RootProcess:
    """Start the adapter's root for one instance.

    With `clone3`, the clone3 spawner starts it and `cgroup_fd` is the instance's
    cgroup directory (`CgroupManager.dir_fd`); without, subprocess does and
    `cgroup_fd` is its cgroup.procs (`CgroupManager.join_fd`). The environment
    is `base_env` (default: os.environ) with the adapter's and the tags; a clone3
    spawn may bring it prepared instead (`environment`, from
    `adapter_environment` with the same base and daemon key). The root's
    stderr is `stderr` if given (the caller keeps its fd), else a new pipe
    whose read end the RootProcess holds. The root runs as the adapter's
    user (`peer`, who acquired the instance, with "@peer") under its limits;
    a clone3 spawn may bring them prepared (`identity`, of the same setup).
    With `exec_wait_ns`, a clone3 spawn waits at most that long for the root
    to exec (`clonespawn.launch`) and returns it `pending` if it has not.
    Raises
    `InvalidParams` (from rendering the command), `SpawnFailed` with the OS
    reason (missing executable, bad cwd, permission, a failed setuid or
    setrlimit), or
    `clonespawn.Unsupported` (nothing was started; subprocess will work). On
    failure nothing is left open or running.
    """
    argv = adapter.render_argv(job, params)
    env: Mapping[str, str] | clonespawn.Environment
    env_values: tuple[str, ...] = ()
    setup = adapter.child_setup(peer)
    if clone3 and environment is not None:
        env, env_values = environment, spawn_values(adapter, instance_id, job, peer)
    else:
        env = instance_environment(
            adapter, instance_id=instance_id, job=job, daemon_key=daemon_key, base=base_env,
            credentials=setup.credentials,
        )
    parent_fds: list[int] = []
    child_fds: list[int] = []

    def pipe(*, child_reads: bool) -> tuple[int, int]:
        """A pipe with one end for the child: (parent's end, child's end).
        Both are recorded the moment they exist, so a failure half-way (EMFILE
        on the third pipe) still closes everything."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        parent, child = (write_end, read_end) if child_reads else (read_end, write_end)
        parent_fds.append(parent)
        child_fds.append(child)
        return parent, child

    stdin_w: int | None = None
    stdout_r: int | None = None
    pending: PendingExec | None = None
    stdin: int = subprocess.DEVNULL
    stdout: int = subprocess.DEVNULL
    try:
        if stderr is None:
            stderr_r, stderr_w = pipe(child_reads=False)
        else:
            stderr_r, stderr_w = None, stderr
        if adapter.stdio == "pipe":
            stdin_w, stdin = pipe(child_reads=True)
            stdout_r, stdout = pipe(child_reads=False)
        if clone3:
            if stdin == subprocess.DEVNULL or stdout == subprocess.DEVNULL:
                null = _devnull()
                stdin = null if stdin == subprocess.DEVNULL else stdin
                stdout = null if stdout == subprocess.DEVNULL else stdout
            popen = None
            if identity is None:
                identity = clonespawn.Identity(setup, switch_ids=popenspawn.may_switch_ids())
            if exec_wait_ns is None:
                pid, start_time = clonespawn.spawn(
                    argv, env=env, env_values=env_values, cwd=adapter.cwd, stdio=(stdin, stdout, stderr_w),
                    cgroup_fd=cgroup_fd, identity=identity,
                )
            else:
                pid, start_time, launched = clonespawn.launch(
                    argv, env=env, env_values=env_values, cwd=adapter.cwd, stdio=(stdin, stdout, stderr_w),
                    cgroup_fd=cgroup_fd, identity=identity, wait_ns=exec_wait_ns,
                )
                pending = None if launched is None else PendingExec(launched, adapter, argv)
        else:
            assert isinstance(env, dict)
            popen = popenspawn.popen(
                argv, env=env, cwd=adapter.cwd, stdio=(stdin, stdout, stderr_w), cgroup_procs_fd=cgroup_fd,
                setup=setup,
            )
            pid, start_time = popen.pid, 0
    except BaseException as exc:
        for fd in parent_fds:
            os.close(fd)
        if isinstance(exc, OSError) and not isinstance(exc, clonespawn.Unsupported):
            raise SpawnFailed(_spawn_failure(adapter, argv, exc)) from exc
        if isinstance(exc, subprocess.SubprocessError):
            raise SpawnFailed(f"adapter {adapter.name!r} could not be started: {exc}") from exc
        raise
    finally:
        for fd in child_fds:
            os.close(fd)
    # Our unreaped child: its pid cannot have been reused in between. (Nothing
    # here may raise now: a pending root's Launch must reach the caller.)
    identity = process.ProcessId(pid, start_time) if start_time else _identify_child(pid)
    return RootProcess(
        id=identity, stdin_fd=stdin_w, stdout_fd=stdout_r, stderr_fd=stderr_r, popen=popen, pending=pending
    )


def _identify_child(pid: int) -> process.ProcessId:
    """Our unreaped child's id from /proc; start time 0 if /proc cannot
    tell now (out of fds, memory): only a stale-pid check goes without it."""
    try:
        return process.identify(pid) or process.ProcessId(pid, 0)
    except OSError:
        return process.ProcessId(pid, 0)


@functools.cache
def _devnull() -> int:
    """/dev/null, opened once (close-on-exec) for every clone3 spawn's stdio:
    two system calls fewer per spawn."""
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


def command_warnings(config: Config, base: Mapping[str, str] | None = None) -> list[ConfigWarning]:
    """For each adapter whose program a spawn would not find, or would find
    but not be allowed to run, a warning at its `command`. The program is
    looked up as a spawn does: a name without "/" in each directory of PATH
    (the adapter's `env`, else `base`, default os.environ), a path as given,
    relative to the adapter's cwd if it has one. `base` should be the
    daemon's environment: PATH may differ under a service manager. Reads the
    file system; raises nothing."""
    environ = os.environ if base is None else base
    warnings = []
    for adapter in config.adapters.values():
        program = adapter.command[0]
        path = adapter.env.get("PATH", environ.get("PATH"))
        candidates = [os.fsdecode(c) for c in clonespawn.executable_candidates(program, {} if path is None else {"PATH": path})]
        if os.path.dirname(program) and adapter.cwd is not None:
            candidates = [os.path.join(adapter.cwd, program)]
        files = [candidate for candidate in candidates if os.path.isfile(candidate)]
        key = f"adapters.{adapter.name}.command"
        if not files:
            where = f"in PATH ({path or os.defpath})" if not os.path.dirname(program) else "(no such file)"
            warnings.append(ConfigWarning(config.path, key, f"program {program!r} not found {where}; a spawn will fail"))
        elif not any(os.access(candidate, os.X_OK) for candidate in files):
            warnings.append(ConfigWarning(
                config.path, key, f"program {program!r} ({files[0]}) is not executable; a spawn will fail"
            ))
    return warnings


def _spawn_failure(adapter: AdapterConfig, argv: list[str], exc: OSError) -> str:
    """What a SpawnFailed says for the OSError of a spawn."""
    if isinstance(exc, clonespawn.SetupFailed):
        return f"adapter {adapter.name!r} could not be started: {exc.strerror}"
    return _describe_spawn_error(adapter, argv, exc)


def _describe_spawn_error(adapter: AdapterConfig, argv: list[str], exc: OSError) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENOENT and exc.filename == adapter.cwd and adapter.cwd is not None:
        what = f"its cwd {adapter.cwd!r} does not exist"
    elif exc.errno == errno.ENOENT:
        what = f"executable {argv[0]!r} not found (check the command and PATH)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        what = f"permission denied running {argv[0]!r} (or entering cwd {adapter.cwd!r})"
    elif exc.errno == errno.ENOTDIR:
        what = f"cwd {adapter.cwd!r} is not a directory"
    else:
        what = reason
    return f"adapter {adapter.name!r} could not be started: {what} [{errno.errorcode.get(exc.errno or 0, 'error')}: {reason}]"


# -- the spawners -----------------------------------------------------------------

log = structlog.get_logger()


class SpawnRequest(msgspec.Struct, frozen=True):
    """One root to start: the instance it belongs to and what renders its command."""

    adapter: AdapterConfig
    instance_id: str
    job: str
    params: Mapping[str, str]
    # The fd to give the root as its stderr (the caller keeps it); None: a pipe.
    stderr: int | None = None
    # Who acquired the instance: the user the tree runs as with "@peer".
    peer: Credentials | None = None


class Spawner(Protocol):
    """Starts an instance's root in a new session, in the instance's cgroup
    (if any) before it runs an instruction of its own.

    `name` says which spawner this is (status, logs). `inline` is True when a
    spawn costs about what an exec costs, so the engine calls `spawn` on the
    trio thread and an acquire is answered without waiting for a worker
    thread; else `spawn` must run in a worker thread."""

    name: str

    @property
    def inline(self) -> bool: ...

    def spawn(self, request: SpawnRequest, *, spare_cgroup: int | None = None) -> RootProcess:
        """Blocking: start the root. `spare_cgroup` is the open directory of a
        spare cgroup named after the instance, which this closes in every case.
        Raises SpawnFailed, InvalidParams, or OSError for the cgroup; on failure
        nothing is left open or running. Touches no daemon state. The root
        may come back `pending` (not exec'd yet): the caller then waits for
        `RootProcess.exec_settled` before it counts the root as started."""
        ...

    def forget_environments(self) -> None:
        """Drop environments prepared for the adapters (the config changed)."""
        ...


class PopenSpawner:
    """`subprocess.Popen`, everywhere: in cgroup mode the child joins the
    instance's cgroup between fork and exec, which costs a fork of the daemon
    and the kernel's cgroup-migration wait, so `spawn` runs in a worker thread."""

    name = "subprocess"
    inline = False

    def __init__(self, cgroups: CgroupManager | None, *, daemon_key: str, base_env: Mapping[str, str]) -> None:
        self._cgroups = cgroups
        self._daemon_key = daemon_key
        self._base_env = base_env

    def spawn(self, request: SpawnRequest, *, spare_cgroup: int | None = None) -> RootProcess:
        if spare_cgroup is not None:
            os.close(spare_cgroup)  # joined by path: the directory exists already
        join_fd = None
        try:
            if self._cgroups is not None:
                self._cgroups.create(request.instance_id)
                join_fd = self._cgroups.join_fd(request.instance_id)
            return spawn_root(
                request.adapter, instance_id=request.instance_id, job=request.job, params=request.params,
                daemon_key=self._daemon_key, cgroup_fd=join_fd, base_env=self._base_env, stderr=request.stderr,
                peer=request.peer,
            )
        finally:
            if join_fd is not None:
                os.close(join_fd)

    def forget_environments(self) -> None:
        """Nothing is prepared ahead: every spawn builds its environment."""


# How long a clone3 spawn on the trio thread waits for its root to exec. An
# exec takes a few hundred microseconds; a child that waits for a time slice
# behind another process (a busy host) can take milliseconds more, and is
# left pending instead (`RootProcess.pending`): its acquire is answered once
# it has exec'd, and the thread serves others meanwhile.
EXEC_WAIT_NS = 1_000_000


class Clone3Spawner:
    """The clone3 spawner (`supervisor.procs.clonespawn`): the root is created
    the way posix_spawn creates a child and, in cgroup mode, born in its cgroup
    (CLONE_INTO_CGROUP). Cheap enough for the trio thread, which waits at most
    EXEC_WAIT_NS for the exec (a root may come back pending). Its `spawn` raises
    clonespawn.Unsupported, having started nothing, where the kernel refuses
    clone3 (seccomp, an old kernel)."""

    name = "clone3"
    inline = True

    def __init__(self, cgroups: CgroupManager | None, *, daemon_key: str, base_env: Mapping[str, str]) -> None:
        self._cgroups = cgroups
        self._daemon_key = daemon_key
        self._base_env = base_env
        # Adapter name -> its environment, prepared once for all its spawns.
        self._environments: dict[str, clonespawn.Environment] = {}
        # Adapter name -> its identity and limits, prepared for the C child.
        self._identities: dict[str, clonespawn.Identity] = {}
        # Reserved now, while the daemon's lowest free fds are low.
        clonespawn.stdio_slots()
        # Whether a spawn has exec'd here: until one has, spawns wait for
        # exec, so that a kernel the child finds wanting (no close_range)
        # says so at once, and the spawner falls back.
        self._proven = False

    def spawn(self, request: SpawnRequest, *, spare_cgroup: int | None = None) -> RootProcess:
        cgroup_fd = spare_cgroup
        try:
            if self._cgroups is not None and cgroup_fd is None:
                cgroup_fd = self._cgroups.open_dir(request.instance_id)
            root = spawn_root(
                request.adapter, instance_id=request.instance_id, job=request.job, params=request.params,
                daemon_key=self._daemon_key, cgroup_fd=cgroup_fd, clone3=True,
                environment=self._environment(request.adapter), stderr=request.stderr, peer=request.peer,
                identity=self._identity(request.adapter, request.peer),
                exec_wait_ns=EXEC_WAIT_NS if self._proven else None,
            )
            self._proven = True
            return root
        finally:
            if cgroup_fd is not None:
                os.close(cgroup_fd)

    def _environment(self, adapter: AdapterConfig) -> clonespawn.Environment:
        prepared = self._environments.get(adapter.name)
        if prepared is None:
            prepared = self._environments[adapter.name] = adapter_environment(
                adapter, daemon_key=self._daemon_key, base=self._base_env
            )
        return prepared

    def _identity(self, adapter: AdapterConfig, peer: Credentials | None) -> clonespawn.Identity:
        """The adapter's identity, prepared once (with "@peer": per spawn,
        each for the peer that acquired)."""
        if adapter.runs_as_peer:
            return clonespawn.Identity(adapter.child_setup(peer), switch_ids=popenspawn.may_switch_ids())
        prepared = self._identities.get(adapter.name)
        if prepared is None:
            prepared = self._identities[adapter.name] = clonespawn.Identity(
                adapter.child_setup(), switch_ids=popenspawn.may_switch_ids()
            )
        return prepared

    def forget_environments(self) -> None:
        self._environments.clear()
        self._identities.clear()


class FallbackSpawner:
    """`primary` until the kernel refuses it once, then `fallback` for good,
    starting with the spawn that was refused (which then runs where the caller
    runs it: the caller chose by `inline` before the refusal)."""

    def __init__(self, primary: Clone3Spawner, fallback: PopenSpawner) -> None:
        self._primary = primary
        self._fallback = fallback
        self._current: Clone3Spawner | PopenSpawner = primary

    @property
    def name(self) -> str:
        return self._current.name

    @property
    def inline(self) -> bool:
        return self._current.inline

    def spawn(self, request: SpawnRequest, *, spare_cgroup: int | None = None) -> RootProcess:
        if self._current is self._fallback:
            return self._fallback.spawn(request, spare_cgroup=spare_cgroup)
        try:
            return self._primary.spawn(request, spare_cgroup=spare_cgroup)
        except clonespawn.Unsupported as exc:
            self._current = self._fallback
            log.warning("spawner.clone3_refused", error=exc.strerror, using=self._fallback.name)
            return self._fallback.spawn(request)

    def forget_environments(self) -> None:
        self._primary.forget_environments()


def choose_spawner(setting: str, cgroups: CgroupManager | None, *, daemon_key: str, base_env: Mapping[str, str]) -> Spawner:
    """The spawner for `daemon.spawner`: with "auto", clone3 where it was
    built (falling back to subprocess if the kernel refuses it), else subprocess."""
    popen = PopenSpawner(cgroups, daemon_key=daemon_key, base_env=base_env)
    if setting != "auto" or clonespawn.load() is None:
        return popen
    return FallbackSpawner(Clone3Spawner(cgroups, daemon_key=daemon_key, base_env=base_env), popen)
