"""A stand-in for the daemon's place in the process table, for shell tests of
`procs.tree` and `engine.sweep`.

Those modules judge a process by its ancestry ("descends from the daemon", a
child subreaper) and its environment. The test process must not become a
subreaper itself (every orphan of every later test would turn into its zombie),
so `start_standin` runs a small program that does: it becomes a child
subreaper, starts the children it is given (argv and extra environment), prints
their pids and from then on only reaps. Whatever they fork, setsid() and
double-fork included, stays its descendant, exactly as under the daemon, and no
zombie of it lingers. Its pid is what the code under test gets as `daemon_pid`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from supervisor.procs import process
from tests.conftest import eventually

STANDIN_SCRIPT = r"""
import ctypes, json, os, signal, subprocess, sys

PR_SET_CHILD_SUBREAPER = 36

def reap(*_):
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
signal.signal(signal.SIGCHLD, reap)
base = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_SUPERVISOR_")}
children = [
    subprocess.Popen(child["argv"], env={**base, **child["env"]}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    for child in json.loads(sys.argv[1])
]
print(json.dumps([child.pid for child in children]), flush=True)
sys.stdin.read()  # until the test closes our stdin or kills us
"""


@dataclass
class StandIn:
    """A running stand-in daemon and the pids of the children it started, in order."""

    popen: subprocess.Popen[str]
    children: list[int]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def descendants(self) -> list[process.ProcStat]:
        return process.descendants(self.pid, process.scan_processes())

    def adopted(self, pid: int) -> bool:
        """Wait until `pid` (an escapee) is re-parented to the stand-in, that is
        until its first parent has exited; whether it was within 5 s."""
        return bool(eventually(lambda: (stat := process.read_stat(pid)) is not None and stat.ppid == self.pid))


@contextlib.contextmanager
def start_standin(*children: tuple[list[str], dict[str, str]]) -> Iterator[StandIn]:
    """Run a stand-in daemon starting `children` ((argv, extra environment)
    pairs); on exit SIGKILL every descendant it has, then the stand-in itself."""
    popen = subprocess.Popen(
        [sys.executable, "-c", STANDIN_SCRIPT, json.dumps([{"argv": a, "env": e} for a, e in children])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = popen.stdout.readline()
        if not line:
            raise AssertionError(f"the stand-in daemon exited with {popen.wait()} before starting its children")
        yield StandIn(popen, json.loads(line))
    finally:
        for stat in process.descendants(popen.pid, process.scan_processes()):
            process.signal_process(stat.process_id, signal.SIGKILL)
        popen.kill()
        popen.wait()
        popen.stdin.close()
        popen.stdout.close()
