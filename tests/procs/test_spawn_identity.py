"""Both spawners start a root as the adapter's user, with its groups, umask,
limits and no_new_privs, as /proc shows them; a step that fails is named in
the error and leaves no process behind. Real users (useradd) when root."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from supervisor.core.config import parse_config
from supervisor.core.errors import SpawnFailed
from supervisor.core.identity import credentials_of
from supervisor.procs import process
from supervisor.procs.spawner import spawn_root
from tests.conftest import eventually
from tests.procs.test_spawner import SPAWNERS, wait_for
from tests import users
from tests.users import SystemUser

# prctl(PR_CAPBSET_DROP, CAP_SETUID): a root process that execs after it
# cannot change its uid any more.
PR_CAPBSET_DROP = 24
CAP_SETUID = 7

# The fixtures, under the names the tests take them by.
test_user = users.test_user


def adapter(command: list[str], extra: str = "") -> object:
    return parse_config(f"[adapters.a]\ncommand = {json.dumps(command)}\n{extra}\n").adapters["a"]


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as file:
        return dict(line.rstrip("\n").split(":\t", 1) for line in file if ":\t" in line)


def limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/PID/limits: the limit's name -> (soft, hard)."""
    with open(f"/proc/{pid}/limits") as file:
        lines = file.read().splitlines()[1:]
    return {line[:26].strip(): (line[26:47].strip(), line[47:68].strip()) for line in lines}


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        entries = file.read().split(b"\0")
    return dict(entry.decode().split("=", 1) for entry in entries if b"=" in entry)


def exec_done(pid: int) -> bool:
    """Whether the child runs sleep with its environment in place (a vfork
    parent wakes before exec has laid out the new environment)."""
    try:
        return os.readlink(f"/proc/{pid}/exe").endswith("/sleep") and process.INSTANCE_ENV in environ(pid)
    except OSError:
        return False


@pytest.mark.parametrize("clone3", SPAWNERS)
def test_a_root_runs_as_the_user_with_its_groups_umask_limits_and_no_new_privs(clone3: bool, test_user: SystemUser) -> None:
    config = adapter(["/bin/sleep", "600"], textwrap.dedent(f"""
        user = "{test_user.name}"
        umask = "0027"
        limits = {{ nofile = 1234, core = 0, as = "3GiB", cpu = "unlimited" }}
        env = {{ LOGNAME = "kept" }}
    """))
    root = spawn_root(config, instance_id="inst-u", job="j", params={}, daemon_key="k", clone3=clone3)
    try:
        assert eventually(lambda: exec_done(root.pid))
        fields = status_fields(root.pid)
        assert fields["Uid"].split() == [str(test_user.uid)] * 4
        assert fields["Gid"].split() == [str(test_user.gid)] * 4
        assert set(fields["Groups"].split()) == {str(test_user.gid), str(test_user.extra_gid)}
        assert fields["Umask"] == "0027"
        assert fields["NoNewPrivs"] == "1"
        found = limits(root.pid)
        assert found["Max open files"] == ("1234", "1234")
        assert found["Max core file size"] == ("0", "0")
        assert found["Max address space"] == (str(3 * 2**30), str(3 * 2**30))
        assert found["Max cpu time"] == ("unlimited", "unlimited")
        env = environ(root.pid)
        assert (env["HOME"], env["USER"], env["LOGNAME"]) == (test_user.home, test_user.name, "kept")
        assert env[process.INSTANCE_ENV] == "inst-u"
    finally:
        os.kill(root.pid, signal.SIGKILL)
        wait_for(root)
        root.close_stdio()


@pytest.mark.parametrize("clone3", SPAWNERS)
def test_a_peer_root_runs_as_the_peer_given(clone3: bool, test_user: SystemUser) -> None:
    config = adapter(["/bin/sleep", "600"], 'user = "@peer"\nno_new_privileges = false')
    peer = credentials_of(test_user.uid, test_user.extra_gid)
    root = spawn_root(config, instance_id="inst-p", job="j", params={}, daemon_key="k", clone3=clone3, peer=peer)
    try:
        assert eventually(lambda: exec_done(root.pid))
        fields = status_fields(root.pid)
        assert fields["Uid"].split()[0] == str(test_user.uid)
        assert fields["Gid"].split()[0] == str(test_user.extra_gid)
        assert fields["NoNewPrivs"] == "0"
        assert environ(root.pid)["USER"] == test_user.name
    finally:
        os.kill(root.pid, signal.SIGKILL)
        wait_for(root)
        root.close_stdio()


@pytest.mark.parametrize("clone3", SPAWNERS)
def test_a_limit_above_what_the_daemon_may_set_fails_naming_the_call_and_leaves_nothing(clone3: bool) -> None:
    # Above fs.nr_open: no process, not even root, may have it.
    with open("/proc/sys/fs/nr_open") as file:
        too_many = int(file.read()) + 1
    config = adapter(["/bin/sleep", "600"], f"limits = {{ nofile = {too_many} }}")
    with pytest.raises(SpawnFailed) as failed:
        spawn_root(config, instance_id="inst-l", job="j", params={}, daemon_key="k", clone3=clone3)
    assert f"setrlimit(RLIMIT_NOFILE, {too_many}) failed: EPERM" in failed.value.message
    assert "adapter 'a' could not be started" in failed.value.message
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


# A child of the test that cannot setuid (CAP_SETUID dropped before its exec)
# spawns as another user, and reports what spawn_root raised.
CANNOT_SETUID = textwrap.dedent("""
    import json, os, sys
    from supervisor.core.config import parse_config
    from supervisor.core.errors import SpawnFailed
    from supervisor.procs.spawner import spawn_root
    config = parse_config(sys.argv[1]).adapters["a"]
    try:
        spawn_root(config, instance_id="inst-s", job="j", params={}, daemon_key="k", clone3=sys.argv[2] == "1")
        print(json.dumps({"spawned": True}))
    except SpawnFailed as exc:
        try:
            os.waitpid(-1, os.WNOHANG)
            left = True
        except ChildProcessError:
            left = False
        print(json.dumps({"error": exc.message, "child_left": left}))
""")


@pytest.mark.parametrize("clone3", SPAWNERS)
def test_a_setuid_that_fails_is_named_with_its_uid_and_leaves_nothing(clone3: bool, test_user: SystemUser) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def drop_setuid() -> None:
        if libc.prctl(PR_CAPBSET_DROP, CAP_SETUID, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")

    text = f'[adapters.a]\ncommand = ["/bin/sleep", "600"]\nuser = "{test_user.name}"\n'
    completed = subprocess.run(
        [sys.executable, "-c", CANNOT_SETUID, text, "1" if clone3 else "0"],
        capture_output=True, text=True, timeout=60, preexec_fn=drop_setuid, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout)
    assert outcome == {
        "error": f"adapter 'a' could not be started: setuid({test_user.uid}) failed: EPERM (Operation not permitted)",
        "child_left": False,
    }


@pytest.mark.parametrize("clone3", SPAWNERS)
@pytest.mark.parametrize(("extra", "expected"), [("", "1"), ("no_new_privileges = false", "0")])
def test_no_new_privs_is_on_unless_the_adapter_turns_it_off(clone3: bool, extra: str, expected: str) -> None:
    root = spawn_root(adapter(["/bin/sleep", "600"], extra), instance_id="inst-n", job="j", params={}, daemon_key="k",
                      clone3=clone3)
    try:
        assert eventually(lambda: exec_done(root.pid))
        fields = status_fields(root.pid)
        assert fields["NoNewPrivs"] == expected
        # Nothing else changes: the daemon's ids and umask.
        assert fields["Uid"].split()[0] == str(os.geteuid())
        assert fields["Umask"] == status_fields(os.getpid())["Umask"]
    finally:
        os.kill(root.pid, signal.SIGKILL)
        wait_for(root)
        root.close_stdio()
