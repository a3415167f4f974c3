"""Adoption after a crash, against the real daemon: `kill -9`,
then a new daemon on the same state_dir takes over every tree it can prove
is its own, with its leases, and reaps the rest. In cgroup and process-table
modes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from supervisor.client import DaemonError
from supervisor.engine import staterecord
from supervisor.procs import process
from tests.conftest import PYTHON, eventually, read_pidfile, tree_adapter, wait_all_gone

MODES = [pytest.param("auto", id="cgroup"), pytest.param("off", id="process-table")]

# Writes a numbered stderr line every 5 ms, forever: with a pipe, the daemon's
# death would kill it (SIGPIPE) within milliseconds.
CHATTY = "import sys, time\ni = 0\nwhile True:\n    sys.stderr.write('tick %d\\n' % i); sys.stderr.flush(); i += 1; time.sleep(0.005)\n"


def adapters(tmp_path: Path) -> str:
    chatty = f"[adapters.chatty]\ncommand = {json.dumps([PYTHON, '-c', CHATTY])}\nstop_timeout = 1.0\n"
    # Pipes for stdin and stdout, which it never touches: it outlives them.
    piped = '[adapters.piped]\ncommand = ["/bin/sleep", "600"]\nstdio = "pipe"\nstop_timeout = 1.0\n'
    return tree_adapter("tree", pidfile=tmp_path / "{job}.pids", stop_timeout=1.0) + "\n" + chatty + piped


def recorded_instances(state_dir: Path) -> list[dict]:
    """The instances of the state record as written now (none if it is not there yet)."""
    try:
        record = json.loads((state_dir / staterecord.RECORD_FILE).read_text())
    except (OSError, ValueError):
        return []
    return record.get("instances", [])


def recorded_tokens(state_dir: Path) -> set[str]:
    return {lease["token"] for instance in recorded_instances(state_dir) for lease in instance.get("leases", [])}


def kill_9(daemon) -> None:
    daemon.popen.send_signal(signal.SIGKILL)
    daemon.popen.wait(10)


def status_by_job(client) -> dict[str, dict]:
    return {row["job"]: row for row in client.call("status")["instances"]}


@pytest.mark.parametrize("cgroup", MODES)
def test_a_crashed_daemons_trees_are_adopted_with_their_leases_and_released_whole(
    start_daemon, tmp_path: Path, cgroup: str
) -> None:
    settings = {"cgroup": cgroup, "socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state")}
    first = start_daemon(adapters(tmp_path), **settings)
    assert first.client().call("hello")["generation"] == 1
    holder = first.client()
    detached = holder.call("acquire", {"job": "job-d", "adapter": "tree", "detach": True, "ttl": 600})
    bound = holder.call("acquire", {"job": "job-b", "adapter": "tree"})
    chatty = holder.call("acquire", {"job": "job-s", "adapter": "chatty", "detach": True, "ttl": 600})
    piped = holder.call("acquire", {"job": "job-p", "adapter": "piped", "detach": True, "ttl": 600})
    trees = {job: read_pidfile(tmp_path / f"{job}.pids") for job in ("job-d", "job-b")}
    before = status_by_job(holder)
    tokens = {detached["lease"], bound["lease"], chatty["lease"], piped["lease"]}
    assert eventually(lambda: tokens <= recorded_tokens(tmp_path / "state")), "the leases never reached the record"
    assert stat_mode(tmp_path / "state" / staterecord.RECORD_FILE) == 0o600

    kill_9(first)
    # Nothing the daemon started dies with it: not the trees, not the adapter
    # writing stderr without pause (no pipe to break).
    time.sleep(0.5)
    for members in trees.values():
        assert all(process.is_running(m) for m in members.values()), members
    assert process.is_running(process.identify(chatty["pid"]))

    second = start_daemon(adapters(tmp_path), **settings)
    client = second.client()
    hello = client.call("hello")
    assert hello["generation"] == 2 and hello["pid"] == second.pid
    after = status_by_job(client)
    for job in ("job-d", "job-b", "job-s", "job-p"):
        assert after[job]["adopted"] is True and after[job]["state"] == "running"
        assert (after[job]["instance"], after[job]["pid"]) == (before[job]["instance"], before[job]["pid"])
    startup = [r for r in client.call("reports", {"limit": 10})["reports"] if r["kind"] == "startup"][0]
    assert sorted(startup["adopted"]) == sorted(before[job]["instance"] for job in ("job-d", "job-b", "job-s", "job-p"))
    adopted_pids = {m.pid for members in trees.values() for m in members.values()} | {chatty["pid"]}
    assert not adopted_pids & {o["pid"] for o in startup["orphans"]}, "an adopted process was reaped"

    # An adopted instance has no pipes left to pass, and says why.
    with pytest.raises(DaemonError) as no_pipes:
        client.call("acquire", {"job": "job-p", "adapter": "piped", "fds": True})
    assert no_pipes.value.code == 1007 and "adopted" in no_pipes.value.message
    # The detached lease renews; the bound one waits for its holder to resume it.
    assert client.call("renew", {"lease": detached["lease"]})["expires_at"] > time.time()
    resumed = client.resume([bound["lease"], detached["lease"], "0" * 24])
    assert resumed == {"resumed": [bound["lease"]], "not_resumed": [detached["lease"], "0" * 24]}
    # stderr is followed on: lines written since the restart reach `logs`.
    last = int(client.call("logs", {"lease": chatty["lease"], "lines": 1})["lines"][0].split()[1])
    assert eventually(lambda: int(client.call("logs", {"lease": chatty["lease"], "lines": 1})["lines"][0].split()[1]) > last)

    # A release stops the adopted tree whole, escapee included, though none
    # of it is the new daemon's child.
    for job, lease in (("job-b", bound), ("job-d", detached)):
        assert client.call("release", {"lease": lease["lease"]}) == {"refcount": 0, "stopping": True}
        assert not wait_all_gone(trees[job], second.pid, timeout=1.0 + 2.0), job
    client.call("release", {"lease": chatty["lease"]})
    client.call("release", {"lease": piped["lease"]})
    assert eventually(lambda: not client.call("status")["instances"], timeout=5)


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("cgroup", MODES)
def test_a_bound_lease_nobody_resumes_is_released_after_the_grace(start_daemon, tmp_path: Path, cgroup: str) -> None:
    settings = {"cgroup": cgroup, "socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"),
                "resume_grace": 1.0}
    first = start_daemon(adapters(tmp_path), **settings)
    bound = first.client().call("acquire", {"job": "job-b", "adapter": "tree"})
    members = read_pidfile(tmp_path / "job-b.pids")
    assert eventually(lambda: bound["lease"] in recorded_tokens(tmp_path / "state"))
    kill_9(first)
    second = start_daemon(adapters(tmp_path), **settings)
    client = second.client()
    assert status_by_job(client)["job-b"]["adopted"] is True
    second.wait_for_event("lease.not_resumed", timeout=5)
    assert not wait_all_gone(members, second.pid, timeout=5.0)
    # The daemon's stop ends a moment after the last member is seen gone.
    assert eventually(lambda: client.call("status")["instances"] == [], timeout=5.0)
    assert client.call("resume", {"leases": [bound["lease"]]}) == {"resumed": [], "not_resumed": [bound["lease"]]}
    with pytest.raises(DaemonError) as released:
        client.call("release", {"lease": bound["lease"]})
    assert released.value.code == 1002


@pytest.mark.parametrize("cgroup", MODES)
def test_a_tree_whose_root_died_while_the_daemon_was_down_is_reaped_not_adopted(
    start_daemon, tmp_path: Path, cgroup: str
) -> None:
    settings = {"cgroup": cgroup, "socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state")}
    first = start_daemon(adapters(tmp_path), **settings)
    lease = first.client().call("acquire", {"job": "job-d", "adapter": "tree", "detach": True, "ttl": 600})
    members = read_pidfile(tmp_path / "job-d.pids")
    assert eventually(lambda: lease["lease"] in recorded_tokens(tmp_path / "state"))
    kill_9(first)
    os.kill(members["root"].pid, signal.SIGKILL)
    assert eventually(lambda: not process.is_running(members["root"]))
    second = start_daemon(adapters(tmp_path), **settings)
    client = second.client()
    assert client.call("status")["instances"] == []
    startup = [r for r in client.call("reports")["reports"] if r["kind"] == "startup"][0]
    assert startup["adopted"] == []
    rest = {role: m for role, m in members.items() if role != "root"}
    assert not wait_all_gone(rest, second.pid, timeout=5.0)
    assert {m.pid for m in rest.values()} <= {o["pid"] for o in startup["orphans"]}
    with pytest.raises(DaemonError) as gone:
        client.call("renew", {"lease": lease["lease"]})
    assert gone.value.code == 1002


def test_a_stranger_holding_a_recorded_root_pid_is_never_adopted_or_signalled(start_daemon, tmp_path: Path) -> None:
    import subprocess

    stranger = subprocess.Popen(["sleep", "600"])
    try:
        identity = eventually(lambda: process.identify(stranger.pid))
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        # A record naming the stranger's pid as a root, with another start
        # time: the pid was reused since the record was written.
        reused = staterecord.RecordedProcess(identity.pid, identity.start_time - 1)
        staterecord.write_record(str(state), staterecord.StateRecord(
            daemon_pid=1, daemon_key=staterecord.daemon_key(str(state)), version=staterecord.RECORD_VERSION,
            boot_id=staterecord.current_boot_id(),
            instances=[staterecord.RecordedInstance(
                instance="0123456789ab", job="j", adapter="tree", processes=[reused], state="running",
                root=reused, started_at=time.time(),
                leases=[staterecord.RecordedLease(token="t" * 24, uid=os.getuid(), detached=True, ttl=60.0,
                                                  expires_at=time.time() + 60)],
            )],
        ))
        daemon = start_daemon(adapters(tmp_path), state_dir=str(state), cgroup="off")
        client = daemon.client()
        assert client.call("status")["instances"] == []
        startup = [r for r in client.call("reports")["reports"] if r["kind"] == "startup"][0]
        assert startup["adopted"] == [] and stranger.pid not in {o["pid"] for o in startup["orphans"]}
        assert stranger.poll() is None and process.is_running(identity)
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("cgroup", MODES)
def test_a_lingering_tree_is_adopted_lingering_and_a_stopping_one_is_reaped(start_daemon, tmp_path: Path, cgroup: str) -> None:
    lingering_adapter = tree_adapter("lingerer", pidfile=tmp_path / "linger.pids", stop_timeout=1.0, linger=60.0)
    stopping_adapter = tree_adapter("stubborn", pidfile=tmp_path / "stubborn.pids", args=("--ignore-term",),
                                    stop_timeout=30.0)
    settings = {"cgroup": cgroup, "socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state")}
    first = start_daemon(lingering_adapter + stopping_adapter, **settings)
    client = first.client()
    lingering = client.call("acquire", {"job": "j-l", "adapter": "lingerer"})
    stopping = client.call("acquire", {"job": "j-s", "adapter": "stubborn"})
    lingering_members = read_pidfile(tmp_path / "linger.pids")
    stopping_members = read_pidfile(tmp_path / "stubborn.pids")
    client.call("release", {"lease": lingering["lease"]})
    assert client.call("release", {"lease": stopping["lease"]})["stopping"] is True
    states = {row["job"]: row["state"] for row in client.call("status")["instances"]}
    assert states == {"j-l": "lingering", "j-s": "stopping"}

    def recorded_states() -> dict[str, str]:
        try:
            record = json.loads((tmp_path / "state" / staterecord.RECORD_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return {i["job"]: i["state"] for i in record["instances"]}

    assert eventually(lambda: recorded_states() == states)
    kill_9(first)
    second = start_daemon(lingering_adapter + stopping_adapter, **settings)
    client = second.client()
    rows = {row["job"]: row for row in client.call("status")["instances"]}
    # The lingering tree comes back lingering; an acquire revives it.
    assert rows["j-l"]["adopted"] is True and rows["j-l"]["state"] == "lingering"
    again = client.call("acquire", {"job": "j-l", "adapter": "lingerer"})
    assert (again["instance"], again["pid"], again["spawned"]) == (lingering["instance"], lingering["pid"], False)
    # The tree that was being stopped is not adopted: the startup sweep
    # finishes the stop (SIGKILL after its grace, as it ignores SIGTERM).
    assert "j-s" not in rows
    assert not wait_all_gone(stopping_members, second.pid, timeout=10.0)
    assert all(process.is_running(m) for m in lingering_members.values())
    client.call("release", {"lease": again["lease"]})


def test_an_upgrade_after_an_adoption_keeps_the_adopted_trees(start_daemon, tmp_path: Path) -> None:
    """The startup sweep after a crash is deep; it once took adopted roots
    (not the daemon's children) for exited ones, and the next upgrade handed
    them over as such and stopped them."""
    settings = {"socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state")}
    first = start_daemon(adapters(tmp_path), **settings)
    lease = first.client().call("acquire", {"job": "job-d", "adapter": "tree", "detach": True, "ttl": 600})
    members = read_pidfile(tmp_path / "job-d.pids")
    assert eventually(lambda: lease["lease"] in recorded_tokens(tmp_path / "state"))
    kill_9(first)
    second = start_daemon(adapters(tmp_path), **settings)
    client = second.client(timeout=90)
    client.call("sweep", {"deep": True})
    assert client.upgrade()["generation"] == 3
    row = status_by_job(client)["job-d"]
    assert (row["state"], row["adopted"], row["pid"]) == ("running", True, lease["pid"])
    assert all(process.is_running(m) for m in members.values()), members
    assert client.call("release", {"lease": lease["lease"]})["stopping"] is True
    assert not wait_all_gone(members, second.pid, timeout=4.0)


# The root lets a grandchild escape (setsid, its parent exits: it is
# re-parented to the daemon) once `go` exists, and the escapee throws its
# environment (and so its tag) away by exec'ing `sleep` once `go.untag` exists.
ESCAPING_LATER = """
import os, sys, time
pidfile, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.01)
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        with open(pidfile, "a") as out:
            out.write("escapee %d\\n" % os.getpid())
        while not os.path.exists(go + ".untag"):
            time.sleep(0.01)
        os.execve("/bin/sleep", ["sleep", "600"], dict())
    os._exit(0)
while True:
    time.sleep(3600)
"""


def test_an_escapee_learned_by_a_sweep_is_recorded_and_outlives_no_crash(start_daemon, tmp_path: Path) -> None:
    # Process-table mode: an escapee is known only by its (pid, start time)
    # once it has dropped its tag. What a scan learned must reach the record,
    # or after kill -9 nothing proves the escapee is the daemon's and it
    # lives on, re-parented to PID 1.
    go, pidfile = tmp_path / "go", tmp_path / "escapee.pids"
    adapter = (
        f"[adapters.leaky]\ncommand = {json.dumps([PYTHON, '-c', ESCAPING_LATER, str(pidfile), str(go)])}\n"
        "stop_timeout = 1.0\n"
    )
    settings = {"cgroup": "off", "socket": str(tmp_path / "control.sock"), "state_dir": str(tmp_path / "state"),
                "sweep_interval": 3600}
    first = start_daemon(adapter, **settings)
    client = first.client()
    lease = client.call("acquire", {"job": "job-1", "adapter": "leaky", "detach": True, "ttl": 600})
    assert eventually(lambda: lease["lease"] in recorded_tokens(tmp_path / "state"))
    go.touch()
    escapee = read_pidfile(pidfile, roles=("escapee",))["escapee"]
    assert eventually(lambda: getattr(process.read_stat(escapee.pid), "ppid", None) == first.pid)
    client.call("sweep")  # learns the escapee, still tagged, as a member
    (tmp_path / "go.untag").touch()
    assert eventually(lambda: process.read_cmdline(escapee.pid) == ["sleep", "600"])
    assert eventually(lambda: escapee.pid in recorded_pids(tmp_path / "state"), timeout=3.0), "the escapee never reached the record"

    kill_9(first)
    second = start_daemon(adapter, **settings)
    client = second.client()
    assert [row["instance"] for row in client.call("status")["instances"]] == [lease["instance"]]
    client.call("release", {"lease": lease["lease"]})
    assert wait_all_gone({"escapee": escapee}, second.pid, timeout=5.0) == {}


def recorded_pids(state_dir: Path) -> set[int]:
    return {member["pid"] for instance in recorded_instances(state_dir) for member in instance.get("processes", [])}
