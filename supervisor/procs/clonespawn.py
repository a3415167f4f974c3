"""Spawning a root straight into its cgroup: the clone3 spawner.

A thin ctypes binding of `_clonespawn.c`. The child is created like
posix_spawn creates it (shared memory, the caller sleeps until exec), so a
spawn costs what a posix_spawn costs, and with a cgroup fd it is born inside
the instance cgroup instead of joining it from a forked copy of the daemon
(which copies the daemon's page tables and then waits for an RCU grace
period). The library is optional: `load()` returns None when it was not built,
and the daemon then uses `subprocess`.

The child shares the daemon's fd table until its first step gives it one of
its own with only the fds below three slots reserved low in the table
(`StdioSlots`), where its stdio is placed for the spawn: so a spawn costs the
same with ten open fds or twenty thousand (a copied table costs every open
fd, twice).

`spawn` sleeps until the child has exec'd, as posix_spawn does. On a busy
host a new child may wait milliseconds for a time slice before its first
step, and the caller would wait with it: `launch` waits a bounded time
instead, and hands back a child that has not exec'd by then as a `Launch`,
which says later whether it did. Until then the child runs in memory the
`Launch` keeps (its stack, its arguments, its set of stdio slots).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import resource
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from pathlib import Path

from supervisor.core.identity import ChildSetup

LIBRARY = Path(__file__).with_name("_clonespawn.so")

# `adapter_spawn_abi()` of the library this binding calls: a library built
# from an older _clonespawn.c takes other arguments, and is not used.
ABI = 4
_FS_ENCODING = sys.getfilesystemencoding()

# enum spawn_stage in _clonespawn.c.
STAGE_NONE = 0
STAGE_CLONE = 1
STAGE_SESSION = 2
STAGE_STDIO = 3
STAGE_CLOSE_FDS = 4
STAGE_CWD = 5
STAGE_EXEC = 6
STAGE_RLIMIT = 7
STAGE_NO_NEW_PRIVS = 8
STAGE_SETGROUPS = 9
STAGE_SETGID = 10
STAGE_SETUID = 11
STAGE_PENDING = 12

_STAGE_NAMES = {
    STAGE_CLONE: "clone3",
    STAGE_SESSION: "setsid",
    STAGE_STDIO: "redirecting stdio",
    STAGE_CLOSE_FDS: "closing inherited fds",
    STAGE_CWD: "chdir",
    STAGE_EXEC: "exec",
    STAGE_RLIMIT: "setrlimit",
    STAGE_NO_NEW_PRIVS: "prctl(PR_SET_NO_NEW_PRIVS)",
    STAGE_SETGROUPS: "setgroups",
    STAGE_SETGID: "setgid",
    STAGE_SETUID: "setuid",
}
# The stages that change who the child is or what bounds it: their errors
# name the call and its argument ("setuid(1001) failed: EPERM").
SETUP_STAGES = frozenset({STAGE_RLIMIT, STAGE_NO_NEW_PRIVS, STAGE_SETGROUPS, STAGE_SETGID, STAGE_SETUID})


# Sets of three stdio slots reserved low in the fd table: one per spawn under
# way (a pending `Launch` holds its set until its child has exec'd). A spawn
# that finds none free copies the whole table instead (keep_below 0).
SLOT_SETS = 8
FDS_PER_SLOT_SET = 512

# Slots for detached children (a stack and a job each, 32 KiB) kept for reuse.
SPARE_CHILD_SLOTS = 16

# Executable candidates kept per Environment, one list per program named.
PATHS_KEPT = 16

# clone3 failing with these means "not here" (no syscall, a seccomp filter,
# flags the kernel does not know), not "not now" (EAGAIN, ENOMEM).
UNSUPPORTED_ERRNOS = frozenset({errno.ENOSYS, errno.EPERM, errno.EINVAL})


class _Limit(ctypes.Structure):
    # struct spawn_limit: a resource and its struct rlimit.
    _fields_ = [("resource", ctypes.c_int), ("soft", ctypes.c_ulong), ("hard", ctypes.c_ulong)]


class _Identity(ctypes.Structure):
    # struct spawn_identity.
    _fields_ = [
        ("switch_ids", ctypes.c_int),
        ("uid", ctypes.c_uint),
        ("gid", ctypes.c_uint),
        ("ngroups", ctypes.c_int),
        ("groups", ctypes.POINTER(ctypes.c_uint)),
        ("umask", ctypes.c_int),
        ("nlimits", ctypes.c_int),
        ("limits", ctypes.POINTER(_Limit)),
        ("no_new_privs", ctypes.c_int),
    ]


class Identity:
    """A `ChildSetup` prepared for the C child: built once per adapter (per
    peer with "@peer") and kept, so that a spawn passes one pointer.
    `switch_ids`: whether the child changes its groups, gid and uid (only a
    root daemon can; any other runs adapters as itself)."""

    def __init__(self, setup: ChildSetup, *, switch_ids: bool) -> None:
        self.setup = setup
        credentials = setup.credentials
        groups = credentials.groups if credentials is not None else ()
        self._groups = (ctypes.c_uint * max(1, len(groups)))(*groups)
        # RLIM_INFINITY is -1 in Python's resource module, all ones in rlim_t.
        self._limits = (_Limit * max(1, len(setup.limits)))(
            *[_Limit(limit.resource, limit.value & _RLIM_MASK, limit.value & _RLIM_MASK) for limit in setup.limits]
        )
        self.struct = _Identity(
            switch_ids=int(switch_ids and credentials is not None),
            uid=credentials.uid if credentials is not None else 0,
            gid=credentials.gid if credentials is not None else 0,
            ngroups=len(groups),
            groups=self._groups,
            umask=-1 if setup.umask is None else setup.umask,
            nlimits=len(setup.limits),
            limits=self._limits,
            no_new_privs=int(setup.no_new_privs),
        )

    @property
    def empty(self) -> bool:
        """Whether the child has nothing to do (no pointer is passed)."""
        return not (self.struct.switch_ids or self.struct.umask >= 0 or self.struct.nlimits or self.struct.no_new_privs)

    def describe_failure(self, stage: int, error: int, failed_index: int) -> str:
        """`setuid(1001) failed: EPERM (Operation not permitted)` for a
        failed step of this identity."""
        setup, struct = self.setup, self.struct
        argument = {
            STAGE_SETUID: str(struct.uid),
            STAGE_SETGID: str(struct.gid),
            STAGE_SETGROUPS: str(list(setup.credentials.groups) if setup.credentials else []),
            STAGE_NO_NEW_PRIVS: "1",
        }.get(stage, "")
        call = _STAGE_NAMES[stage]
        if stage == STAGE_RLIMIT and 0 <= failed_index < len(setup.limits):
            limit = setup.limits[failed_index]
            argument = f"RLIMIT_{limit.name.upper()}, {'unlimited' if limit.value < 0 else limit.value}"
        if not call.endswith(")"):
            call = f"{call}({argument})"
        return f"{call} failed: {errno.errorcode.get(error, str(error))} ({os.strerror(error)})"


_RLIM_MASK = 2**64 - 1


class Unsupported(OSError):
    """clone3 itself was refused (old kernel, seccomp, another architecture),
    or the child found the kernel without close_range (before Linux 5.9) and
    exited before exec: nothing was run, and spawning with subprocess (which
    does without both) will work instead."""


class SetupFailed(OSError):
    """The child could not take the identity or limits it was given (its
    strerror says which call, e.g. "setuid(1001) failed: EPERM (...)"); it
    was reaped before exec."""


@functools.cache
def load() -> ctypes.CDLL | None:
    """The built library, or None if there is none (or it does not load, or
    was built from another version of _clonespawn.c: a stale build)."""
    try:
        library = ctypes.CDLL(str(LIBRARY), use_errno=True)
        abi = library.adapter_spawn_abi
    except (OSError, AttributeError):
        return None
    abi.restype = ctypes.c_int
    abi.argtypes = []
    if abi() != ABI:
        return None
    function = library.adapter_spawn
    function.restype = ctypes.c_long
    function.argtypes = [
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(_Identity),
        ctypes.c_void_p,
        ctypes.c_longlong,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_ulonglong),
    ]
    settle = library.adapter_spawn_settle
    settle.restype = ctypes.c_int
    settle.argtypes = [
        ctypes.c_void_p, ctypes.c_long, ctypes.c_longlong,
        ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
    ]
    library.adapter_spawn_slot_new.restype = ctypes.c_void_p
    library.adapter_spawn_slot_new.argtypes = []
    library.adapter_spawn_slot_free.restype = None
    library.adapter_spawn_slot_free.argtypes = [ctypes.c_void_p]
    return library


class StdioSlots:
    """Sets of three fds reserved low in the process's fd table, each
    /dev/null but while a spawn places its child's stdio there. A child that
    shares the table copies only the fds below `keep_below` into a table of
    its own. A spawn takes a free set and gives it back once its child has
    exec'd (`take`, `give_back`); thread-safe."""

    def __init__(self, sets: int = SLOT_SETS) -> None:
        self._null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.sets = [tuple(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(3)) for _ in range(sets)]
        self.keep_below = max(max(fds) for fds in self.sets) + 1
        self._free = list(range(sets - 1, -1, -1))
        self._lock = threading.Lock()
        # Cleared for good when the kernel cannot unshare in close_range (< 5.9).
        self.usable = True

    def take(self, stdio: tuple[int, int, int]) -> tuple[int, tuple[int, int, int]] | None:
        """A free set with `stdio` duplicated into it (-1 stays -1): its
        index and the fds to pass. None if every set is in use."""
        with self._lock:
            if not self._free:
                return None
            index = self._free.pop()
        placed = []
        try:
            for slot, fd in zip(self.sets[index], stdio, strict=True):
                if fd >= 0:
                    os.dup2(fd, slot, inheritable=False)
                placed.append(slot if fd >= 0 else -1)
        except BaseException:
            self.give_back(index)
            raise
        return index, (placed[0], placed[1], placed[2])

    def give_back(self, index: int) -> None:
        """The set is /dev/null again, so the daemon holds no extra end of a
        child's pipe, and free."""
        for slot in self.sets[index]:
            os.dup2(self._null, slot, inheritable=False)
        with self._lock:
            self._free.append(index)

    @property
    def in_use(self) -> int:
        """Sets taken and not given back."""
        with self._lock:
            return len(self.sets) - len(self._free)


@functools.cache
def stdio_slots() -> StdioSlots:
    """The process's slots, reserved at the first call: call it early (the
    spawner does when it is made), while the lowest free fds are low. One
    set per FDS_PER_SLOT_SET of the open-file limit, at most SLOT_SETS: a
    daemon allowed few fds needs them for its trees and clients more."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return StdioSlots()
    return StdioSlots(max(1, min(SLOT_SETS, soft // FDS_PER_SLOT_SET)))


def _strings(items: Sequence[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    """A NULL-terminated char*[]; the caller keeps it alive across the call."""
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def executable_candidates(program: str, env: Mapping[str, str]) -> list[bytes]:
    """Where exec looks for `program`: itself if it names a path, else each
    directory of the child's PATH in turn (as subprocess and execvpe do)."""
    return list(_candidates(program, env.get("PATH")))


@functools.lru_cache(maxsize=256)
def _candidates(program: str, path: str | None) -> tuple[bytes, ...]:
    if os.path.dirname(program):
        return (os.fsencode(program),)
    directories = os.get_exec_path({} if path is None else {"PATH": path})
    return tuple(os.path.join(os.fsencode(directory), os.fsencode(program)) for directory in directories)


def _encode(text: str) -> bytes:
    # What os.fsencode does, without its per-call type checks: environments
    # have dozens of entries.
    return text.encode(_FS_ENCODING, "surrogateescape")


class Environment:
    """An environment prepared for many spawns. The entries every spawn
    shares are encoded once into a C array that keeps a slot for each of the
    `own` keys, whose values each spawn brings (an `own` key in `shared` is
    left out: the spawn's value wins). Encoding a few dozen entries and
    building the array is tens of microseconds of a cold spawn otherwise.

    A spawn fills the slots in place, and the array is the child's until it
    has exec'd: a `Launch` still pending holds it (`lend`), and spawns
    meanwhile get a copy. Not thread-safe (the daemon spawns on its trio
    thread).
"""

    def __init__(self, shared: Mapping[str, str], own: Sequence[str]) -> None:
        if "PATH" in own:
            raise ValueError("PATH must be shared: executables are looked up in it once, not per spawn")
        entries = [_encode(f"{key}={value}") for key, value in shared.items() if key not in own]
        self.path = shared.get("PATH")
        self._own = tuple(own)
        self._first_own = len(entries)
        self._array = (ctypes.c_char_p * (len(entries) + len(own) + 1))(*entries)
        self._paths: dict[str, ctypes.Array[ctypes.c_char_p]] = {}
        # Whether a pending child reads the array.
        self._lent = False

    def filled(self, values: Sequence[str]) -> ctypes.Array[ctypes.c_char_p]:
        """The array with the `own` keys set to `values`, in order: the
        prepared one, or a copy of it while that one is lent. A copy points
        at the shared entries of the prepared array: keep this Environment
        alive as long as the copy is used."""
        array = self._array
        if self._lent:
            array = type(array)()
            ctypes.memmove(array, self._array, ctypes.sizeof(array))
        for index, (key, value) in enumerate(zip(self._own, values, strict=True)):
            array[self._first_own + index] = _encode(f"{key}={value}")
        return array

    def lend(self, array: ctypes.Array[ctypes.c_char_p]) -> bool:
        """`array` (from `filled`) is a pending child's until `give_back`.
        Whether it was the prepared one (only that one needs giving back)."""
        if array is not self._array:
            return False
        self._lent = True
        return True

    def give_back(self) -> None:
        self._lent = False

    def candidates(self, program: str) -> ctypes.Array[ctypes.c_char_p]:
        """`executable_candidates` for this environment's PATH, as a C array."""
        paths = self._paths.get(program)
        if paths is None:
            paths = _strings(_candidates(program, self.path))
            if len(self._paths) < PATHS_KEPT:
                self._paths[program] = paths
        return paths


def spawn(argv: Sequence[str], **options: Any) -> tuple[int, int]:
    """Start `argv` and return its pid and start time (clock ticks after boot,
    as in /proc/<pid>/stat; 0 when the clock around the call crossed a tick
    and /proc must tell) once it has exec'd: `launch` with no bound on the
    wait (the caller sleeps until exec, like posix_spawn; CLONE_VFORK).
    `options` are `launch`'s but `wait_ns`."""
    pid, start_time, _ = launch(argv, wait_ns=None, **options)
    return pid, start_time


class Launch:
    """A child of `launch` that had not exec'd when `launch` returned. It
    keeps what the child still reads (its stack and job, its arguments, its
    set of stdio slots, a lent Environment) until `settle` sees it exec or
    fail; and the module keeps every unsettled Launch (`_unsettled`), so that
    a caller that drops one (a bug, an exception on its way) leaks it rather
    than frees memory a running child reads."""

    def __init__(
        self, pid: int, slot: int, keep: tuple[object, ...], *, slots_index: int | None,
        environment: Environment | None, failure: Callable[[int, int, int], OSError],
    ) -> None:
        self.pid = pid
        self._slot: int | None = slot
        self._keep = keep
        self._slots_index = slots_index
        self._environment = environment
        self._failure = failure
        _unsettled.add(self)

    @property
    def settled(self) -> bool:
        return self._slot is None

    def settle(self, wait_ns: int = 0) -> bool:
        """Whether the child has exec'd, waiting for it at most `wait_ns`
        (0: just look); False while it has not. Raises what `spawn` raises
        if it failed before exec (it has been reaped). True once settled."""
        if self._slot is None:
            return True
        library = load()
        assert library is not None, "a Launch exists only where the library loaded"
        stage, error, failed_index = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(-1)
        if not library.adapter_spawn_settle(
            self._slot, self.pid, wait_ns, ctypes.byref(stage), ctypes.byref(error), ctypes.byref(failed_index)
        ):
            return False
        _give_back_child_slot(library, self._slot)
        self._slot = None
        self._keep = ()
        _unsettled.discard(self)
        if self._environment is not None:
            self._environment.give_back()
        if self._slots_index is not None:
            with contextlib.suppress(OSError):
                # A set that cannot be reset stays taken: one fewer for later
                # spawns. The child's outcome is the answer either way.
                stdio_slots().give_back(self._slots_index)
        if stage.value != STAGE_NONE:
            raise self._failure(stage.value, error.value, failed_index.value)
        return True


# Every Launch not settled yet (see Launch).
_unsettled: set[Launch] = set()


# Freed child slots kept for reuse (addresses; see SPARE_CHILD_SLOTS).
_spare_child_slots: list[int] = []


def _take_child_slot(library: ctypes.CDLL) -> int | None:
    try:
        return _spare_child_slots.pop()
    except IndexError:
        return library.adapter_spawn_slot_new() or None


def _give_back_child_slot(library: ctypes.CDLL, slot: int) -> None:
    if len(_spare_child_slots) < SPARE_CHILD_SLOTS:
        _spare_child_slots.append(slot)
    else:
        library.adapter_spawn_slot_free(slot)


def launch(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | Environment,
    env_values: Sequence[str] = (),
    cwd: str | None,
    stdio: tuple[int, int, int],
    cgroup_fd: int | None,
    new_session: bool = True,
    identity: Identity | None = None,
    wait_ns: int | None,
) -> tuple[int, int, Launch | None]:
    """Start `argv`, and return its pid, its start time (as `spawn`'s) and
    None once it has exec'd, or a `Launch` if it has not within `wait_ns`
    (None: no bound, as `spawn`), which says later whether it does (and
    raises then what this would have raised). `env` is the child's whole
    environment, or an `Environment` whose own keys get `env_values` (given
    only with one). `stdio` are the fds for the child's 0, 1 and 2 (the
    caller's again when this returns, pending or not); every other fd is
    closed in the child; signal handlers and the signal mask start out
    default. `identity` (after chdir, before exec) sets the child's limits,
    umask, no_new_privs and ids; its failure is a SetupFailed. Raises
    `Unsupported` (no child was created) or OSError with the errno of the
    failed step, naming `cwd` or the program as its filename; a child that
    failed is reaped. A pending child is not ours to reap until its `Launch`
    has settled (one that fails before exec is reaped by `Launch.settle`)."""
    library = load()
    if library is None:
        raise Unsupported(errno.ENOSYS, "the clone3 spawner is not built")
    if isinstance(env, Environment):
        paths = env.candidates(argv[0])
        environment = env.filled(env_values)
    elif env_values:
        raise ValueError("env_values fill an Environment's own keys; this environment is a plain mapping")
    else:
        paths = _strings(_candidates(argv[0], env.get("PATH")))
        environment = _strings([_encode(f"{key}={value}") for key, value in env.items()])
    arguments = _strings([_encode(arg) for arg in argv])
    directory = None if cwd is None else os.fsencode(cwd)
    stage = ctypes.c_int(0)
    error = ctypes.c_int(0)
    start_time = ctypes.c_ulonglong(0)
    failed_index = ctypes.c_int(-1)
    identity_pointer = None if identity is None or identity.empty else ctypes.byref(identity.struct)
    slot = None if wait_ns is None else _take_child_slot(library)

    def attempt(fds: tuple[int, int, int], keep_below: int) -> int:
        return library.adapter_spawn(
            paths, arguments, environment, directory, (ctypes.c_int * 3)(*fds),
            -1 if cgroup_fd is None else cgroup_fd, keep_below, int(new_session), identity_pointer,
            slot, wait_ns or 0,
            ctypes.byref(stage), ctypes.byref(error), ctypes.byref(failed_index), ctypes.byref(start_time),
        )

    slots = stdio_slots()
    pid: int | None = None
    held = slots.take(stdio) if slots.usable else None
    if held is not None:
        index, placed = held
        pid = attempt(placed, slots.keep_below)
        if stage.value != STAGE_PENDING:
            slots.give_back(index)
            held = None
        if pid < 0 and stage.value == STAGE_CLOSE_FDS and error.value == errno.EINVAL:
            slots.usable = False  # no CLOSE_RANGE_UNSHARE: copy the whole table from now on
            pid = None
    if pid is None:
        # Every set in use, or no unsharing: the child gets a copy of the whole table.
        pid = attempt(stdio, 0)

    def failure(stage: int, error: int, failed_index: int) -> OSError:
        return _failure(stage, error, failed_index, argv=argv, cwd=cwd, identity=identity)

    if stage.value == STAGE_PENDING:
        assert slot is not None
        lent = isinstance(env, Environment) and env.lend(environment)
        pending = Launch(
            pid, slot, (paths, arguments, environment, env, directory, identity),
            slots_index=held[0] if held is not None else None,
            environment=env if lent and isinstance(env, Environment) else None, failure=failure,
        )
        return pid, start_time.value, pending
    if slot is not None:
        _give_back_child_slot(library, slot)
    if pid > 0:
        return pid, start_time.value, None
    raise failure(stage.value, error.value, failed_index.value)


def _failure(
    stage: int, error: int, failed_index: int, *, argv: Sequence[str], cwd: str | None, identity: Identity | None
) -> OSError:
    """What a spawn that failed at `stage` with `error` raises."""
    reason = os.strerror(error)
    if stage == STAGE_CLONE and error in UNSUPPORTED_ERRNOS:
        return Unsupported(error, f"clone3 refused: {reason}")
    if stage == STAGE_CLOSE_FDS and error == errno.ENOSYS:
        return Unsupported(error, f"close_range refused: {reason}")
    if stage in SETUP_STAGES and identity is not None:
        return SetupFailed(error, identity.describe_failure(stage, error, failed_index))
    filename = cwd if stage == STAGE_CWD else argv[0] if stage == STAGE_EXEC else None
    return OSError(error, f"{reason} ({_STAGE_NAMES.get(stage, 'spawning')})", filename)
