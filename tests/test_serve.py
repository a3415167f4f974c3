"""The daemon as a whole process: signals, reloads, start-up refusals and the CLI."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.procs import process
from supervisor.client import ConnectionLost, DaemonError
from supervisor.core.config import bundled_config_path
from tests.conftest import (
    PYTHON,
    DaemonProcess,
    eventually,
    read_pidfile,
    tree_adapter,
    wait_all_gone,
)

STOP_TIMEOUT = 0.5
TREE_ROLES = ("root", "child", "grandchild")
EX_CONFIG = 78
EX_UNAVAILABLE = 69


def run_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "supervisor", *args], check=False, capture_output=True, text=True, timeout=timeout)


def rewrite_adapters(daemon: DaemonProcess, adapters: str) -> None:
    """Keep the daemon's `[daemon]` table, replace every adapter with `adapters`."""
    text = daemon.config_path.read_text()
    daemon_table = text.split("\n[adapters.", 1)[0]
    daemon.config_path.write_text(daemon_table + "\n\n" + adapters)


def members_of(*pidfiles: Path) -> dict[str, process.ProcessId]:
    """Every process of the trees writing to `pidfiles`, named `<pidfile stem>-<role>`."""
    members = {}
    for pidfile in pidfiles:
        members |= {f"{pidfile.stem}-{role}": m for role, m in read_pidfile(pidfile).items()}
    return members


# -- the fd table --------------------------------------------------------------


def fd_table_size(pid: int) -> int:
    """The size of a process's fd table (FDSize in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("FDSize:"):
            return int(line.split()[1])
    raise AssertionError("no FDSize line")


@pytest.mark.parametrize("nofile", [None, 4096], ids=["raised-limit", "low-limit"])
def test_the_daemon_grows_its_fd_table_at_start_as_far_as_its_limit_allows(start_daemon, nofile: int | None) -> None:
    # Grown later, each doubling would wait for an RCU grace period on the
    # trio thread (tens of ms).
    from supervisor.serve import FD_TABLE_SLOTS

    daemon = start_daemon(nofile=nofile)
    soft, _ = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
    assert fd_table_size(daemon.pid) >= min(FD_TABLE_SLOTS, soft)


def test_growing_the_fd_table_closes_nothing_and_leaves_no_fd_behind() -> None:
    # An fd already open where the table is grown to stays open and the same.
    code = """
import os, resource, sys
from supervisor.serve import presize_fd_table
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
r, w = os.pipe()
os.dup2(w, 4095)
before = sorted(os.listdir("/proc/self/fd"))
presize_fd_table(4096)
after = sorted(os.listdir("/proc/self/fd"))
os.write(4095, b"x")
size = [l for l in open("/proc/self/status") if l.startswith("FDSize:")][0].split()[1]
print(before == after, os.read(r, 1).decode(), size)
"""
    result = subprocess.run([PYTHON, "-c", code], check=True, capture_output=True, text=True, timeout=30)
    # 4095 was taken, so the table grew to hold the next free fd, 4096.
    assert result.stdout.split() == ["True", "x", "8192"]


# -- shutdown ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_tells_clients_stops_every_tree_removes_the_socket_and_exits_0(
    start_daemon, tmp_path: Path, sig: signal.Signals
) -> None:
    gentle, stubborn = tmp_path / "gentle.pids", tmp_path / "stubborn.pids"
    adapters = tree_adapter("gentle", pidfile=gentle, stop_timeout=STOP_TIMEOUT)
    adapters += tree_adapter("stubborn", pidfile=stubborn, args=("--ignore-term",), stop_timeout=STOP_TIMEOUT)
    daemon = start_daemon(adapters)
    holder = daemon.client(timeout=10)
    holder.call("acquire", {"job": "bound", "adapter": "gentle"})
    holder.call("acquire", {"job": "detached", "adapter": "stubborn", "detach": True, "ttl": 60})
    members = members_of(gentle, stubborn)
    assert len(members) == 8

    signalled = time.monotonic()
    daemon.popen.send_signal(sig)
    assert holder.next_notification() == {"jsonrpc": "2.0", "method": "shutting_down", "params": {}}
    left = wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0 - (time.monotonic() - signalled))
    assert left == {}, f"still alive {time.monotonic() - signalled:.2f}s after {sig.name}: {left}"
    assert daemon.popen.wait(timeout=10) == 0
    assert not os.path.exists(daemon.socket)
    assert daemon.wait_for_event("daemon.stopping")["signal"] == sig.name
    with pytest.raises((ConnectionLost, OSError)):
        holder.call("hello")


def test_stop_signals_that_keep_coming_until_the_exit_still_leave_a_clean_exit(start_daemon, tmp_path: Path) -> None:
    # `timeout` sends SIGTERM to the daemon, then to its process group; a
    # supervisor may repeat it. One landing after the shutdown, on a process
    # on its way out, must not turn exit 0 into death by SIGTERM.
    daemon = start_daemon(tree_adapter("tree", pidfile=tmp_path / "pids"))
    daemon.client().call("acquire", {"job": "j", "adapter": "tree"})
    members = members_of(tmp_path / "pids")
    while daemon.popen.poll() is None:
        daemon.popen.send_signal(signal.SIGTERM)
        time.sleep(0.0005)
    assert daemon.popen.returncode == 0
    assert daemon.wait_for_event("daemon.stopped")
    assert wait_all_gone(members, daemon.pid, 1.0) == {}


# -- reload --------------------------------------------------------------------


def environ_of(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        return environ.read().split(b"\0")


def test_sighup_with_a_good_config_adds_adapters_and_changes_only_new_instances(start_daemon, tmp_path: Path) -> None:
    old_pids, new_pids, added_pids = tmp_path / "old.pids", tmp_path / "new.pids", tmp_path / "added.pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=old_pids, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT,
                                       extra='env = { RELOAD_MARK = "before" }\n'))
    client = daemon.client()
    first = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    old_members = read_pidfile(old_pids, roles=TREE_ROLES)

    rewrite_adapters(
        daemon,
        tree_adapter("tree", pidfile=new_pids, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT,
                     extra='env = { RELOAD_MARK = "after" }\n')
        + tree_adapter("added", pidfile=added_pids, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT),
    )
    os.kill(daemon.pid, signal.SIGHUP)
    reloaded = daemon.wait_for_event("config.reloaded")
    assert reloaded["adapters"] == ["added", "tree"]

    added = client.call("acquire", {"job": "job-1", "adapter": "added"})
    assert read_pidfile(added_pids, roles=TREE_ROLES)["root"].pid == added["pid"]
    second = client.call("acquire", {"job": "job-2", "adapter": "tree"})
    assert read_pidfile(new_pids, roles=TREE_ROLES)["root"].pid == second["pid"]
    assert str(new_pids) in process.read_cmdline(second["pid"])
    # The adapter's environment too (the daemon prepares it once per adapter).
    assert b"RELOAD_MARK=after" in environ_of(second["pid"])
    assert b"RELOAD_MARK=before" in environ_of(first["pid"])

    # The instance started before the reload runs on, untouched, and is still joinable.
    assert all(process.is_running(m) for m in old_members.values())
    assert str(old_pids) in process.read_cmdline(first["pid"])
    joined = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    assert (joined["instance"], joined["pid"], joined["spawned"]) == (first["instance"], first["pid"], False)
    rows = {row["instance"]: row for row in client.call("status")["instances"]}
    assert rows[first["instance"]]["state"] == "running"
    assert rows[first["instance"]]["refcount"] == 2


def test_a_program_a_spawn_would_not_find_is_logged_at_start_and_on_reload(start_daemon) -> None:
    daemon = start_daemon('[adapters.gone]\ncommand = ["/no/such/binary"]\n[adapters.fine]\ncommand = ["/bin/true"]\n')
    warned = daemon.wait_for_event("config.command_warning")
    assert (warned["key"], warned["level"]) == ("adapters.gone.command", "warning")
    assert "'/no/such/binary' not found" in warned["warning"] and warned["config"] == str(daemon.config_path)
    rewrite_adapters(daemon, '[adapters.fine]\ncommand = ["/bin/true"]\n[adapters.later]\ncommand = ["no-such-program-at-all"]\n')
    os.kill(daemon.pid, signal.SIGHUP)
    daemon.wait_for_event("config.reloaded")
    later = daemon.wait_for_event("config.command_warning", key="adapters.later.command")
    assert "not found in PATH" in later["warning"]
    assert [e["key"] for e in daemon.log_events() if e.get("event") == "config.command_warning"] == [
        "adapters.gone.command", "adapters.later.command",
    ]


@pytest.mark.parametrize(
    ("broken", "where"),
    [
        pytest.param("[adapters.added\ncommand = [\n", "line ", id="toml-syntax"),
        pytest.param('[adapters.added]\ncommand = ["/bin/true"]\nstop_timeout = -1\n', "adapters.added.stop_timeout", id="schema"),
    ],
)
def test_sighup_with_a_broken_config_is_rejected_and_the_old_config_stays(
    start_daemon, tmp_path: Path, broken: str, where: str
) -> None:
    pidfile = tmp_path / "tree.pids"
    adapter = tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    daemon = start_daemon(adapter)
    rewrite_adapters(daemon, adapter + broken)
    os.kill(daemon.pid, signal.SIGHUP)
    rejected = daemon.wait_for_event("config.reload_rejected")
    assert str(daemon.config_path) in rejected["error"]
    assert where in rejected["error"]
    assert not any(e.get("event") == "config.reloaded" for e in daemon.log_events())

    client = daemon.client()
    assert client.call("hello")["pid"] == daemon.pid
    with pytest.raises(DaemonError) as refused:
        client.call("acquire", {"job": "job-1", "adapter": "added"})
    assert refused.value.code == 1001
    lease = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    assert read_pidfile(pidfile, roles=TREE_ROLES)["root"].pid == lease["pid"]


# -- config checks at start-up ------------------------------------------------------

BAD_CONFIGS = [
    pytest.param('[daemon]\nsocket_mode = "9999"\n', "daemon.socket_mode", id="socket-mode"),
    pytest.param("[adapters.x]\ncommand = []\n", "adapters.x.command", id="empty-command"),
    pytest.param('[adapters.x]\ncommand = ["/bin/true"]\nstop_timeout = "soon"\n', "adapters.x.stop_timeout", id="stop-timeout"),
    pytest.param('[adapters.x]\ncommand = ["/bin/true"]\ncolour = "red"\n', "adapters.x.colour", id="unknown-key"),
    pytest.param("[daemon\n", "line 1", id="toml-syntax"),
]


def test_check_config_accepts_the_bundled_config() -> None:
    completed = run_cli("check-config", str(bundled_config_path()))
    assert completed.returncode == 0, completed.stderr
    assert "OK" in completed.stdout and "demo" in completed.stdout


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
def test_check_config_names_the_file_and_key_of_a_bad_config_and_exits_78(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    completed = run_cli("check-config", str(path))
    assert completed.returncode == EX_CONFIG
    output = completed.stdout + completed.stderr
    assert str(path) in output
    assert key in output
    assert "Traceback" not in output


def test_check_config_of_a_missing_file_exits_78(tmp_path: Path) -> None:
    completed = run_cli("check-config", str(tmp_path / "absent.toml"))
    assert completed.returncode == EX_CONFIG
    assert str(tmp_path / "absent.toml") in completed.stdout + completed.stderr


@pytest.mark.parametrize(("text", "key"), [BAD_CONFIGS[0], BAD_CONFIGS[2]])
def test_serve_refuses_a_bad_config_with_78_and_no_traceback(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    completed = run_cli("serve", "--config", str(path))
    assert completed.returncode == EX_CONFIG
    output = completed.stdout + completed.stderr
    assert str(path) in output
    assert key in output
    assert "Traceback" not in output


# -- two daemons ------------------------------------------------------------------


@pytest.mark.parametrize("shared", ["socket", "state_dir"])
def test_a_second_daemon_on_the_same_socket_or_state_dir_refuses_to_start(
    start_daemon, tmp_path: Path, shared: str
) -> None:
    pidfile = tmp_path / "tree.pids"
    first = start_daemon(tree_adapter("tree", pidfile=pidfile, stop_timeout=STOP_TIMEOUT))
    lease = first.client().call("acquire", {"job": "job-1", "adapter": "tree"})
    members = read_pidfile(pidfile)

    same: dict[str, object] = {"socket": first.socket} if shared == "socket" else {"state_dir": first.state_dir}
    second = start_daemon(tree_adapter("tree", pidfile=pidfile, stop_timeout=STOP_TIMEOUT), wait=False, **same)
    returncode = second.popen.wait(timeout=20)
    assert returncode == 69
    log = second.log_path.read_text()
    assert "already" in log and str(same[shared]) in log
    # It names the daemon in the way, so that an operator can find it.
    assert f"pid {first.pid})" in log
    assert "Traceback" not in log
    if shared == "state_dir":
        assert not os.path.exists(second.socket)

    # The first daemon keeps serving, on its socket, with its tree intact.
    assert os.path.exists(first.socket)
    with first.client() as client:
        status = client.call("status")
    assert status["daemon"]["pid"] == first.pid
    assert [row["instance"] for row in status["instances"]] == [lease["instance"]]
    assert all(process.is_running(m) for m in members.values())


# -- the command line -------------------------------------------------------------


def test_cli_acquire_status_logs_and_release(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "tree.pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=pidfile, stop_timeout=STOP_TIMEOUT))
    sock = ("--socket", daemon.socket)

    acquired = run_cli(*sock, "acquire", "job-cli", "tree", "--detach", "--ttl", "30")
    assert acquired.returncode == 0, acquired.stderr
    lease = re.search(r"^lease (\S+)$", acquired.stdout, re.MULTILINE)
    instance = re.search(r"spawned instance (\S+) ", acquired.stdout)
    assert lease and instance, acquired.stdout
    members = read_pidfile(pidfile)

    human = run_cli(*sock, "status")
    assert human.returncode == 0, human.stderr
    header, *rows = [line for line in human.stdout.splitlines() if line.startswith(("INSTANCE", instance[1]))]
    assert header.split()[:3] == ["INSTANCE", "JOB", "ADAPTER"]
    assert rows and rows[0].split()[:4] == [instance[1], "job-cli", "tree", "running"]

    as_json = run_cli(*sock, "--json", "status")
    assert as_json.returncode == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    assert [(i["instance"], i["job"], i["adapter"], i["refcount"]) for i in status["instances"]] == [
        (instance[1], "job-cli", "tree", 1)
    ]

    def logs() -> str:
        completed = run_cli(*sock, "logs", instance[1])
        assert completed.returncode == 0, completed.stderr
        return completed.stdout

    assert "root ready" in eventually(logs, timeout=5.0)

    released = run_cli(*sock, "release", lease[1])
    assert released.returncode == 0, released.stderr
    assert "refcount now 0" in released.stdout
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}

    again = run_cli(*sock, "--json", "release", lease[1])
    assert again.returncode == 1
    assert json.loads(again.stdout)["error"]["code"] == 1002


def test_cli_release_job_releases_every_lease_of_the_job(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "tree.pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT))
    sock = ("--socket", daemon.socket)
    for _ in range(2):
        assert run_cli(*sock, "acquire", "job-cli", "tree", "--detach", "--ttl", "30").returncode == 0
    members = read_pidfile(pidfile, roles=TREE_ROLES)
    released = run_cli(*sock, "release-job", "job-cli")
    assert released.returncode == 0, released.stderr
    assert "released 2 leases on 1 instances" in released.stdout
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    assert json.loads(run_cli(*sock, "--json", "status").stdout)["daemon"]["leases"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("acquire", "job-cli", "missing"), "no adapter named 'missing'", id="unknown-adapter"),
        pytest.param(("release", "no-such-lease"), "no such lease", id="unknown-lease"),
        pytest.param(("acquire", "job-cli", "tree", "--param", "x=1"), 'does not declare param "x"', id="undeclared-param"),
    ],
)
def test_cli_exits_1_with_the_daemons_message_on_an_error(start_daemon, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    daemon = start_daemon(tree_adapter("tree", pidfile=tmp_path / "tree.pids", stop_timeout=STOP_TIMEOUT))
    completed = run_cli("--socket", daemon.socket, *args)
    assert completed.returncode == 1
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "tree.pids").exists()


def test_cli_exits_69_when_the_daemon_cannot_be_reached(tmp_path: Path) -> None:
    sock = str(tmp_path / "nobody-listens.sock")
    completed = run_cli("--socket", sock, "status")
    assert completed.returncode == EX_UNAVAILABLE
    assert sock in completed.stderr
    assert "Traceback" not in completed.stderr
