"""cgroup: detection, joining, listing, killing and removing real instance cgroups.

Every cgroup a test creates lives under a base with a random name and is removed in
a `finally`, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from supervisor.procs import cgroup
from supervisor.procs import process
from supervisor.procs.cgroup import CgroupManager, CgroupUnavailable, Mount
from tests.conftest import eventually

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# An adapter that daemonises: its middle process calls setsid(), forks a grandchild
# and exits, so the grandchild is re-parented away from the root (to PID 1 here).
# The root reaps the middle, prints the grandchild's pid and sleeps.
# The grandchild's pid is printed once the middle process is reaped, so that
# the cgroup then holds exactly the root and the grandchild.
DAEMONISING_ADAPTER = r"""
import os, time
read_end, write_end = os.pipe()
middle = os.fork()
if middle == 0:
    os.setsid()
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(60)
        os._exit(0)
    os.write(write_end, str(grandchild).encode())
    os._exit(0)
os.close(write_end)
grandchild = os.read(read_end, 32).decode()
os.waitpid(middle, 0)
print(grandchild, flush=True)
time.sleep(60)
"""



def v2_mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        mounts = cgroup.parse_mountinfo(f.read())
    return {m.mount_point for m in mounts if m.fstype == "cgroup2"}


def remove_base(manager: CgroupManager) -> None:
    """Kill whatever is left under `manager.base`, then remove it all."""
    for instance_id in manager.instances():
        manager.kill(instance_id)
        eventually(lambda: not manager.populated(instance_id))
        manager.remove(instance_id)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(manager.base)


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    found = CgroupManager.detect(name=f"test-{secrets.token_hex(6)}")
    try:
        yield found
    finally:
        remove_base(found)
    assert not found.base.exists()


def test_detect_finds_a_writable_v2_hierarchy(manager: CgroupManager) -> None:
    points = v2_mount_points()
    assert any(str(manager.base).startswith(point + "/") for point in points)
    if "/sys/fs/cgroup/unified" in points and "/sys/fs/cgroup" not in points:
        # This machine: v1 controllers on /sys/fs/cgroup, v2 beside them, and we sit
        # in the v2 root, so instances go straight under the mount.
        assert manager.base.parent == pathlib.Path("/sys/fs/cgroup/unified")
    assert (manager.base / "cgroup.procs").is_file()
    # The probe cleaned up after itself.
    assert not any(n.startswith(cgroup.PROBE_PREFIX) for n in os.listdir(manager.base))


def test_detect_is_fast_and_repeatable(manager: CgroupManager) -> None:
    started = time.perf_counter()
    again = CgroupManager.detect(name=manager.base.name)
    elapsed = time.perf_counter() - started
    assert again.base == manager.base
    # The budget is 50 ms; allow for a loaded test machine.
    assert elapsed < 0.25


def test_detect_refuses_a_directory_that_is_not_a_cgroup(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CgroupUnavailable) as excinfo:
        CgroupManager.detect(explicit_root=str(tmp_path))
    assert str(tmp_path) in excinfo.value.reason
    with pytest.raises(CgroupUnavailable):
        CgroupManager.detect(explicit_root=str(tmp_path / "missing"))
    assert os.listdir(tmp_path) == []


def test_detect_refuses_a_read_only_mount() -> None:
    mount = Mount(mount_point="/sys/fs/cgroup", root="/", fstype="cgroup2", read_only=True)
    with pytest.raises(CgroupUnavailable, match="read-only"):
        cgroup._delegated_base("/", mount, "x")


def test_detect_with_an_explicit_root() -> None:
    point = sorted(v2_mount_points())[0]
    name = f"test-{secrets.token_hex(6)}"
    manager = CgroupManager.detect(explicit_root=point, name=name)
    try:
        assert manager.base == pathlib.Path(point, name)
        assert manager.base.is_dir()
    finally:
        remove_base(manager)


def test_detect_moves_a_daemon_out_of_a_non_root_cgroup() -> None:
    """Run in a cgroup of its own, the daemon moves into a leaf beside the instances."""
    point = sorted(v2_mount_points())[0]
    outer = pathlib.Path(point, f"test-outer-{secrets.token_hex(6)}")
    name = "sv"
    script = (
        "import json, sys\n"
        "from supervisor.procs.cgroup import CgroupManager\n"
        "first = CgroupManager.detect(name='sv')\n"
        "own_first = open('/proc/self/cgroup').read()\n"
        "second = CgroupManager.detect(name='sv')\n"
        "own_second = open('/proc/self/cgroup').read()\n"
        "print(json.dumps([str(first.base), own_first, str(second.base), own_second]))\n"
    )
    outer.mkdir()
    try:
        fd = os.open(outer / "cgroup.procs", os.O_WRONLY)
        try:
            result = subprocess.run(
                [sys.executable, "-c", script],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=15,
                preexec_fn=lambda: os.write(fd, b"0"),
            )
        finally:
            os.close(fd)
        assert result.returncode == 0, result.stderr
        first, own_first, second, own_second = json.loads(result.stdout)
        outer_cgroup = "/" + outer.name  # this mount shows the hierarchy from its root
        assert first == second == str(outer / name)
        assert f"0::{outer_cgroup}/{name}-daemon\n" in own_first
        assert own_second == own_first
    finally:
        assert cgroup._remove_soon(outer)


def test_instance_ids_must_be_plain_names(manager: CgroupManager) -> None:
    for bad in ("", ".", "..", "../escape", "a/b", ".probe-1", "nul\0"):
        with pytest.raises(ValueError):
            manager.create(bad)
    with pytest.raises(FileExistsError):
        manager.create("cgroup.procs")
    for bad in ("..", "a/b"):
        with pytest.raises(ValueError):
            manager.open_dir(bad)
    with pytest.raises(NotADirectoryError):
        manager.open_dir("cgroup.procs")
    assert manager.instances() == []


def test_open_dir_makes_a_missing_cgroup_and_opens_an_existing_one(manager: CgroupManager) -> None:
    fresh = manager.open_dir("made-here")
    manager.create("made-before")
    ahead = manager.open_dir("made-before")
    try:
        assert sorted(manager.instances()) == ["made-before", "made-here"]
        for fd, name in ((fresh, "made-here"), (ahead, "made-before")):
            assert os.path.samestat(os.fstat(fd), os.stat(manager.base / name))
            assert os.get_inheritable(fd) is False
    finally:
        os.close(fresh)
        os.close(ahead)
        manager.remove("made-here")
        manager.remove("made-before")


@pytest.fixture
def adapter(manager: CgroupManager) -> Iterator[tuple[str, subprocess.Popen[str], int]]:
    """A daemonising adapter that joined its instance cgroup before exec."""
    instance_id = "inst-" + secrets.token_hex(4)
    manager.create(instance_id)
    fd = manager.join_fd(instance_id)
    try:
        root = subprocess.Popen(
            [sys.executable, "-c", DAEMONISING_ADAPTER],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.write(fd, b"0"),
        )
    finally:
        os.close(fd)
    grandchild = None
    try:
        grandchild = int(root.stdout.readline())
        yield instance_id, root, grandchild
    finally:
        manager.kill(instance_id)
        if root.poll() is None:
            root.kill()
        root.wait(timeout=5)
        root.stdout.close()
        if grandchild is not None:
            # PID 1 collects the grandchild's zombie; make sure it has before we end.
            eventually(lambda: process.read_stat(grandchild) is None or process.read_stat(grandchild).state != "Z")


def test_a_joined_tree_is_listed_killed_and_removed(manager: CgroupManager, adapter) -> None:
    instance_id, root, grandchild = adapter
    root_id = process.identify(root.pid)
    grandchild_id = process.identify(grandchild)
    assert process.read_stat(grandchild).ppid != root.pid
    assert os.getsid(grandchild) != os.getsid(root.pid)

    # The adapter makes a sub-cgroup of its own and moves the grandchild there.
    sub = manager.base / instance_id / "sub"
    sub.mkdir()
    (sub / "cgroup.procs").write_text(str(grandchild))

    assert manager.pids(instance_id) == sorted([root.pid, grandchild])
    assert manager.instance_of(root.pid) == instance_id
    assert manager.instance_of(grandchild) == instance_id
    assert manager.instance_of(os.getpid()) is None
    assert manager.instances() == [instance_id]
    assert manager.populated(instance_id)
    assert manager.remove(instance_id) is False
    assert sub.is_dir()

    manager.kill(instance_id)
    assert root.wait(timeout=5) == -signal.SIGKILL
    assert eventually(lambda: process.is_gone(grandchild_id, our_pid=os.getpid()))
    assert process.is_gone(root_id)
    assert manager.pids(instance_id) == []
    assert eventually(lambda: not manager.populated(instance_id))
    assert manager.remove(instance_id) is True
    assert not (manager.base / instance_id).exists()
    assert manager.instances() == []
    assert manager.remove(instance_id) is True
    assert manager.pids(instance_id) == []
    assert manager.populated(instance_id) is False
    manager.kill(instance_id)  # nothing left to kill: no error


def test_add_and_the_fallback_kill_without_cgroup_kill(manager: CgroupManager) -> None:
    instance_id = "fallback"
    manager.create(instance_id)
    sleepers = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        for proc in sleepers:
            manager.add(instance_id, proc.pid)
        assert manager.pids(instance_id) == sorted(p.pid for p in sleepers)
        assert manager.instance_of(sleepers[0].pid) == instance_id
        # What kill() does on kernels before 5.14, which have no cgroup.kill.
        cgroup._kill_each(manager.base / instance_id)
        assert [p.wait(timeout=5) for p in sleepers] == [-signal.SIGKILL] * 2
        assert manager.remove(instance_id)
    finally:
        for proc in sleepers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)


def test_add_of_a_missing_process_raises(manager: CgroupManager) -> None:
    manager.create("empty")
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=5)
    with pytest.raises(ProcessLookupError):
        manager.add("empty", proc.pid)
    with pytest.raises(FileNotFoundError):
        manager.join_fd("never-created")


def test_parse_mountinfo_and_cgroup_lines() -> None:
    text = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "41 31 0:38 /docker/ab /sys/fs/cgroup/uni\\040fied rw,nosuid shared:9 - cgroup2 cgroup2 rw\n"
        "42 31 0:39 / /mnt/ro ro,relatime - cgroup2 cgroup2 rw\n"
        "garbage\n"
    )
    assert cgroup.parse_mountinfo(text) == [
        Mount("/sys/fs/cgroup", "/", "tmpfs", False),
        Mount("/sys/fs/cgroup/uni fied", "/docker/ab", "cgroup2", False),
        Mount("/mnt/ro", "/", "cgroup2", True),
    ]
    assert cgroup.parse_unified_cgroup("4:memory:/x\n0::/a/b c\n") == "/a/b c"
    assert cgroup.parse_unified_cgroup("4:memory:/x\n") is None
    mount = Mount("/sys/fs/cgroup", "/docker/ab", "cgroup2", False)
    assert cgroup._directory_of("/docker/ab/svc", mount) == pathlib.Path("/sys/fs/cgroup/svc")
    assert cgroup._directory_of("/docker/ab", mount) == pathlib.Path("/sys/fs/cgroup")
    assert cgroup._directory_of("/docker/abc", mount) is None


def test_remove_base_removes_an_empty_base_and_keeps_a_busy_one(tmp_path) -> None:
    manager = CgroupManager.detect(name=f"test-remove-base-{os.getpid()}")
    try:
        manager.create("busy")
        assert manager.remove_base() is False and manager.base.exists()
        assert manager.remove("busy")
        assert manager.remove_base() is True and not manager.base.exists()
        assert manager.remove_base() is True
    finally:
        manager.remove("busy")
        manager.remove_base()
