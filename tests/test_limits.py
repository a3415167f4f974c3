"""Limits held by the limit watch against the real daemon: a tree over its
memory_limit is stopped within about a second whatever sweep_interval is, and
a tree with more processes than its max_pids (a fork bomb) is stopped while
the daemon keeps answering."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import anyio
import pytest

from supervisor.client import AsyncClient
from supervisor.procs import process
from tests.conftest import PYTHON, eventually, read_pidfile, tree_adapter, wait_all_gone

STOP_TIMEOUT = 0.5
# A sweep this far apart never runs during a test: whatever is stopped was
# stopped by the limit watch.
SLOW_SWEEP_S = 120.0
# Generous bound for "within about a second" on a loaded 2-core machine, still
# an order of magnitude under the sweep interval.
PROMPT_S = 10.0
MODES = ["auto", "off"]

# Allocates and touches 20 MiB every 0.1 s; after each step appends its RSS
# and the wall-clock time to `marks`.
HOG = """
import os, sys, time
marks = sys.argv[1]
held = []
while True:
    held.append(bytearray(20 * 2**20))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open(marks, "a") as f:
        f.write("%d %r\\n" % (rss, time.time()))
    time.sleep(0.1)
"""


# Forks `count` sleeping processes as fast as sh can, then waits.
BOMB = 'i=0; while [ $i -lt {count} ]; do sleep 600 & i=$((i+1)); done; echo forked >&2; wait'


def hog_adapter(name: str, marks: Path, limit: str = "100MiB") -> str:
    command = [PYTHON, "-c", HOG, str(marks)]
    return (
        f"[adapters.{name}]\ncommand = {json.dumps(command)}\nmemory_limit = {json.dumps(limit)}\n"
        f"stop_timeout = {STOP_TIMEOUT}\n"
    )


def bomb_adapter(name: str, count: int = 2000, max_pids: int = 64) -> str:
    command = ["/bin/sh", "-c", BOMB.format(count=count)]
    return f"[adapters.{name}]\ncommand = {json.dumps(command)}\nmax_pids = {max_pids}\nstop_timeout = {STOP_TIMEOUT}\n"


def start(start_daemon, adapters: str, cgroup: str, **settings: object):
    daemon = start_daemon(adapters, cgroup=cgroup, sweep_interval=SLOW_SWEEP_S, **settings)
    client = daemon.client()
    if cgroup == "auto" and not client.call("status")["daemon"]["cgroup_mode"]:
        pytest.skip("this host has no writable cgroup v2 hierarchy")
    return daemon, client


def tagged(instance: str) -> list[int]:
    """Live processes carrying the instance's tag, wherever they are."""
    return [
        s.pid for s in process.scan_processes()
        if s.state not in process.EXITED_STATES and process.read_environ_tag(s.pid) == instance
    ]


@pytest.mark.parametrize("cgroup", MODES)
def test_a_growing_tree_is_stopped_within_about_a_second_of_passing_its_memory_limit(
    start_daemon, tmp_path: Path, cgroup: str
) -> None:
    marks = tmp_path / "crossed"
    daemon, client = start(start_daemon, hog_adapter("hog", marks), cgroup)
    lease = client.call("acquire", {"job": "job-1", "adapter": "hog"})
    root = process.identify(lease["pid"])
    assert root is not None
    note = client.next_notification(timeout=SLOW_SWEEP_S / 2)
    told_at = time.time()
    assert note["method"] == "adapter_exited"
    assert note["params"]["instance"] == lease["instance"] and note["params"]["reason"] == "memory_limit"
    # The first step that put the hog over the limit, or (if it was stopped
    # before it could write that down) the last step before it: either way
    # no later than the crossing, so this bounds the delay from above.
    steps = [(int(rss), float(at)) for rss, at in (line.split() for line in marks.read_text().splitlines())]
    over = [at for rss, at in steps if rss > 100 * 2**20]
    crossed_at = over[0] if over else steps[-1][1]
    assert told_at - crossed_at < PROMPT_S
    assert wait_all_gone({"root": root}, daemon.pid, STOP_TIMEOUT + 1.0) == {}
    assert eventually(lambda: tagged(lease["instance"]) == [])
    over = [e for e in daemon.log_events() if e.get("event") == "adapter.over_memory"]
    assert [e["instance"] for e in over] == [lease["instance"]]
    assert over[0]["rss_bytes"] > over[0]["memory_limit"] == 100 * 2**20
    # No sweep ran: the next one reports the tree the watch stopped.
    assert [r["kind"] for r in client.call("reports")["reports"]] == ["startup"]
    assert client.call("sweep")["over_memory"] == [lease["instance"]]


@pytest.mark.parametrize("cgroup", MODES)
def test_a_fork_bomb_is_stopped_for_its_max_pids_while_the_daemon_keeps_answering(
    start_daemon, tmp_path: Path, cgroup: str
) -> None:
    bystander = tmp_path / "bystander"
    adapters = bomb_adapter("bomb") + tree_adapter(
        "calm", pidfile=bystander, args=("--no-escapee",), stop_timeout=STOP_TIMEOUT
    )
    daemon, holder = start(start_daemon, adapters, cgroup)
    calm = holder.call("acquire", {"job": "job-1", "adapter": "calm"})
    calm_members = read_pidfile(bystander, roles=("root", "child", "grandchild"))
    watcher = daemon.client()
    answered: list[int] = []
    stop_asking = threading.Event()

    def ask_status() -> None:
        # Another client keeps asking while the bomb goes off and is stopped.
        while not stop_asking.is_set():
            answered.append(len(watcher.call("status", {})["instances"]))

    asker = threading.Thread(target=ask_status)
    asker.start()
    try:
        lease = holder.call("acquire", {"job": "job-1", "adapter": "bomb"})
        note = holder.next_notification(timeout=SLOW_SWEEP_S / 2)
    finally:
        stop_asking.set()
        asker.join(30)
    assert not asker.is_alive() and answered
    assert note["params"]["instance"] == lease["instance"] and note["params"]["reason"] == "pids_limit"
    assert eventually(lambda: tagged(lease["instance"]) == [], timeout=STOP_TIMEOUT + 5.0)
    over = [e for e in daemon.log_events() if e.get("event") == "adapter.over_pids"]
    assert [e["instance"] for e in over] == [lease["instance"]]
    assert over[0]["pids"] > over[0]["max_pids"] == 64
    # The other instance was never touched and the daemon answers as before.
    assert wait_all_gone(calm_members, daemon.pid, 0.0) == calm_members
    states = {i["instance"]: (i["state"], i.get("reason")) for i in holder.call("status")["instances"]}
    assert states == {calm["instance"]: ("running", None), lease["instance"]: ("exited", "pids_limit")}
    # Counted once the stop is over (which may be a moment after the last process went).
    assert eventually(lambda: 'adapter="bomb",reason="pids_limit"} 1' in holder.call("metrics")["text"])


@pytest.mark.parametrize("cgroup", MODES)
def test_a_tree_at_its_max_pids_runs_on_and_one_past_it_is_stopped(start_daemon, tmp_path: Path, cgroup: str) -> None:
    # The tree adapter is a root, a child and a grandchild: three processes.
    adapters = tree_adapter(
        "exact", pidfile=tmp_path / "exact", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT, max_pids=3
    ) + tree_adapter(
        "tight", pidfile=tmp_path / "tight", args=("--no-escapee",), stop_timeout=STOP_TIMEOUT, max_pids=2
    )
    daemon, client = start(start_daemon, adapters, cgroup)
    exact = client.call("acquire", {"job": "job-1", "adapter": "exact"})
    members = read_pidfile(tmp_path / "exact", roles=("root", "child", "grandchild"))
    tight = client.call("acquire", {"job": "job-1", "adapter": "tight"})
    note = client.next_notification(timeout=PROMPT_S)
    assert note["params"]["instance"] == tight["instance"] and note["params"]["reason"] == "pids_limit"
    # Many looks later the tree at its limit still runs, whole.
    watched_at = time.monotonic()
    while time.monotonic() - watched_at < 1.5:
        time.sleep(0.1)
    with pytest.raises(TimeoutError):
        client.next_notification(timeout=0.1)
    assert wait_all_gone(members, daemon.pid, 0.0) == members
    states = {i["instance"]: i["state"] for i in client.call("status")["instances"]}
    assert states[exact["instance"]] == "running"


def test_no_limit_is_held_when_max_pids_is_zero(start_daemon, tmp_path: Path) -> None:
    daemon, client = start(start_daemon, bomb_adapter("unbounded", count=80, max_pids=0), "off")
    lease = client.call("acquire", {"job": "job-1", "adapter": "unbounded"})
    assert eventually(lambda: len(tagged(lease["instance"])) >= 81)
    with pytest.raises(TimeoutError):
        client.next_notification(timeout=1.0)
    client.call("release", {"lease": lease["lease"]})
    assert eventually(lambda: tagged(lease["instance"]) == [], timeout=STOP_TIMEOUT + 5.0)


def test_the_blocking_client_hears_of_a_pids_limit(start_daemon, tmp_path: Path) -> None:
    daemon, client = start(start_daemon, bomb_adapter("bomb", count=200, max_pids=16), "auto")
    with client.lease("job-1", "bomb") as lease:
        exited = lease.wait_exited(timeout=PROMPT_S)
    assert exited.reason == "pids_limit" and exited.instance == lease.instance


def test_the_async_client_hears_of_a_pids_limit(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(bomb_adapter("bomb", count=200, max_pids=16), sweep_interval=SLOW_SWEEP_S)

    async def main() -> tuple[str, str, str]:
        async with AsyncClient(daemon.socket) as client:
            async with client.lease("job-1", "bomb") as lease:
                with anyio.fail_after(PROMPT_S):
                    exited = await lease.wait_exited()
                return exited.reason, exited.instance, lease.instance

    reason, told, held = anyio.run(main, backend="trio")
    assert reason == "pids_limit" and told == held


def test_crossing_the_memory_budget_stops_nothing_and_is_logged_once(start_daemon, tmp_path: Path) -> None:
    # Two trees of ~64 MiB each against a 96 MiB budget: over it together,
    # neither over a limit of its own.
    adapters = "".join(
        tree_adapter(name, pidfile=tmp_path / name, args=("--no-escapee", "--allocate", "64"), stop_timeout=STOP_TIMEOUT)
        for name in ("left", "right")
    )
    daemon, client = start(start_daemon, adapters, "auto", memory_budget="96MiB")
    left = client.call("acquire", {"job": "job-1", "adapter": "left"})
    read_pidfile(tmp_path / "left", roles=("root", "child", "grandchild"))
    right = client.call("acquire", {"job": "job-1", "adapter": "right"})
    read_pidfile(tmp_path / "right", roles=("root", "child", "grandchild"))
    crossed = eventually(lambda: [e for e in daemon.log_events() if e.get("event") == "memory.over_budget"])
    assert len(crossed) == 1 and crossed[0]["rss_bytes"] > crossed[0]["memory_budget"] == 96 * 2**20
    time.sleep(1.0)
    with pytest.raises(TimeoutError):
        client.next_notification(timeout=0.1)
    assert len([e for e in daemon.log_events() if e.get("event") == "memory.over_budget"]) == 1
    states = {i["instance"]: i["state"] for i in client.call("status")["instances"]}
    assert states == {left["instance"]: "running", right["instance"]: "running"}
    client.call("release", {"lease": right["lease"]})
    assert eventually(lambda: [e for e in daemon.log_events() if e.get("event") == "memory.within_budget"])



def test_a_daemon_filling_up_does_not_count_its_trees_again_for_the_pids_its_own_spawns_took(
    start_daemon, tmp_path: Path
) -> None:
    # 800 roots take 800 pids, more than twice the trees' headroom (299): were
    # they counted as pids the trees might have forked, every tree would be
    # counted again at least twice more while the daemon fills up.
    adapters = '[adapters.idle]\ncommand = ["/bin/sleep", "600"]\nmax_pids = 300\nmax_instances = 1000\n'
    daemon, client = start(start_daemon, adapters, "off")
    first_pid = last_pid()
    for number in range(800):
        client.call("acquire", {"job": f"job-{number}", "adapter": "idle"})
    time.sleep(4 * 0.5)  # a few looks of the watch
    # What the rest of the host forked meanwhile may open the gate too (a
    # busy host forks hundreds of processes a second).
    elsewhere = (last_pid() - first_pid) % process_max() - 800
    counts = [e for e in daemon.log_events() if e["event"] == "limits.pids_counted"]
    assert 1 <= len(counts) <= 2 + max(0, elsewhere) // 299, (elsewhere, counts)


def last_pid() -> int:
    return int(Path("/proc/sys/kernel/ns_last_pid").read_text())


def process_max() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text())
