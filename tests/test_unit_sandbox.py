"""The shipped service unit is hardened (`systemd-analyze security` rates it
OK) and the daemon still does all of its work inside that sandbox: its
capability bounding set, its system call filter, no-new-privileges and its
umask, rebuilt by tests/sandbox.py around a real daemon."""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor.procs import process
from tests.conftest import PYTHON, read_pidfile, tree_adapter, wait_all_gone
from tests.sandbox import UNIT, capability_names, service_settings, unit_sandbox_prefix
from tests import users
from tests.users import SystemUser

# What issue-level hardening asks of the shipped unit: "OK" in systemd's own
# rating, which starts at 4.0 and below.
MAX_EXPOSURE = 4.0
# The capabilities the daemon uses, each for one thing (the unit says which).
DAEMON_CAPABILITIES = {"kill", "setuid", "setgid", "sys_resource"}
STOP_TIMEOUT = 2.0
# A gid no account of a test host uses, for the socket file.
SOCKET_GID = 61030

# The fixtures, under the names the tests take them by.
public_dir = users.public_dir
test_user = users.test_user
# Other users may not be able to run the venv's interpreter; the tree needs
# only the standard library.
SYSTEM_PYTHON = "/usr/bin/python3"
TREE = str(Path(__file__).parent / "adapters" / "tree.py")

# Where the host has cgroup v2 (tests/test_cgroup.py says which hosts do).
CGROUP2_ROOT = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() else Path("/sys/fs/cgroup")
MODES = [pytest.param("delegated", id="cgroup"), pytest.param("off", id="process-table")]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="rebuilding the unit's sandbox drops root's capabilities")


def test_the_service_is_rated_ok_by_systemd_analyze_security() -> None:
    output = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


def test_the_service_keeps_only_the_capabilities_the_daemon_uses() -> None:
    settings = service_settings()
    assert set(capability_names(settings["CapabilityBoundingSet"])) == DAEMON_CAPABILITIES
    assert settings["AmbientCapabilities"] == ""


@needs_root
def test_the_sandbox_prefix_really_takes_capabilities_and_system_calls_away(tmp_path: Path) -> None:
    # The rebuilt sandbox must bite, or the daemon test below proves nothing:
    # a chown to another group needs CAP_CHOWN (not kept), and mount(2) is
    # outside @system-service (refused with EPERM, not a kill).
    target = tmp_path / "file"
    target.write_text("x")
    probe = (
        "import ctypes, os, sys\n"
        "try:\n    os.chown(sys.argv[1], -1, 4321)\nexcept PermissionError:\n    print('chown refused')\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "rc = libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)\n"
        "print('mount', rc, os.strerror(ctypes.get_errno()))\n"
        "print('umask', oct(os.umask(0)))\n"
    )
    done = subprocess.run([*unit_sandbox_prefix(), PYTHON, "-c", probe, str(target)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["chown refused", "mount -1 Operation not permitted", "umask 0o77"]


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_the_daemon_does_its_work_inside_the_units_sandbox(cgroup_setting, start_daemon, tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "pids"
    socket_path = str(tmp_path / "control.sock")
    daemon = start_daemon(
        tree_adapter("tree", pidfile=pidfile, stop_timeout=STOP_TIMEOUT),
        command_prefix=unit_sandbox_prefix(),
        socket=socket_path,
        socket_group=SOCKET_GID,
        cgroup=cgroup_setting(mode),
    )
    assert daemon.client().status()["daemon"]["cgroup_mode"] is (mode == "delegated")
    # socket_group without CAP_CHOWN: the file is created with that group.
    info = os.stat(socket_path)
    assert (info.st_gid, stat.S_IMODE(info.st_mode)) == (SOCKET_GID, 0o660)
    # (Less where this host's own bounding set lacks one: containers often
    # run without CAP_SYS_RESOURCE.)
    expected = DAEMON_CAPABILITIES & _capabilities(os.getpid(), "CapBnd")
    assert _capabilities(daemon.pid) == expected
    client = daemon.client()
    lease = client.acquire("job-1", "tree")
    members = read_pidfile(pidfile)
    assert lease.pid == members["root"].pid
    # The daemon and its adapters are filtered and may gain no privileges.
    for pid in (daemon.pid, members["grandchild"].pid):
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^Seccomp:\s*2$", status, re.M) and re.search(r"^NoNewPrivs:\s*1$", status, re.M), status
    assert client.sweep(deep=True)["orphans"] == []
    assert client.status()["instances"][0]["refcount"] == 1
    # An upgrade re-executes inside the same sandbox and keeps the tree.
    upgraded = client.upgrade()
    assert upgraded["pid"] == daemon.pid
    assert all(not process.is_gone(member, our_pid=daemon.pid) for member in members.values())
    assert _capabilities(daemon.pid) == expected
    # Release stops the whole tree, the setsid escapee included.
    client.release(lease)
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 2.0) == {}
    assert daemon.stop() == 0


# Bits of the capabilities named here (linux/capability.h).
CAPABILITY_BITS = {"chown": 0, "kill": 5, "setgid": 6, "setuid": 7, "sys_ptrace": 19, "sys_admin": 21, "sys_resource": 24}


@pytest.fixture
def cgroup_setting() -> Iterator[Callable[[str], str]]:
    """`cgroup_setting(mode)`: the daemon's `cgroup` setting for "off", or for
    "delegated" a cgroup made for the test and given to root, as systemd's
    Delegate=yes gives the unit's subtree to the service's user: inside the
    sandbox the daemon has no CAP_DAC_OVERRIDE, so a hierarchy root that only
    capabilities let root write (mode 0555 on some hosts) is not its to use.
    Removed, with what the daemon left in it, at the end."""
    made: list[Path] = []

    def setting(mode: str) -> str:
        if mode == "off":
            return "off"
        if not os.access(CGROUP2_ROOT / "cgroup.procs", os.W_OK):
            pytest.skip(f"no writable cgroup v2 hierarchy at {CGROUP2_ROOT}")
        path = CGROUP2_ROOT / f"sandbox-test-{secrets.token_hex(4)}"
        path.mkdir(mode=0o755)
        made.append(path)
        return str(path)

    yield setting
    for path in made:
        for directory in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            directory.rmdir()
        path.rmdir()


def _capabilities(pid: int, which: str = "CapEff") -> set[str]:
    """The names of the capabilities in `pid`'s set `which`, from /proc; for
    the daemon, any capability not named in CAPABILITY_BITS fails the test."""
    mask = int(re.search(rf"^{which}:\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M).group(1), 16)
    present = {name for name, bit in CAPABILITY_BITS.items() if mask >> bit & 1}
    if which == "CapEff":
        assert mask & ~sum(1 << bit for bit in CAPABILITY_BITS.values()) == 0, f"unexpected capabilities in {mask:#x}"
    return present


@needs_root
@pytest.mark.parametrize("mode", MODES)
def test_a_tree_of_another_user_is_run_watched_and_reaped_inside_the_units_sandbox(
    cgroup_setting, test_user: SystemUser, start_daemon, public_dir: Path, mode: str
) -> None:
    # The daemon inside the sandbox has no CAP_SYS_PTRACE (nor DAC
    # overrides): it cannot read the environment of the user's processes.
    # It must still start the tree as the user, count every member as the
    # instance's (a deep sweep finds no orphan), keep it through an upgrade
    # and stop all of it, the setsid escapee included.
    pidfile = public_dir / "tree.pids"
    command = [SYSTEM_PYTHON, TREE, "--pidfile", str(pidfile)]
    adapter = (
        f"[adapters.tree]\ncommand = {json.dumps(command)}\nuser = {json.dumps(test_user.name)}\n"
        f"stop_timeout = {STOP_TIMEOUT}\n"
    )
    daemon = start_daemon(adapter, command_prefix=unit_sandbox_prefix(), cgroup=cgroup_setting(mode), sweep_interval=0.3)
    client = daemon.client()
    assert client.status()["daemon"]["cgroup_mode"] is (mode == "delegated")
    lease = client.acquire("job-1", "tree")
    members = read_pidfile(pidfile)
    assert {Path(f"/proc/{m.pid}").stat().st_uid for m in members.values()} == {test_user.uid}
    time.sleep(1.0)  # a few periodic sweeps
    assert client.sweep(deep=True)["orphans"] == []
    periodic = [r for r in client.reports(limit=20) if r["kind"] == "periodic"]
    assert periodic and all(r["orphans"] == [] for r in periodic), [r["orphans"] for r in periodic]
    assert all(not process.is_gone(member, our_pid=daemon.pid) for member in members.values())
    assert client.upgrade()["pid"] == daemon.pid
    assert all(not process.is_gone(member, our_pid=daemon.pid) for member in members.values())
    client.release(lease)
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 2.0) == {}
