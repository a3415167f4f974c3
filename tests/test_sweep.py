"""The orphan sweep, its reports, restart safety and memory limits, against the
real daemon with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.engine import staterecord
from supervisor.procs import process
from supervisor.client import DaemonError
from tests.conftest import PYTHON, eventually, read_pidfile, tree_adapter, wait_all_gone

STOP_TIMEOUT = 0.5
ROLES = ("root", "child", "grandchild", "escapee")


def test_a_sweep_that_finds_nothing_still_reports(start_daemon) -> None:
    daemon = start_daemon()
    client = daemon.client()
    report = client.call("sweep")
    assert report["kind"] == "manual" and report["orphans"] == [] and report["errors"] == []
    assert report["duration_ms"] >= 0 and isinstance(report["scanned"], int)
    kinds = [r["kind"] for r in client.call("reports", {"limit": 5})["reports"]]
    assert kinds == ["manual", "startup"]
    logged = daemon.wait_for_event("sweep.report", id=report["id"])
    assert logged["kind"] == "manual"
    lines = (daemon.state_dir / "reports.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["id"] == report["id"]


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_periodic_sweep_that_finds_nothing_is_logged_at_debug_the_others_at_info(start_daemon, level: str) -> None:
    daemon = start_daemon(sweep_interval=0.1, log_level=level)
    client = daemon.client()
    assert eventually(lambda: sum(r["kind"] == "periodic" for r in client.call("reports", {"limit": 50})["reports"]) >= 3)
    manual = client.call("sweep")
    daemon.wait_for_event("sweep.report", id=manual["id"])
    logged = [e for e in daemon.log_events() if e.get("event") == "sweep.report"]
    assert {(e["kind"], e["level"]) for e in logged if e["kind"] != "periodic"} == {("startup", "info"), ("manual", "info")}
    periodic = [e for e in logged if e["kind"] == "periodic"]
    if level == "info":
        assert periodic == []
    else:
        assert len(periodic) >= 3 and {e["level"] for e in periodic} == {"debug"}


def test_the_periodic_sweep_reaps_an_untagged_escapee_the_tree_stop_could_not_see(start_daemon, tmp_path: Path) -> None:
    # Process-table mode: an escapee that double-forked and threw its environment
    # away is neither a descendant of the root nor tagged. It is still the
    # daemon's child (subreaper), and the periodic sweep reaps it.
    pidfile = tmp_path / "pids"
    adapter = tree_adapter("sly", pidfile=pidfile, args=("--untagged-escapee",), stop_timeout=STOP_TIMEOUT)
    daemon = start_daemon(adapter, cgroup="off", sweep_interval=0.5)
    client = daemon.client()
    lease = client.call("acquire", {"job": "job-1", "adapter": "sly"})
    members = read_pidfile(pidfile)
    escapee = members.pop("escapee")
    assert eventually(lambda: process.read_cmdline(escapee.pid) == ["sleep", "3600"])
    assert process.read_environ_tag(escapee.pid) is None
    client.call("release", {"lease": lease["lease"]})
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    assert wait_all_gone({"escapee": escapee}, daemon.pid, 3.0) == {}

    def report_with_escapee():
        for report in client.call("reports", {"limit": 20})["reports"]:
            for orphan in report["orphans"]:
                if orphan["pid"] == escapee.pid:
                    return report, orphan
        return None

    found = eventually(report_with_escapee, timeout=2.0)
    assert found, "no report lists the escapee"
    report, orphan = found
    assert report["kind"] == "periodic"
    assert orphan["ppid"] == daemon.pid and orphan["cmdline"] == ["sleep", "3600"]
    assert orphan["action"] == "terminated" and orphan["result"] == "gone"
    assert report["reclaimed_rss_bytes"] >= orphan["rss_bytes"]


def test_in_cgroup_mode_the_untagged_escapee_dies_with_its_tree(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    adapter = tree_adapter("sly", pidfile=pidfile, args=("--untagged-escapee",), stop_timeout=STOP_TIMEOUT)
    daemon = start_daemon(adapter, cgroup="auto")
    client = daemon.client()
    if not client.call("status")["daemon"]["cgroup_mode"]:
        pytest.skip("this host has no writable cgroup v2 hierarchy")
    lease = client.call("acquire", {"job": "job-1", "adapter": "sly"})
    members = read_pidfile(pidfile)
    assert eventually(lambda: process.read_cmdline(members["escapee"].pid) == ["sleep", "3600"])
    client.call("release", {"lease": lease["lease"]})
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}


def test_an_expired_detached_lease_is_released_and_reported(start_daemon, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    daemon = start_daemon(tree_adapter("tree", pidfile=pidfile, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT))
    client = daemon.client()
    lease = client.call("acquire", {"job": "job-1", "adapter": "tree", "detach": True, "ttl": 1})
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    assert wait_all_gone(members, daemon.pid, 1.0 + STOP_TIMEOUT + 1.0) == {}
    with pytest.raises(DaemonError) as error:
        client.call("release", {"lease": lease["lease"]})
    assert error.value.code == 1002
    report = client.call("sweep")
    assert report["expired_leases"] == [lease["lease"][:8]]
    # Reported once, not again by the next sweep.
    assert client.call("sweep")["expired_leases"] == []


@pytest.mark.parametrize("cgroup", ["auto", "off"])
def test_a_tree_over_its_memory_limit_is_killed_and_its_holder_told(start_daemon, tmp_path: Path, cgroup: str) -> None:
    pidfile = tmp_path / "pids"
    adapter = tree_adapter(
        "hog", pidfile=pidfile, args=("--no-escapee", "--allocate", "64"),
        stop_timeout=STOP_TIMEOUT, memory_limit="48MiB",
    )
    small = tree_adapter("small", pidfile=tmp_path / "small", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT, memory_limit="48MiB")
    daemon = start_daemon(adapter + small, cgroup=cgroup, sweep_interval=0.3)
    holder = daemon.client()
    lease = holder.call("acquire", {"job": "job-1", "adapter": "hog"})
    bystander = holder.call("acquire", {"job": "job-1", "adapter": "small"})
    members = read_pidfile(pidfile, roles=("root", "child", "grandchild"))
    note = holder.next_notification()
    assert note["method"] == "adapter_exited"
    assert note["params"]["instance"] == lease["instance"] and note["params"]["reason"] == "memory_limit"
    assert wait_all_gone(members, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    # The holder hears of it before the sweep that found it has filed its report.
    def reports() -> list[dict]:
        return holder.call("reports", {"limit": 50})["reports"]

    assert eventually(lambda: any(lease["instance"] in r["over_memory"] for r in reports()), timeout=2.0)
    assert all(bystander["instance"] not in r["over_memory"] for r in reports())
    states = {i["instance"]: i["state"] for i in holder.call("status")["instances"]}
    assert states[bystander["instance"]] == "running"


def test_acquires_past_the_memory_budget_are_refused_with_the_figures(start_daemon, tmp_path: Path) -> None:
    adapter = tree_adapter("tree", pidfile=tmp_path / "pids", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT)
    daemon = start_daemon(adapter, memory_budget="1MiB")
    client = daemon.client()
    first = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    read_pidfile(tmp_path / "pids", roles=("root", "child", "grandchild"))
    # The budget check reads the same tree scan as `status`: once that shows the
    # tree past the budget, so does every later check.
    assert eventually(lambda: client.call("status")["daemon"]["rss_bytes"] > 2**20)
    with pytest.raises(DaemonError) as error:
        client.call("acquire", {"job": "job-2", "adapter": "tree"})
    assert error.value.code == 1004
    assert "memory_budget of 1.0 MiB" in error.value.message and "MiB of RSS" in error.value.message
    # Joining the running instance spawns nothing and is not refused.
    again = client.call("acquire", {"job": "job-1", "adapter": "tree"})
    assert again["instance"] == first["instance"]
    status = client.call("status")
    assert status["daemon"]["rss_bytes"] > 2**20
    assert status["instances"][0]["rss_bytes"] == status["daemon"]["rss_bytes"]


@pytest.mark.parametrize("cgroup", ["auto", "off"])
def test_a_restart_after_kill_9_reaps_what_it_cannot_adopt(start_daemon, tmp_path: Path, cgroup: str) -> None:
    # The restart's config no longer has the adapters of the trees left
    # running: they are reaped, not adopted (tests/test_adoption.py has the rest).
    state = tmp_path / "state"
    adapters = tree_adapter("tree", pidfile=tmp_path / "a", stop_timeout=STOP_TIMEOUT) + tree_adapter(
        "other", pidfile=tmp_path / "b", stop_timeout=STOP_TIMEOUT
    )
    first = start_daemon(adapters, state_dir=state, cgroup=cgroup)
    client = first.client()
    leases = [
        client.call("acquire", {"job": "job-1", "adapter": "tree", "detach": True, "ttl": 600}),
        client.call("acquire", {"job": "job-2", "adapter": "other", "detach": True, "ttl": 600}),
    ]
    members = {f"a-{k}": v for k, v in read_pidfile(tmp_path / "a").items()}
    members |= {f"b-{k}": v for k, v in read_pidfile(tmp_path / "b").items()}
    # Let the durable record catch up with the spawns.
    roots = {lease["pid"] for lease in leases}
    assert eventually(lambda: roots <= {m.pid for m in staterecord.recorded_processes(staterecord.read_record(str(state)))})
    client.close()
    first.popen.kill()
    first.popen.wait()
    # Nothing stopped them: the trees are still there, now owned by nobody.
    assert all(process.is_running(m) for m in members.values())
    os.unlink(first.socket)  # a SIGKILLed daemon cannot remove its socket

    second = start_daemon(tree_adapter("unrelated", pidfile=tmp_path / "c"), state_dir=state, cgroup=cgroup)
    assert wait_all_gone(members, second.pid, STOP_TIMEOUT + 2.0) == {}
    history = second.client().call("reports", {"limit": 50})["reports"]
    # Newest first; the history also holds the first run's reports (from reports.jsonl).
    startups = [r for r in history if r["kind"] == "startup"]
    assert len(startups) == 2
    startup = startups[0]
    assert startup["adopted"] == []
    reported = {o["pid"] for o in startup["orphans"]}
    assert {m.pid for m in members.values()} <= reported
    by_pid = {o["pid"]: o for o in startup["orphans"]}
    assert by_pid[members["a-root"].pid]["instance"] == leases[0]["instance"]
    assert by_pid[members["b-root"].pid]["job"] == "job-2"
    assert all(o["result"] == "gone" for o in startup["orphans"])


def test_no_sweep_touches_a_stranger_with_the_same_command_line(start_daemon, tmp_path: Path) -> None:
    argv = [PYTHON, "-c", "import time; time.sleep(3600)"]
    adapter = f"[adapters.sleeper]\ncommand = {json.dumps(argv)}\nstop_timeout = 0.5\n"
    stranger = subprocess.Popen(argv, start_new_session=True)
    try:
        daemon = start_daemon(adapter, cgroup="off", sweep_interval=0.2)
        client = daemon.client()
        lease = client.call("acquire", {"job": "job-1", "adapter": "sleeper"})
        client.call("sweep", {"deep": True})
        client.call("release", {"lease": lease["lease"]})
        for _ in range(3):
            last = client.call("sweep", {"deep": True})

        def periodic_sweeps_since() -> int:
            reports = client.call("reports", {"limit": 100})["reports"]
            return sum(r["kind"] == "periodic" and r["started_at"] > last["started_at"] for r in reports)

        assert eventually(lambda: periodic_sweeps_since() >= 2)  # a few periodic sweeps too
        reports = client.call("reports", {"limit": 100})["reports"]
        assert all(o["pid"] != stranger.pid for r in reports for o in r["orphans"])
        assert stranger.poll() is None
    finally:
        stranger.send_signal(signal.SIGKILL)
        stranger.wait()


def test_reports_jsonl_stays_within_its_bound(start_daemon) -> None:
    daemon = start_daemon(reports_max_bytes=4096)
    client = daemon.client()
    for _ in range(60):
        client.call("sweep")
    current = daemon.state_dir / "reports.jsonl"
    rotated = daemon.state_dir / "reports.jsonl.1"
    assert rotated.exists(), "60 reports of ~200 bytes never passed 4 KiB?"
    assert current.stat().st_size <= 4096 and rotated.stat().st_size <= 4096
    newest = json.loads(current.read_text().splitlines()[-1])
    assert newest["id"] == client.call("reports", {"limit": 1})["reports"][0]["id"]


def test_two_daemons_on_one_state_dir_cannot_both_run(start_daemon, tmp_path: Path) -> None:
    first = start_daemon()
    second = start_daemon(state_dir=first.state_dir, wait=False)
    assert second.popen.wait(20) != 0
    assert f"another daemon (pid {first.pid}) is already running on state_dir" in second.log_path.read_text()
    assert first.client().call("hello")["pid"] == first.pid


def test_a_copied_tag_never_gets_a_stranger_signalled(start_daemon, tmp_path: Path) -> None:
    """The tag anyone could compute (a hash of the state_dir's path) proves
    nothing; the state_dir's secret tag, which only the daemon's adapters
    receive, still does."""
    daemon = start_daemon()
    public = staterecord.daemon_key(str(daemon.state_dir))
    secret = (daemon.state_dir / staterecord.TAG_FILE).read_text().strip()
    assert secret != public and len(secret) == 2 * staterecord.TAG_BYTES
    assert (daemon.state_dir / staterecord.TAG_FILE).stat().st_mode & 0o777 == 0o600

    def start(tag: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, process.DAEMON_ENV: tag, process.INSTANCE_ENV: "0123456789ab"}
        return subprocess.Popen(["/bin/sleep", "60"], env=env, start_new_session=True)

    stranger, ours = start(public), start(secret)
    try:
        assert eventually(lambda: process.read_supervisor_env(ours.pid).get(process.DAEMON_ENV) == secret)
        time.sleep(0.05)  # a sweep leaves alone what was born in the clock tick it began in
        report = daemon.client().call("sweep", {"deep": True})
        acted_on = {o["pid"] for o in report["orphans"]}
        assert stranger.pid not in acted_on and stranger.poll() is None
        assert ours.pid in acted_on and ours.wait(5) is not None, (ours.pid, stranger.pid, report)
    finally:
        for popen in (stranger, ours):
            if popen.poll() is None:
                popen.kill()
            popen.wait()
