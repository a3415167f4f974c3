"""The trio thread's short time slice (supervisor/procs/timeslice.py), on real threads and
processes: it applies to the thread that asks, and to nothing it starts.

Custom slices need Linux 6.12 or later; on an older kernel (no custom slice to
see) these tests are skipped with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from supervisor.procs import timeslice
from tests.conftest import eventually

SLICE_US = 200


def default_slice_ns() -> int:
    """The slice of a process nobody asked anything for."""
    out = subprocess.run(["cat", "/proc/self/sched"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("se.slice"))
    return int(line.split(":")[1])


def task_slice_ns(pid: int, tid: int | None = None) -> int:
    with open(f"/proc/{pid}/task/{tid or pid}/sched") as file:
        line = next(line for line in file if line.startswith("se.slice"))
    return int(line.split(":")[1])


def run_python(code: str) -> dict[str, object]:
    """Run `code` in a fresh interpreter (its scheduling is its own) and
    return the JSON object it printed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def custom_slices_supported() -> bool:
    code = (
        "from supervisor.procs import timeslice\n"
        f"timeslice.request_slice({SLICE_US})\n"
        "print(timeslice.thread_slice_ns())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return result.returncode == 0 and result.stdout.strip() == str(SLICE_US * 1000)


pytestmark = pytest.mark.skipif(
    not custom_slices_supported(), reason="this kernel has no custom SCHED_OTHER slices (Linux < 6.12)"
)


def test_the_slice_is_the_callers_alone_not_its_threads_or_children() -> None:
    # A fresh interpreter asks, then starts a thread and a child, and reports
    # all three slices as the kernel shows them.
    code = (
        "import json, subprocess, threading\n"
        "from supervisor.procs import timeslice\n"
        f"timeslice.request_slice({SLICE_US})\n"
        "seen = {'caller': timeslice.thread_slice_ns()}\n"
        "thread = threading.Thread(target=lambda: seen.update(thread=timeslice.thread_slice_ns()))\n"
        "thread.start(); thread.join()\n"
        "child = subprocess.run(['cat', '/proc/self/sched'], capture_output=True, text=True).stdout\n"
        "seen['child'] = int(next(l for l in child.splitlines() if l.startswith('se.slice')).split(':')[1])\n"
        "print(json.dumps(seen))\n"
    )
    seen = run_python(code)
    default = default_slice_ns()
    assert seen == {"caller": SLICE_US * 1000, "thread": default, "child": default}


def test_the_daemon_thread_runs_with_the_configured_slice_and_its_adapters_do_not(start_daemon, tmp_path) -> None:
    daemon = start_daemon('[adapters.idle]\ncommand = ["sleep", "60"]\n', latency_slice_us=SLICE_US)
    event = daemon.wait_for_event("daemon.latency_slice")
    assert (event["slice_us"], event["kernel_slice_ns"]) == (SLICE_US, SLICE_US * 1000)
    # The trio thread is the process's main thread.
    assert task_slice_ns(daemon.pid) == SLICE_US * 1000
    client = daemon.client()
    lease = client.acquire("job-1", "idle")
    assert task_slice_ns(lease.pid) == default_slice_ns()
    worker_threads = [int(tid) for tid in os.listdir(f"/proc/{daemon.pid}/task") if int(tid) != daemon.pid]
    assert all(task_slice_ns(daemon.pid, tid) == default_slice_ns() for tid in worker_threads)
    lease.release()


def test_a_zero_slice_leaves_the_scheduler_alone(start_daemon) -> None:
    daemon = start_daemon('[adapters.idle]\ncommand = ["sleep", "60"]\n', latency_slice_us=0)
    eventually(lambda: any(e.get("event") == "daemon.ready" for e in daemon.log_events()))
    assert task_slice_ns(daemon.pid) == default_slice_ns()
    assert not [e for e in daemon.log_events() if str(e.get("event", "")).startswith("daemon.latency_slice")]


def test_an_unknown_architecture_is_refused_with_enosys(monkeypatch) -> None:
    monkeypatch.setattr(timeslice.platform, "machine", lambda: "vax")
    with pytest.raises(OSError) as raised:
        timeslice.request_slice(SLICE_US)
    assert raised.value.errno == errno.ENOSYS


def test_a_batch_thread_stays_batch_and_an_idle_one_is_left_alone() -> None:
    code = (
        "import json, os\n"
        "from supervisor.procs import timeslice\n"
        "seen = {}\n"
        "os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))\n"
        f"timeslice.request_slice({SLICE_US})\n"
        "policy = lambda: os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK\n"
        "seen['batch'] = [policy() == os.SCHED_BATCH, timeslice.thread_slice_ns()]\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "try:\n"
        "    timeslice.request_slice(1000)\n"
        "except OSError as exc:\n"
        "    seen['idle'] = [exc.errno, policy() == os.SCHED_IDLE]\n"
        "print(json.dumps(seen))\n"
    )
    seen = run_python(code)
    assert seen["batch"] == [True, SLICE_US * 1000]
    assert seen["idle"] == [errno.EINVAL, True]
