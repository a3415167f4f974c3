"""Continuity of service: `python -m bench.continuity [--quick]`.

Two workloads of our daemon alone, each with PASS/FAIL lines:

* **Upgrades under load.** N in-place upgrades (`upgrade`, one after another)
  while 32 connections (4 processes, `bench/statusload.py`) loop `status`
  and one client talks to an `echo` adapter (`/bin/cat`) through the fds it
  was passed. Targets: 0 failed requests, 0 closed connections, 0 adapter
  pids changed, 0 bytes lost; the longest latency of the requests that were
  in flight during an upgrade at most 250 ms (also its p99).
* **kill -9 and restart.** K cycles of `kill -9` of the daemon and a new
  daemon on the same state_dir, with 100 instances (half on detached leases,
  half on leases bound to one connection, which the client resumes after each
  restart). Targets: every instance adopted and every bound lease resumed in
  every cycle, 0 processes leaked once all are released, and a restart
  serving (`hello` answered) within 1 s of its start.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import procwatch, stats, systems, targets
from bench.session import Session, open_session
from supervisor.client import Client

LOAD_PROCESSES = 4
LOAD_CONNECTIONS = 32
# The quick run (bench/run --quick) keeps to its budget with fewer rounds.
QUICK_UPGRADES, FULL_UPGRADES = 3, 20
QUICK_RESTARTS, FULL_RESTARTS = 2, 10
INSTANCES = 100
STATUS_LOAD = systems.BENCH_DIR / "statusload.py"


def upgrades_under_load(session: Session, upgrades: int) -> dict[str, Any]:
    daemon = systems.Ours(session.workdir / "upgrades", session.env, name="ours-upgrades")
    session.start_systems(daemon)
    holder = Client(daemon.endpoint, timeout=30)
    echo, (stdin_fd, stdout_fd) = holder.call_with_fds("acquire", {"job": "echo", "adapter": "echo", "fds": True})
    idle = [holder.call("acquire", {"job": f"idle-{i}", "adapter": "idle"}) for i in range(4)]
    pids_before = sorted(row["pid"] for row in holder.call("status")["instances"])
    duration = 1.5 + upgrades * 1.2  # an upgrade takes 0.5-0.8 s, then a 0.3 s rest
    loads = [
        subprocess.Popen(
            [sys.executable, str(STATUS_LOAD), daemon.endpoint, str(LOAD_CONNECTIONS // LOAD_PROCESSES), str(duration)],
            stdout=subprocess.PIPE, env=session.env,
        )
        for _ in range(LOAD_PROCESSES)
    ]
    session.helpers.extend(loads)
    echoed = {"sent": 0, "received": 0, "wrong": 0}
    stop_echo = threading.Event()

    def talk() -> None:
        # Lines through the adapter's own pipes, all the while.
        with os.fdopen(stdin_fd, "wb", buffering=0) as stdin, os.fdopen(stdout_fd, "rb", buffering=0) as stdout:
            number = 0
            while not stop_echo.is_set():
                line = f"line {number}\n".encode()
                stdin.write(line)
                echoed["sent"] += len(line)
                back = stdout.readline()
                echoed["received"] += len(back)
                echoed["wrong"] += back != line
                number += 1
                time.sleep(0.001)

    talker = threading.Thread(target=talk)
    talker.start()
    time.sleep(0.5)
    windows: list[tuple[int, int]] = []
    refused: list[str] = []
    upgrader = Client(daemon.endpoint, timeout=90)
    for _ in range(upgrades):
        began = time.monotonic_ns()
        try:
            upgrader.call("upgrade", {})
        except Exception as exc:  # noqa: BLE001 (reported, not raised)
            refused.append(str(exc))
        windows.append((began, time.monotonic_ns()))
        time.sleep(0.3)
    results = []
    for popen in loads:
        out, _ = popen.communicate(timeout=duration + 60)
        session.helpers.remove(popen)
        results.append(json.loads(out))
    stop_echo.set()
    talker.join(30)
    pids_after = sorted(row["pid"] for row in holder.call("status")["instances"])
    hello = holder.call("hello")
    for lease in [echo, *idle]:
        holder.call("release", {"lease": lease["lease"]})
    holder.close()
    upgrader.close()
    session.stop_system(daemon)
    requests = [r for result in results for r in result["requests"]]
    overlapping = [
        latency for sent, latency in requests
        if any(sent <= end and sent + latency >= began for began, end in windows)
    ]
    return {
        "upgrades": upgrades,
        "upgrades_refused": refused,
        "generation": hello["generation"],
        "same_pid": hello["pid"] == daemon.pid,
        "requests": len(requests),
        "failed": sum(r["failed"] for r in results),
        "closed": sum(r["closed"] for r in results),
        "unanswered": sum(r["unanswered"] for r in results),
        "pids_changed": len(set(pids_before) ^ set(pids_after)),
        "echo_bytes_lost": echoed["sent"] - echoed["received"] + echoed["wrong"],
        "echo_bytes": echoed["sent"],
        "overlapping": stats.summarize_ms(overlapping),
        "upgrade_call": stats.summarize_ms([end - began for began, end in windows]),
    }


def kill_and_restart(session: Session, cycles: int) -> dict[str, Any]:
    daemon = systems.Ours(session.workdir / "restarts", session.env, name="ours-restarts")
    session.start_systems(daemon)
    holder = Client(daemon.endpoint, timeout=30)
    detached = [
        holder.call("acquire", {"job": f"d-{i}", "adapter": "idle", "detach": True, "ttl": 3600})
        for i in range(INSTANCES // 2)
    ]
    bound = [holder.call("acquire", {"job": f"b-{i}", "adapter": "idle"}) for i in range(INSTANCES - len(detached))]
    pids = {lease["pid"] for lease in detached + bound}
    tokens = {lease["lease"] for lease in detached + bound}
    record = daemon.workdir / "state" / "instances.json"
    adopted: list[int] = []
    resumed: list[int] = []
    serving_s: list[float] = []
    same_pids: list[bool] = []
    for _ in range(cycles):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not tokens <= _recorded_tokens(record):
            time.sleep(0.02)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.popen.wait()  # type: ignore[union-attr]
        holder.close()
        started = time.monotonic()
        daemon.start()
        while True:
            try:
                with Client(daemon.endpoint, timeout=5) as probe:
                    probe.call("hello")
                break
            except OSError:
                if time.monotonic() - started > 30:
                    raise RuntimeError(f"the restarted daemon did not answer:\n{daemon.log_tail()}") from None
                time.sleep(0.005)
        serving_s.append(time.monotonic() - started)
        holder = Client(daemon.endpoint, timeout=30)
        rows = holder.call("status")["instances"]
        adopted.append(sum(1 for row in rows if row["adopted"]))
        same_pids.append({row["pid"] for row in rows} == pids)
        resumed.append(len(holder.call("resume", {"leases": [lease["lease"] for lease in bound]})["resumed"]))
    for lease in detached + bound:
        holder.call("release", {"lease": lease["lease"]})
    holder.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        session.reap()
        time.sleep(0.05)
    leaked = sum(1 for pid in pids if _alive(pid))
    session.stop_system(daemon)
    return {
        "cycles": cycles, "instances": INSTANCES, "adopted": adopted, "resumed": resumed,
        "same_pids": all(same_pids), "leaked": leaked, "serving_s": [round(s, 3) for s in serving_s],
    }


def _alive(pid: int) -> bool:
    stat = procwatch.read_stat(pid)
    return stat is not None and stat[0] not in procwatch.EXITED_STATES


def _recorded_tokens(path: Path) -> set[str]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return {lease["token"] for i in record.get("instances", []) for lease in i.get("leases", [])}


def run(session: Session, *, quick: bool) -> dict[str, Any]:
    """Both workloads; judged by `bench.targets.judge_continuity`."""
    upgrades = upgrades_under_load(session, QUICK_UPGRADES if quick else FULL_UPGRADES)
    restarts = kill_and_restart(session, QUICK_RESTARTS if quick else FULL_RESTARTS)
    return {"upgrades": upgrades, "restarts": restarts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.continuity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=(
        f"{QUICK_UPGRADES} upgrades and {QUICK_RESTARTS} restarts instead of {FULL_UPGRADES} and {FULL_RESTARTS}"))
    parser.add_argument("--keep", action="store_true", help="keep the daemons' logs and configs")
    args = parser.parse_args(argv)
    with open_session(_log, keep=args.keep) as session:
        results = run(session, quick=args.quick)
    print(json.dumps(results, indent=1))
    verdicts = targets.judge_continuity(results)
    for verdict in verdicts:
        print(f"  {verdict.status:7} {verdict.name}: {verdict.measured} (target {verdict.limit})")
    return 0 if all(v.status == "PASS" for v in verdicts) else 1


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
