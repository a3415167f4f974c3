"""Adapters running as another user, against the real daemon: every process
of the tree (root, forked child, setsid'd grandchild) runs as the configured
user with its groups, umask, limits and no_new_privs, in both spawners and
both tracking modes; "@peer" runs the tree as the connecting client; a
setuid that fails answers 1003 and leaves nothing; a tree of another uid
survives an upgrade and is still reaped on release; a daemon that is not
root refuses another user at load and answers 1005 to a "@peer" acquire of
another uid. Real users (useradd), so root only."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from supervisor.client import Client, DaemonError
from supervisor.engine import staterecord
from supervisor.procs import process
from tests.asuser import owned_dir, serve_as
from tests.conftest import DAEMON_START_TIMEOUT_S, PYTHON, TREE, eventually, read_pidfile, wait_all_gone, wait_for_socket
from tests import users
from tests.users import NEEDS_ROOT, SystemUser

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=NEEDS_ROOT)

# Other users may not be able to run the venv's interpreter; the tree needs
# only the standard library.
SYSTEM_PYTHON = "/usr/bin/python3"
SPAWNERS = [pytest.param("auto", id="clone3"), pytest.param("subprocess", id="subprocess")]
MODES = [pytest.param("auto", id="cgroup"), pytest.param("off", id="process-table")]
# A uid no account of a test host uses, for a daemon that is not root.
DAEMON_UID = 61031
# prctl(PR_CAPBSET_DROP, CAP_SETUID): the daemon execs without CAP_SETUID.
PR_CAPBSET_DROP = 24
CAP_SETUID = 7

# The fixtures, under the names the tests take them by.
public_dir = users.public_dir
test_user = users.test_user


def tree_as(user: str, pidfile: Path, extra: str = "") -> str:
    command = [SYSTEM_PYTHON, TREE, "--pidfile", str(pidfile)]
    return f"[adapters.tree]\ncommand = {json.dumps(command)}\nuser = {json.dumps(user)}\nstop_timeout = 1.0\n{extra}\n"


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as file:
        return dict(line.rstrip("\n").split(":\t", 1) for line in file if ":\t" in line)


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        return dict(e.decode().split("=", 1) for e in file.read().split(b"\0") if b"=" in e)


def open_files_limit(pid: int) -> list[str]:
    with open(f"/proc/{pid}/limits") as file:
        line = next(line for line in file if line.startswith("Max open files"))
    return line.split()[3:5]


@pytest.mark.parametrize("spawner", SPAWNERS)
@pytest.mark.parametrize("cgroup", MODES)
def test_every_process_of_the_tree_runs_as_the_user(
    start_daemon, public_dir: Path, test_user: SystemUser, spawner: str, cgroup: str
) -> None:
    pidfile = public_dir / "tree.pids"
    extra = 'umask = "0077"\nlimits = { nofile = 777, core = 0 }'
    daemon = start_daemon(tree_as(test_user.name, pidfile, extra), spawner=spawner, cgroup=cgroup)
    client = daemon.client()
    assert [a["user"] for a in client.call("adapters")["adapters"]] == [test_user.name]
    lease = client.call("acquire", {"job": "j", "adapter": "tree"})
    members = read_pidfile(pidfile)
    assert members["root"].pid == lease["pid"]
    for role, member in members.items():
        fields = status_fields(member.pid)
        assert fields["Uid"].split() == [str(test_user.uid)] * 4, role
        assert fields["Gid"].split() == [str(test_user.gid)] * 4, role
        assert set(fields["Groups"].split()) == {str(test_user.gid), str(test_user.extra_gid)}, role
        assert (fields["Umask"], fields["NoNewPrivs"]) == ("0077", "1"), role
        assert open_files_limit(member.pid) == ["777", "777"], role
        env = environ(member.pid)
        assert (env["HOME"], env["USER"], env["LOGNAME"]) == (test_user.home, test_user.name, test_user.name), role
    # The escapee called setsid(): a session of its own, still the user's.
    assert os.getsid(members["escapee"].pid) != os.getsid(members["root"].pid)
    client.call("release", {"lease": lease["lease"]})
    assert not wait_all_gone(members, daemon.pid, timeout=3.0)


# Runs as `python -c ACQUIRE_AS SOCKET UID GID GROUPS_JSON`: imports the client
# as root, becomes UID, acquires "tree" for job "peer-job", prints the answer
# (or the error) and holds the lease until its stdin closes.
ACQUIRE_AS = textwrap.dedent("""
    import json, os, sys
    from supervisor.client import Client, DaemonError
    path, uid, gid, groups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    with Client(path, timeout=30) as client:
        try:
            print(json.dumps(client.call("acquire", {"job": "peer-job", "adapter": "tree"})), flush=True)
        except DaemonError as exc:
            print(json.dumps({"code": exc.code, "message": exc.message}), flush=True)
        sys.stdin.read()
""")


@pytest.mark.parametrize("spawner", SPAWNERS)
def test_peer_runs_the_tree_as_the_client_that_acquired(
    start_daemon, public_dir: Path, test_user: SystemUser, spawner: str
) -> None:
    pidfile = public_dir / "peer.pids"
    run_dir = public_dir / "run"
    run_dir.mkdir(mode=0o755)
    socket_path = str(run_dir / "control.sock")
    daemon = start_daemon(
        tree_as("@peer", pidfile), spawner=spawner, cgroup="auto", socket=socket_path, socket_mode="0666",
        allowed_uids=[test_user.uid],
    )
    holder = subprocess.Popen(
        [PYTHON, "-c", ACQUIRE_AS, socket_path, str(test_user.uid), str(test_user.extra_gid), json.dumps([test_user.extra_gid])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        answer = json.loads(holder.stdout.readline())
        members = read_pidfile(pidfile)
        assert members["root"].pid == answer["pid"]
        for role, member in members.items():
            fields = status_fields(member.pid)
            assert fields["Uid"].split()[0] == str(test_user.uid), role
            # The client's gid (SO_PEERCRED), with its user's groups from the group database.
            assert fields["Gid"].split()[0] == str(test_user.extra_gid), role
            assert environ(member.pid)["USER"] == test_user.name, role
        row = daemon.client().call("status")["instances"][0]
        assert row["uid"] == test_user.uid
    finally:
        holder.stdin.close()
        holder.wait(30)
    # Its connection closed: the lease is released and the tree reaped.
    assert not wait_all_gone(members, daemon.pid, timeout=3.0)


@pytest.mark.parametrize("spawner", SPAWNERS)
def test_a_setuid_that_fails_answers_1003_naming_it_and_leaves_nothing(
    start_daemon, public_dir: Path, test_user: SystemUser, spawner: str
) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def without_setuid() -> None:
        if libc.prctl(PR_CAPBSET_DROP, CAP_SETUID, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")

    daemon = start_daemon(tree_as(test_user.name, public_dir / "x.pids"), spawner=spawner, preexec=without_setuid)
    client = daemon.client()
    with pytest.raises(DaemonError) as refused:
        client.call("acquire", {"job": "j", "adapter": "tree"})
    assert refused.value.code == 1003
    assert f"setuid({test_user.uid}) failed: EPERM" in refused.value.message
    assert client.call("status")["instances"] == []
    # No child of the daemon is left, not even a zombie.
    children = [stat.pid for stat in process.scan_processes() if stat.ppid == daemon.pid]
    assert children == []
    assert not (public_dir / "x.pids").exists()
    # The daemon goes on serving: the next acquire fails the same way.
    with pytest.raises(DaemonError) as again:
        client.call("acquire", {"job": "j", "adapter": "tree"})
    assert again.value.code == 1003


@pytest.mark.parametrize("cgroup", MODES)
def test_a_tree_of_another_user_survives_an_upgrade_and_is_reaped_on_release(
    start_daemon, public_dir: Path, test_user: SystemUser, cgroup: str
) -> None:
    pidfile = public_dir / "up.pids"
    daemon = start_daemon(tree_as(test_user.name, pidfile), cgroup=cgroup)
    client = daemon.client()
    lease = client.call("acquire", {"job": "j", "adapter": "tree"})
    members = read_pidfile(pidfile)
    generation = client.call("hello")["generation"]
    assert daemon.client(timeout=90).call("upgrade", {})["generation"] == generation + 1
    assert all(process.is_running(member) for member in members.values())
    row = client.call("status")["instances"][0]
    assert (row["instance"], row["pid"], row["refcount"]) == (lease["instance"], lease["pid"], 1)
    assert status_fields(members["grandchild"].pid)["Uid"].split()[0] == str(test_user.uid)
    # A sweep after the upgrade still counts the tree as the daemon's own.
    report = client.call("sweep")
    assert report["orphans"] == []
    assert client.call("release", {"lease": lease["lease"]})["stopping"] is True
    assert not wait_all_gone(members, daemon.pid, timeout=3.0)


def test_a_daemon_that_is_not_root_refuses_another_user_at_load(public_dir: Path) -> None:
    config = public_dir / "supervisor.toml"
    config.write_text('[adapters.tree]\ncommand = ["/bin/sleep", "600"]\nuser = "root"\n')
    checker = serve_as(DAEMON_UID, ["check-config", str(config)], log_path=public_dir / "check.log")
    assert checker.wait(DAEMON_START_TIMEOUT_S) == 78
    text = (public_dir / "check.log").read_text()
    assert f"{config}: adapters.tree.user: expected the daemon's own user (uid {DAEMON_UID})" in text
    home = owned_dir(public_dir / "daemon", DAEMON_UID)
    config.write_text(
        f'[daemon]\nsocket = "{home}/control.sock"\nstate_dir = "{home}/state"\n'
        '[adapters.tree]\ncommand = ["/bin/sleep", "600"]\nuser = "root"\n'
    )
    daemon = serve_as(DAEMON_UID, ["serve", "--config", str(config)], log_path=public_dir / "serve.log")
    assert daemon.wait(DAEMON_START_TIMEOUT_S) == 78
    assert "adapters.tree.user" in (public_dir / "serve.log").read_text()


def test_a_daemon_that_is_not_root_denies_peer_acquires_of_another_uid(public_dir: Path) -> None:
    home = owned_dir(public_dir / "daemon", DAEMON_UID)
    socket_path = f"{home}/control.sock"
    config = public_dir / "supervisor.toml"
    config.write_text(
        f'[daemon]\nsocket = "{socket_path}"\nstate_dir = "{home}/state"\nlog_format = "json"\n'
        '[adapters.tree]\ncommand = ["/bin/sleep", "600"]\nuser = "@peer"\nstop_timeout = 1.0\n'
    )
    daemon = serve_as(DAEMON_UID, ["serve", "--config", str(config)], log_path=public_dir / "serve.log")
    try:
        wait_for_socket(socket_path, daemon, public_dir / "serve.log", DAEMON_START_TIMEOUT_S)
        with Client(socket_path, timeout=30) as client:  # root: allowed in, but not another uid's tree
            with pytest.raises(DaemonError) as denied:
                client.call("acquire", {"job": "j", "adapter": "tree"})
            assert denied.value.code == 1005
            assert f"runs as uid {DAEMON_UID}, not root" in denied.value.message and "not as uid 0" in denied.value.message
            assert eventually(lambda: client.call("status")["instances"] == [])
        # The daemon's own uid is served; it has no passwd entry, so HOME is
        # "/" and USER and LOGNAME its uid (as systemd does).
        holder = subprocess.Popen(
            [PYTHON, "-c", ACQUIRE_AS, socket_path, str(DAEMON_UID), str(DAEMON_UID), "[]"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            answer = json.loads(holder.stdout.readline())
            root = process.identify(answer["pid"])
            assert root is not None
            assert eventually(lambda: process.INSTANCE_ENV in environ(root.pid))
            assert status_fields(root.pid)["Uid"].split()[0] == str(DAEMON_UID)
            env = environ(root.pid)
            assert (env["HOME"], env["USER"], env["LOGNAME"]) == ("/", str(DAEMON_UID), str(DAEMON_UID))
        finally:
            holder.stdin.close()
            holder.wait(30)
        assert not wait_all_gone({"root": root}, daemon.pid, timeout=7.0)
    finally:
        daemon.terminate()
        assert daemon.wait(20) == 0, (public_dir / "serve.log").read_text()


@pytest.mark.parametrize("cgroup", MODES)
def test_a_tree_of_another_user_is_adopted_after_a_crash_and_reaped_on_release(
    start_daemon, public_dir: Path, test_user: SystemUser, tmp_path: Path, cgroup: str
) -> None:
    pidfile = public_dir / "crash.pids"
    settings = {"cgroup": cgroup, "socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state")}
    first = start_daemon(tree_as(test_user.name, pidfile), **settings)
    lease = first.client().call("acquire", {"job": "j", "adapter": "tree", "detach": True, "ttl": 600})
    members = read_pidfile(pidfile)
    assert eventually(lambda: lease["lease"] in (tmp_path / "state" / staterecord.RECORD_FILE).read_text())
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(10)
    second = start_daemon(tree_as(test_user.name, pidfile), **settings)
    client = second.client()
    row = client.call("status")["instances"][0]
    assert (row["instance"], row["pid"], row["adopted"]) == (lease["instance"], lease["pid"], True)
    startup = [r for r in client.call("reports", {"limit": 10})["reports"] if r["kind"] == "startup"][0]
    assert startup["adopted"] == [lease["instance"]] and startup["orphans"] == []
    assert all(process.is_running(member) for member in members.values())
    client.call("release", {"lease": lease["lease"]})
    assert not wait_all_gone(members, second.pid, timeout=3.0)
