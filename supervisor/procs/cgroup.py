"""One cgroup v2 per adapter instance: find every process of a tree, kill them all.

A process cannot leave its cgroup by forking, calling setsid() or being re-parented,
so an instance cgroup holds the whole tree however it daemonises, and writing "1" to
its cgroup.kill ends every process in it at once.

Layout. The daemon manages one *delegated* cgroup D, found from its own cgroup
(/proc/self/cgroup) inside a writable cgroup v2 mount:

* D is the hierarchy root (the daemon sits in the root cgroup, as on hosts that mount
  v2 at /sys/fs/cgroup/unified next to v1 controllers and use only those): the root is
  exempt from the "no internal processes" rule, so the daemon stays where it is and
  instances live in ``D/<name>/<instance_id>``.
* D is any other cgroup (systemd ``Delegate=yes`` service, a container's namespace
  root): the kernel refuses to enable controllers for the children of a cgroup that
  has processes of its own, and systemd requires delegated subtrees to keep processes
  in leaves only. So the daemon moves itself into the leaf ``D/<name>-daemon`` and
  instances live in ``D/<name>/<instance_id>``. A later detection from inside that
  leaf recognises it and uses its parent as D again.

With an explicit root, instances live in ``<explicit_root>/<name>/<instance_id>`` and
the daemon is not moved; making that directory legal is the operator's job.

Everything here is synchronous file-system work on cgroupfs (detection also starts and
kills one throw-away child process). Linux only; no module state.
"""

from __future__ import annotations

import errno
import functools
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import msgspec

from supervisor.procs import process

CGROUP2_FSTYPE = "cgroup2"

# Where a cgroup v2 hierarchy is usually mounted, best first: the unified layout of
# current distributions, then the v2 part of the older hybrid layout.
PREFERRED_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")

# Names starting with a dot are ours for probing and never instance ids, so that
# `instances()` cannot mistake a probe left by a crash for an adapter.
PROBE_PREFIX = ".probe-"

# The longest file name Linux accepts (NAME_MAX).
MAX_NAME_BYTES = 255

# Upper bound on kill passes over a cgroup without cgroup.kill (kernels before 5.14):
# each pass signals only pids not seen before and a pass that finds none ends the
# loop, so this only bounds work against a tree that forks as fast as we kill.
FALLBACK_KILL_PASSES = 64

# The probe process is SIGKILLed at once; if it is not dead after this long, the
# kill mechanism does not work here.
PROBE_KILL_TIMEOUT = 2.0

# rmdir of a cgroup whose last process was just reaped should succeed at once; allow
# this many 1 ms retries in case the kernel lags, so that a probe cgroup that stays
# busy fails detection promptly instead of holding up start-up.
PROBE_RMDIR_RETRIES = 20

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class CgroupUnavailable(Exception):
    """No usable cgroup v2 hierarchy; `reason` says why, for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Mount(msgspec.Struct, frozen=True, gc=False):
    """One line of /proc/self/mountinfo, reduced to what detection needs."""

    mount_point: str
    root: str  # the path inside the file system that is mounted there
    fstype: str
    read_only: bool


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/<pid>/mountinfo text (see proc(5)); malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        if not sep:
            continue
        fields = before.split()
        tail = after.split()
        if len(fields) < 6 or len(tail) < 3:
            continue
        options = set(fields[5].split(",")) | set(tail[2].split(","))
        mounts.append(
            Mount(
                mount_point=_unescape(fields[4]),
                root=_unescape(fields[3]),
                fstype=tail[0],
                read_only="ro" in options,
            )
        )
    return mounts


def parse_unified_cgroup(text: str) -> str | None:
    """Return the cgroup v2 path from /proc/<pid>/cgroup text (the "0::<path>" line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _read_text(path: str | pathlib.Path) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def write_value(path: pathlib.Path, data: bytes) -> None:
    """Write one value to a cgroupfs file. Raises OSError as write(2) does."""
    # cgroupfs takes one value per write(2) call, so no buffered file objects.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _mount_containing(path: str, mounts: list[Mount]) -> Mount | None:
    # The deepest mount point above `path`; of equal ones the last mounted hides the others.
    best = None
    for mount in mounts:
        point = mount.mount_point
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best


def _cgroup_path_of(directory: pathlib.Path, mounts: list[Mount]) -> str | None:
    """The path of `directory` as /proc/<pid>/cgroup names it, or None if not cgroup v2."""
    real = os.path.realpath(directory)
    mount = _mount_containing(real, mounts)
    if mount is None or mount.fstype != CGROUP2_FSTYPE:
        return None
    relative = os.path.relpath(real, mount.mount_point)
    if relative == ".":
        return mount.root
    return os.path.normpath(os.path.join(mount.root, relative))


def _directory_of(cgroup_path: str, mount: Mount) -> pathlib.Path | None:
    """The directory of `cgroup_path` under `mount`, or None if the mount does not show it."""
    root = mount.root.rstrip("/")
    if cgroup_path != mount.root and not cgroup_path.startswith(root + "/"):
        return None
    relative = cgroup_path[len(root) :].lstrip("/")
    return pathlib.Path(mount.mount_point, relative)


def _check_name(kind: str, name: str) -> None:
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or "\0" in name
        or len(os.fsencode(name)) > MAX_NAME_BYTES
    ):
        raise ValueError(f"{kind} {name!r} cannot be a cgroup name")


def _pids_under(path: pathlib.Path) -> list[int]:
    found: set[int] = set()
    # Sub-cgroups may appear or vanish while we walk; os.walk skips what it cannot list.
    for dirpath, _dirnames, _filenames in os.walk(path):
        try:
            text = _read_text(os.path.join(dirpath, "cgroup.procs"))
        except FileNotFoundError:
            continue
        except OSError as exc:
            # A cgroup removed between open and read answers ENODEV: it is
            # gone, and so are its processes.
            if exc.errno == errno.ENODEV:
                continue
            raise
        found.update(int(line) for line in text.split())
    return sorted(found)


def _remove_tree(path: pathlib.Path) -> bool:
    for dirpath, _dirnames, _filenames in os.walk(path, topdown=False):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            raise
    return True


def _remove_soon(path: pathlib.Path) -> bool:
    for _ in range(PROBE_RMDIR_RETRIES):
        if _remove_tree(path):
            return True
        time.sleep(0.001)
    return False


def _kill_each(path: pathlib.Path) -> None:
    signalled: set[int] = set()
    for _ in range(FALLBACK_KILL_PASSES):
        fresh = [pid for pid in _pids_under(path) if pid not in signalled]
        if not fresh:
            return
        for pid in fresh:
            proc = process.identify(pid)
            if proc is not None:
                process.signal_process(proc, signal.SIGKILL)
        signalled.update(fresh)


def _kill(path: pathlib.Path) -> None:
    try:
        write_value(path / "cgroup.kill", b"1")
    except FileNotFoundError:
        if path.is_dir():
            _kill_each(path)


@dataclass
class CgroupManager:
    """The instance cgroups under `base`, a cgroup v2 directory the daemon owns.

    Instance ids become directory names: they must be non-empty, at most 255 bytes,
    contain no '/' or NUL and not start with '.'; methods raise ValueError otherwise.
    """

    base: pathlib.Path

    @classmethod
    def detect(
        cls, *, explicit_root: str | None = None, name: str = "adapter-supervisor"
    ) -> CgroupManager:
        """Find a writable cgroup v2 hierarchy, set up the layout (module docstring), probe it.

        The probe creates a cgroup, moves a short-lived child process into it, kills
        it through cgroup.kill and removes the cgroup again, so a manager returned
        here is known to work. May move the calling process into the
        ``<name>-daemon`` leaf (see the module docstring).

        Raises CgroupUnavailable, with the reason, when there is no cgroup v2
        hierarchy, it is read-only or not delegated to us, or the probe fails.
        """
        _check_name("cgroup name", name)
        try:
            mounts = parse_mountinfo(_read_text("/proc/self/mountinfo"))
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read /proc/self/mountinfo: {exc.strerror}") from exc
        if explicit_root is not None:
            manager = cls(_explicit_base(explicit_root, name, mounts))
            manager._probe()
            return manager
        return cls._detect_delegated(name, mounts)

    @classmethod
    def _detect_delegated(cls, name: str, mounts: list[Mount]) -> CgroupManager:
        try:
            own = parse_unified_cgroup(_read_text("/proc/self/cgroup"))
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read /proc/self/cgroup: {exc.strerror}") from exc
        if own is None:
            raise CgroupUnavailable("this process is in no cgroup v2 hierarchy")

        def preference(mount: Mount) -> int:
            point = mount.mount_point
            return PREFERRED_MOUNTS.index(point) if point in PREFERRED_MOUNTS else len(PREFERRED_MOUNTS)

        candidates = sorted((m for m in mounts if m.fstype == CGROUP2_FSTYPE), key=preference)
        if not candidates:
            raise CgroupUnavailable("no cgroup v2 file system is mounted")
        reasons = []
        for mount in candidates:
            try:
                manager = cls(_delegated_base(own, mount, name))
                manager._probe()
            except CgroupUnavailable as exc:
                reasons.append(f"{mount.mount_point}: {exc.reason}")
                continue
            return manager
        raise CgroupUnavailable("; ".join(reasons))

    def _probe(self) -> None:
        try:
            self.base.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {self.base}: {exc.strerror}") from exc
        probe = self.base / f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            probe.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create a cgroup in {self.base}: {exc.strerror}") from exc
        try:
            _probe_join_and_kill(probe)
        except OSError as exc:
            raise CgroupUnavailable(f"probing {probe} failed: {exc}") from exc
        finally:
            try:
                removed = _remove_soon(probe)
            except OSError:
                removed = False
        if not removed:
            raise CgroupUnavailable(f"{probe} stays busy after its process was killed")

    def _path(self, instance_id: str) -> pathlib.Path:
        _check_name("instance id", instance_id)
        return self.base / instance_id

    def create(self, instance_id: str) -> pathlib.Path:
        """Create the cgroup of `instance_id` (no error if it exists) and return its path.

        Raises FileExistsError if a non-directory of that name is in the way (a
        cgroup interface file), OSError for anything else the kernel refuses.
        """
        path = self._path(instance_id)
        path.mkdir(exist_ok=True)
        return path

    def open_dir(self, instance_id: str) -> int:
        """`create` then `dir_fd`, in one system call when the cgroup exists
        already (a spare made ahead). The caller closes the fd. Raises
        NotADirectoryError if a non-directory of that name is in the way,
        OSError for anything else the kernel refuses."""
        path = os.fspath(self._path(instance_id))
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        try:
            os.mkdir(path)
        except FileExistsError:
            pass  # made meanwhile; the open says whether it is a directory
        return os.open(path, flags)

    def join_fd(self, instance_id: str) -> int:
        """Open the instance's cgroup.procs for writing and return the fd (close-on-exec).

        A freshly forked child joins the cgroup by writing b"0" to it before exec
        (for example in a subprocess `preexec_fn`), so not one instruction of the
        adapter runs outside it. The caller closes the fd after spawning. Raises
        FileNotFoundError if the cgroup was not created.
        """
        return os.open(self._path(instance_id) / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    def dir_fd(self, instance_id: str) -> int:
        """Open the instance's cgroup directory and return the fd (close-on-exec),
        for clone3's CLONE_INTO_CGROUP: a child created with it is born in the
        cgroup. The caller closes it. Raises FileNotFoundError if the cgroup was
        not created."""
        return os.open(self._path(instance_id), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def add(self, instance_id: str, pid: int) -> None:
        """Move process `pid` (all its threads) into the instance's cgroup.

        Raises ProcessLookupError if it does not exist, FileNotFoundError if the
        cgroup does not, other OSError if the kernel refuses the move.
        """
        write_value(self._path(instance_id) / "cgroup.procs", str(pid).encode())

    def pids(self, instance_id: str) -> list[int]:
        """Pids in the instance's cgroup and in every sub-cgroup the adapter made, sorted.

        Empty if the cgroup does not exist. A process that has exited is not listed,
        even before it is reaped. Raises OSError if a cgroup.procs that exists
        cannot be read (a cgroup removed meanwhile counts as empty).
        """
        return _pids_under(self._path(instance_id))

    def kill(self, instance_id: str) -> None:
        """SIGKILL every process in the instance's cgroup and its sub-cgroups.

        Uses cgroup.kill, which also catches processes forked during the kill. On
        kernels without it, each pid is signalled through `process.signal_process`
        until a pass finds no new pid. Does nothing if the cgroup does not exist.
        Returns without waiting for the processes to die; see `populated`.
        Raises OSError if the kernel refuses the kill.
        """
        _kill(self._path(instance_id))

    def populated(self, instance_id: str) -> bool:
        """True while a live process is in the instance's cgroup or a sub-cgroup.

        False if the cgroup does not exist. Raises OSError for any other failure
        to read its cgroup.events.
        """
        try:
            text = _read_text(self._path(instance_id) / "cgroup.events")
        except FileNotFoundError:
            return False
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "populated":
                return value.strip() == "1"
        return False

    def remove(self, instance_id: str) -> bool:
        """Remove the instance's cgroup, sub-cgroups first.

        Returns True once it is gone (also if it never existed), False if it is busy
        because a process is still in it. Raises OSError for other failures.
        """
        return _remove_tree(self._path(instance_id))

    def remove_base(self) -> bool:
        """Remove `base` if no instance cgroup is left in it (at daemon exit).
        Returns whether it is gone; never raises for a busy or missing base,
        raises OSError for any other failure."""
        try:
            self.base.rmdir()
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise
        return True

    def instances(self) -> list[str]:
        """Names of the instance cgroups under `base`, sorted (for start-up sweeps).

        Empty if `base` does not exist; raises OSError if it cannot be listed.
        """
        try:
            entries = list(os.scandir(self.base))
        except FileNotFoundError:
            return []
        return sorted(
            entry.name
            for entry in entries
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
        )

    def instance_of(self, pid: int) -> str | None:
        """The instance whose cgroup (or a sub-cgroup of it) holds `pid`, or None.

        None also when `pid` is gone or is in no cgroup under `base`. Raises
        OSError if /proc cannot be read (the first call reads the mount table).
        """
        base_path = self._base_cgroup_path
        if base_path is None:
            return None
        try:
            own = parse_unified_cgroup(_read_text(f"/proc/{pid}/cgroup"))
        except (FileNotFoundError, ProcessLookupError):
            return None
        prefix = base_path.rstrip("/") + "/"
        if own is None or not own.startswith(prefix):
            return None
        return own[len(prefix) :].split("/", 1)[0] or None

    @functools.cached_property
    def _base_cgroup_path(self) -> str | None:
        # `base` as /proc/<pid>/cgroup names it, relative to our cgroup namespace.
        return _cgroup_path_of(self.base, parse_mountinfo(_read_text("/proc/self/mountinfo")))


def _explicit_base(explicit_root: str, name: str, mounts: list[Mount]) -> pathlib.Path:
    root = os.path.realpath(explicit_root)
    mount = _mount_containing(root, mounts)
    if mount is None or mount.fstype != CGROUP2_FSTYPE:
        raise CgroupUnavailable(f"{explicit_root} is not on a cgroup v2 file system")
    if mount.read_only:
        raise CgroupUnavailable(f"{explicit_root} is on a read-only mount")
    if not os.path.isfile(os.path.join(root, "cgroup.procs")):
        raise CgroupUnavailable(f"{explicit_root} is not a cgroup directory")
    return pathlib.Path(root, name)


def _delegated_base(own: str, mount: Mount, name: str) -> pathlib.Path:
    """Apply the layout of the module docstring; may move this process into its leaf."""
    if mount.read_only:
        raise CgroupUnavailable("mounted read-only")
    own_dir = _directory_of(own, mount)
    if own_dir is None or not os.path.isdir(own_dir):
        raise CgroupUnavailable(f"our cgroup {own} is not visible in this mount")
    leaf_name = f"{name}-daemon"
    delegated = own_dir
    if own_dir.name == leaf_name and own_dir != pathlib.Path(mount.mount_point):
        delegated = own_dir.parent
    # Only the hierarchy root lacks cgroup.type.
    if os.path.exists(delegated / "cgroup.type"):
        leaf = delegated / leaf_name
        try:
            leaf.mkdir(exist_ok=True)
            write_value(leaf / "cgroup.procs", str(os.getpid()).encode())
        except OSError as exc:
            raise CgroupUnavailable(f"cannot move the daemon into {leaf}: {exc.strerror}") from exc
    return delegated / name


def _probe_join_and_kill(probe: pathlib.Path) -> None:
    """Move a throw-away child into `probe`, kill it via the cgroup, and reap it."""
    try:
        # Any exec will do; it blocks on stdin and is killed long before it gets there.
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError as exc:
        raise CgroupUnavailable(f"cannot start a probe process: {exc.strerror}") from exc
    try:
        try:
            write_value(probe / "cgroup.procs", str(child.pid).encode())
        except OSError as exc:
            raise CgroupUnavailable(f"cannot move a process into {probe}: {exc.strerror}") from exc
        if child.pid not in _pids_under(probe):
            raise CgroupUnavailable(f"a process moved into {probe} is not listed there")
        try:
            _kill(probe)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot kill the processes of {probe}: {exc.strerror}") from exc
        try:
            child.wait(timeout=PROBE_KILL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise CgroupUnavailable(f"killing {probe} did not end its process") from exc
    finally:
        if child.returncode is None:
            child.kill()
            child.wait()
        child.stdin.close()
