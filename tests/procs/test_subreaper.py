"""subreaper: becoming a child subreaper, inheriting escapees, reaping by pid.

Whatever turns a process into a subreaper runs in a child interpreter, so the test
process itself never becomes one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from supervisor.procs import subreaper

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs as its own process. Every process it forks blocks on a pipe whose write end
# only this script holds, so if the script dies they all see EOF and exit.
SUBREAPER_SCRIPT = r"""
import json, os, time
from supervisor.procs import process
from supervisor.procs import subreaper

def until(predicate):
    deadline = time.monotonic() + 5
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.002)
    return value

def reap(pid):
    deadline = time.monotonic() + 5
    while (code := subreaper.reap_pid(pid)) is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return code

out = {"before": subreaper.is_child_subreaper()}
subreaper.become_child_subreaper()
out["after"] = subreaper.is_child_subreaper()
out["no_children"] = subreaper.waitable_children()
me = os.getpid()

report_r, report_w = os.pipe()
hold_r, hold_w = os.pipe()
middle = os.fork()
if middle == 0:
    os.setsid()
    escapee = os.fork()
    if escapee == 0:
        os.close(hold_w)
        os.read(hold_r, 1)
        os._exit(7)
    os.write(report_w, str(escapee).encode())
    os._exit(0)
os.close(report_w)
os.close(hold_r)
escapee = int(os.read(report_r, 64))
out["escapee_session_differs"] = os.getsid(escapee) != os.getsid(0)

out["middle_code"] = reap(middle)
out["middle_code_again"] = subreaper.reap_pid(middle)
out["escapee_ppid_is_me"] = bool(until(lambda: process.read_stat(escapee).ppid == me))
out["escapee_running_reaped"] = subreaper.reap_pid(escapee)
out["waitable_while_running"] = subreaper.waitable_children()
escapee_id = process.identify(escapee)

os.close(hold_w)
out["waitable"] = until(subreaper.waitable_children)
out["peek_again"] = subreaper.waitable_children()
out["zombie_not_gone_for_us"] = not process.is_gone(escapee_id, our_pid=me)
out["escapee_code"] = subreaper.reap_pid(escapee)
out["gone_after_reap"] = process.is_gone(escapee_id, our_pid=me)
out["escapee_code_again"] = subreaper.reap_pid(escapee)
out["waitable_after"] = subreaper.waitable_children()
out["escapee"] = escapee

# Several children at once: the documented peek-then-reap loop collects them all.
kids = {}
for code in (1, 2, 3):
    pid = os.fork()
    if pid == 0:
        os._exit(code)
    kids[pid] = code
until(lambda: all(process.read_stat(pid).state == "Z" for pid in kids))
reaped = {}
while pids := subreaper.waitable_children():
    for pid in pids:
        reaped[pid] = subreaper.reap_pid(pid)
out["loop_matches"] = reaped == kids
print(json.dumps(out))
"""


def run_script(script: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(call: Callable[[], int | None], timeout: float = 5.0) -> int | None:
    deadline = time.monotonic() + timeout
    while (value := call()) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


def test_a_subreaper_inherits_and_reaps_a_setsid_double_forked_escapee() -> None:
    out = run_script(SUBREAPER_SCRIPT)
    assert out["before"] is False
    assert out["after"] is True
    assert out["no_children"] == []
    assert out["escapee_session_differs"] is True
    assert out["middle_code"] == 0
    assert out["middle_code_again"] is None
    assert out["escapee_ppid_is_me"] is True
    assert out["escapee_running_reaped"] is None
    assert out["waitable_while_running"] == []
    assert out["waitable"] == [out["escapee"]]
    assert out["peek_again"] == [out["escapee"]]
    assert out["zombie_not_gone_for_us"] is True
    assert out["escapee_code"] == 7
    assert out["gone_after_reap"] is True
    assert out["escapee_code_again"] is None
    assert out["waitable_after"] == []
    assert out["loop_matches"] is True
    assert not subreaper.is_child_subreaper()


def test_reap_pid_collects_exit_status_and_signal() -> None:
    exits = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert subreaper.reap_pid(sleeper.pid) is None
        assert sleeper.poll() is None, "reap_pid must not reap a running child"
        sleeper.send_signal(signal.SIGTERM)
        assert wait_for(lambda: subreaper.reap_pid(sleeper.pid)) == -signal.SIGTERM
        assert wait_for(lambda: subreaper.reap_pid(exits.pid)) == 3
        assert subreaper.reap_pid(exits.pid) is None
    finally:
        for proc in (exits, sleeper):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)


def test_popen_copes_when_reap_pid_took_its_child() -> None:
    proc = subprocess.Popen(["sh", "-c", "exit 5"])
    assert wait_for(lambda: subreaper.reap_pid(proc.pid)) == 5
    # Popen never saw the status; it must neither raise nor hang.
    assert proc.poll() is not None
    assert proc.wait(timeout=1) is not None


def test_reap_pid_of_a_process_that_is_not_our_child() -> None:
    assert subreaper.reap_pid(1) is None
    assert subreaper.reap_pid(os.getpid()) is None


def test_child_has_exited_peeks_without_reaping() -> None:
    child = subprocess.Popen(["/bin/sleep", "5"])
    try:
        assert subreaper.child_has_exited(child.pid) is False
        child.kill()
        deadline = time.monotonic() + 5
        while not subreaper.child_has_exited(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        # Peeked, not reaped: the status is still there to collect.
        assert subreaper.reap_pid(child.pid) == -signal.SIGKILL
        child.returncode = -signal.SIGKILL
        # Reaped: gone counts as exited too.
        assert subreaper.child_has_exited(child.pid) is True
    finally:
        if child.returncode is None:
            child.kill()
            child.wait()


async def test_the_reaper_leaves_a_child_others_wait_for_and_reaps_the_rest_once_it_is_gone() -> None:
    # The check of an upgrade's new code runs under trio.run_process, which
    # waits for its child itself: the reaper must not take its exit status,
    # and the children that exit meanwhile are reaped once it is collected,
    # without a further SIGCHLD.
    import trio

    reaper = subreaper.ChildReaper()
    helper = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    reaper.others.add(helper.pid)
    while not subreaper.child_has_exited(helper.pid):
        time.sleep(0.01)
    other = subprocess.Popen(["true"])
    while not subreaper.child_has_exited(other.pid):
        time.sleep(0.01)
    adopted: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        await trio.sleep(0.1)
        adopted += reaper.take_adopted()
        assert helper.pid not in [pid for pid, _ in adopted]
        assert helper.wait() == 3  # its own waiter gets the true status
        reaper.others.discard(helper.pid)
        with trio.fail_after(5):
            while other.pid not in [pid for pid, _ in adopted]:
                await trio.sleep(0.01)
                adopted += reaper.take_adopted()
        nursery.cancel_scope.cancel()
    assert (other.pid, 0) in adopted
    other.returncode = 0  # (reaped by the reaper, as an adopted child)


def test_reap_children_reaps_the_named_children_by_pid_and_routes_their_statuses() -> None:
    # What a stop uses instead of a walk of every child: only the named pids
    # are reaped, a root's status goes to its callback, another child's is
    # kept as adopted, and a child others wait for is left to them.
    reaper = subreaper.ChildReaper()
    root = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(5)"])
    escapee = subprocess.Popen(["true"])
    helper = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    bystander = subprocess.Popen(["true"])
    reaper.others.add(helper.pid)
    statuses: list[int] = []
    reaper.watch_root(root.pid, statuses.append, spawned_after=float("-inf"))
    for child in (root, escapee, helper, bystander):
        while not subreaper.child_has_exited(child.pid):
            time.sleep(0.01)
    reaper.reap_children([root.pid, escapee.pid, helper.pid, os.getpid()])
    assert statuses == [5]
    assert reaper.take_adopted() == [(escapee.pid, 0)]
    # Not named: still waitable, for the reaper's own walk or its waiter.
    assert subreaper.child_has_exited(bystander.pid) and process_is_zombie(bystander.pid)
    assert helper.wait() == 3
    assert bystander.wait() == 0
    root.returncode, escapee.returncode = 5, 0


def process_is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_reap_takes_the_expected_children_by_pid_and_walks_once_for_the_rest(monkeypatch) -> None:
    # A burst of stops: the roots expected to exit are reaped by pid, so the
    # walk of every child (a peek) runs once, to find the one nobody expected
    # and then nothing.
    reaper = subreaper.ChildReaper()
    roots = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({n})"]) for n in range(1, 9)]
    stray = subprocess.Popen(["true"])
    statuses: dict[int, int] = {}
    for root in roots:
        reaper.watch_root(root.pid, lambda code, pid=root.pid: statuses.__setitem__(pid, code), spawned_after=float("-inf"))
        reaper.expected.add(root.pid)
    for child in (*roots, stray):
        while not subreaper.child_has_exited(child.pid):
            time.sleep(0.01)
    peeks: list[list[int]] = []
    peek = subreaper.waitable_children

    def counted() -> list[int]:
        peeks.append(peek())
        return peeks[-1]

    monkeypatch.setattr(subreaper, "waitable_children", counted)
    reaper.reap()
    assert statuses == {root.pid: n for n, root in enumerate(roots, start=1)}
    assert peeks == [[stray.pid], []]
    assert reaper.take_adopted() == [(stray.pid, 0)]
    for n, root in enumerate(roots, start=1):
        root.returncode = n
    stray.returncode = 0
