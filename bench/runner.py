"""`python -m bench`: run every workload against all systems, print the table,
write the JSON. See bench/README.md.

Order: start every daemon at once (ours in cgroup mode for control and
lifecycle, ours in process-table mode, a fresh ours for the sweep, a fresh ours
for connections, supervisord, circus); control round trips; start/stop/leaks;
stop the peers and the control daemon so that the host is quiet; sweep cost in
cgroup mode; the acquire cost as daemons fill (the sweep daemon, still holding
its 1000 instances, and daemons of its own for the other levels); the sweep
daemon's shutdown; sweep cost in process-table mode; footprint; then stop
everything that is left and check that no process of the run survives.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import (
    continuity,
    control,
    envs,
    fillcost,
    footprint,
    lifecycle,
    procwatch,
    report,
    sweepcost,
    systems,
    targets,
)
from bench.session import Session, open_session

RESULTS_DIR = envs.BENCH_DIR / "results"

# Exit status of a run stopped by SIGINT or SIGTERM (128 + SIGINT, as shells do).
EXIT_INTERRUPTED = 130

QUICK_BUDGET_S = 60.0
FULL_BUDGET_S = 600.0

# Control-tree members that outlive their stop get this long before the driver
# kills them (the peers leak; this workload does not count leaks).
CONTROL_TREE_STOP_S = 3.0


@dataclass(frozen=True)
class Plan:
    name: str
    control: control.ControlPlan
    trials: dict[str, int]
    sweep_cgroup: sweepcost.SweepPlan
    sweep_process_table: sweepcost.SweepPlan
    fill: fillcost.FillPlan
    # Idle connections the footprint workload holds.
    connections: int
    budget_s: float


QUICK = Plan(
    name="quick",
    # 4 rounds of 600: a round's first requests follow the other systems'
    # rounds and run cold, and 10 rounds of 240 let them move the medians.
    control=control.ControlPlan(warmup=100, single=2400, rounds=4, pairs=200, load_warmup_s=0.2, load_duration_s=1.0,
                                load_start_slack_s=0.6),
    # 24 start/stop trials of ours and of the floor: with 12, the median of
    # either moved by 10-20% from run to run, and the cold-acquire ratio with it.
    # A peer's trial takes over 2 s (it leaks, so its leak window runs out),
    # hence 2 of each, spread over the 24 rounds (see lifecycle.run_interleaved);
    # 3 took the quick run past its budget once continuity and fill joined it.
    trials={"raw": 24, "ours": 24, "ours-process-table": 4, "supervisord": 2, "circus": 2},
    # 9 sweeps per level (a few ms each at 1000 instances, so nothing of the
    # budget): the two modes are measured seconds apart, and with 4 or 5
    # samples a busy stretch of the host under one of them moved the ratio
    # of their medians between 1.2x and 3.6x from run to run.
    sweep_cgroup=sweepcost.SweepPlan(levels=(10, 100, 1000), samples=9),
    sweep_process_table=sweepcost.SweepPlan(levels=(10, 100, 1000), samples=9),
    # Batches of 50 in 4 windows (about 4 s in all): the quick run's budget;
    # the ratio is a median of paired windows, which one slow stretch of the
    # host moves less than a median of each level's windows.
    fill=fillcost.FillPlan(levels=(100, 1000), windows=4, batch=50, status_samples=5),
    connections=1000,
    budget_s=QUICK_BUDGET_S,
)

FULL = Plan(
    name="full",
    control=control.ControlPlan(warmup=1000, single=20000, rounds=10, pairs=5000, load_warmup_s=1.0, load_duration_s=10.0,
                                load_start_slack_s=1.0),
    trials={"raw": 40, "ours": 40, "ours-process-table": 20, "supervisord": 10, "circus": 10},
    sweep_cgroup=sweepcost.SweepPlan(levels=(10, 100, 1000), samples=40),
    sweep_process_table=sweepcost.SweepPlan(levels=(10, 100, 1000), samples=15),
    fill=fillcost.FillPlan(levels=(100, 1000, 10000), windows=7),
    connections=10_000,
    budget_s=FULL_BUDGET_S,
)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    os_name = platform.system()
    try:
        with open("/etc/os-release") as release:
            for line in release:
                if line.startswith("PRETTY_NAME="):
                    os_name = line.split("=", 1)[1].strip().strip('"')
    except FileNotFoundError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
    }


def peer_version(env: envs.PeerEnv, distribution: str) -> str:
    result = subprocess.run(
        [str(env.python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        capture_output=True, text=True, cwd=env.path, timeout=60, check=False,
    )
    return result.stdout.strip() or "?"


def stop_control_tree(session: Session, system: systems.System, agent: systems.Agent) -> None:
    members = procwatch.read_pidfile(str(system.pidfile))
    watch = session.watch(members)
    agent.request("stop", job="control", pids=[(m.pid, m.start_time) for m in members])
    deadline = time.monotonic() + CONTROL_TREE_STOP_S
    while not watch.all_exited and time.monotonic() < deadline:
        watch.poll(0.05)
    watch.kill_alive()
    watch.close()
    session.reap()


class Phases:
    """Wall time of each phase, for the JSON and for keeping within budget."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.times: dict[str, float] = results["meta"].setdefault("phase_s", {})
        self.name: str | None = None
        self.started = 0.0

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        if self.name is not None:
            self.times[self.name] = round(now - self.started, 1)
        self.name, self.started = name, now

    def end(self) -> None:
        self("")


def run_all(session: Session, plan: Plan, results: dict[str, Any]) -> None:
    phase = Phases(results)
    work = session.workdir
    ours = systems.Ours(work / "ours", session.env)
    ours_pt = systems.Ours(work / "ours-pt", session.env, cgroup="off", name="ours-process-table",
                           sweep_interval=sweepcost.PERIODIC_INTERVAL_S)
    ours_sweep = systems.Ours(work / "ours-sweep", session.env, sweep_interval=sweepcost.PERIODIC_INTERVAL_S,
                              name="ours-sweep")
    ours_conns = systems.Ours(work / "ours-conns", session.env, name="ours-connections")
    supervisord = systems.Supervisord(work / "supervisord", session.env)
    circus = systems.Circus(work / "circus", session.env)
    echo = systems.Echo(work / "echo", session.env)
    phase("start")
    log("starting ours (x4), supervisord, circus and the echo floor")
    session.start_systems(ours, ours_pt, ours_sweep, ours_conns, supervisord, circus, echo)
    results["meta"]["ours_mode"] = ours.mode()
    if ours_pt.mode() != "process-table":
        raise RuntimeError("the process-table daemon did not start in process-table mode")
    if ours_sweep.mode() != ours.mode():
        raise RuntimeError("the sweep daemon did not start in the same mode as the control daemon")

    phase("control")
    peers = {"ours": ours, "supervisord": supervisord, "circus": circus}
    agents = {name: session.agent(system) for name, system in peers.items()}
    for name, system in peers.items():
        control.start_control_tree(system, agents[name])
    agents["echo"] = session.agent(echo)
    results["control"] = control.run(session, plan.control, {**peers, "echo": echo}, agents)
    results["peer_rss_bytes"] = {n: results["control"]["single"][n]["daemon_rss_bytes"] for n in control.PEERS}
    for name, system in peers.items():
        stop_control_tree(session, system, agents[name])
    session.stop_system(echo)

    phase("lifecycle")
    runs = [
        ("raw", session.raw_agent(work / "raw.pids"), work / "raw.pids", None),
        ("ours", agents["ours"], ours.pidfile, ours.pid),
        ("ours-process-table", session.agent(ours_pt), ours_pt.pidfile, ours_pt.pid),
        ("supervisord", agents["supervisord"], supervisord.pidfile, supervisord.pid),
        ("circus", agents["circus"], circus.pidfile, circus.pid),
    ]
    log("lifecycle: " + ", ".join(f"{name} x{plan.trials[name]}" for name, *_ in runs) + " start/stop trials, interleaved")
    trials = lifecycle.run_interleaved(
        session, {name: (agent, str(pidfile), plan.trials[name]) for name, agent, pidfile, _ in runs}
    )
    lifecycle.wait_leak_window([t for ts in trials.values() for t in ts])
    lifecycle_results: dict[str, Any] = {
        name: lifecycle.summarize(trials[name], daemon_pid) for name, _, _, daemon_pid in runs
    }
    lifecycle_results["ratios"] = lifecycle.ratios(lifecycle_results)
    results["lifecycle"] = lifecycle_results

    # A quiet host for the sweep and footprint workloads.
    phase("stop peers")
    for system in (supervisord, circus, ours):
        session.stop_system(system)

    phase("sweep cgroup")
    results["sweep"] = {}
    key = "cgroup" if ours_sweep.mode() == "cgroup" else "process-table (cgroup unavailable)"
    sweep = results["sweep"][key] = sweepcost.run(session, ours_sweep, plan.sweep_cgroup)
    phase("fill")
    # The sweep daemon holds 1000 idle instances now: the fill workload's
    # 1000 level, with daemons of its own for the other levels.
    held = {max(plan.sweep_cgroup.levels): ours_sweep} if ours_sweep.mode() == "cgroup" else {}
    log(f"fill: acquire cost at {', '.join(map(str, plan.fill.levels))} live instances")
    results["fill"] = fillcost.run(session, plan.fill, held=held)
    phase("sweep cgroup shutdown")
    log("sweep: stopping the daemon with its instances")
    sweep["shutdown"] = sweepcost.stop_and_count_leaks(session, ours_sweep)
    phase("sweep process-table")
    sweep = results["sweep"]["process-table"] = sweepcost.run(session, ours_pt, plan.sweep_process_table)
    sweep["shutdown"] = sweepcost.stop_and_count_leaks(session, ours_pt)

    phase("footprint")
    results["footprint"] = footprint.run(session, ours_conns, plan.connections)

    phase("continuity")
    log("continuity: upgrades under load, then kill -9 and restarts")
    results["continuity"] = continuity.run(session, quick=plan.name == "quick")
    phase.end()


def ours_leaks(results: dict[str, Any], session: Session) -> dict[str, int]:
    leaks: dict[str, int] = {}
    for name in ("ours", "ours-process-table"):
        entry = results.get("lifecycle", {}).get(name)
        if entry is not None:
            leaks[f"{name} trees"] = entry["leaked_total"]
            leaks[f"{name} zombies"] = entry["zombies_left"]
    for mode, sweep in results.get("sweep", {}).items():
        if "shutdown" in sweep:
            leaks[f"{mode} shutdown"] = sweep["shutdown"]["alive_after_shutdown"]
    leaks["end-of-run leftovers"] = session.ours_leftovers
    return leaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"the short run (under {QUICK_BUDGET_S:.0f} s)")
    parser.add_argument("--json", type=Path, help="where to write the results (default: bench/results/)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    envs.check_ours_is_ours()
    envs.compile_ours()
    install_s = envs.ensure(envs.SUPERVISORD, log) + envs.ensure(envs.CIRCUS, log)
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: dict[str, Any] = {
        "meta": {
            "mode": plan.name,
            "started_at": started_at,
            "machine": machine(),
            "versions": {
                "ours": importlib.metadata.version("adapter-supervisor"),
                "supervisord": peer_version(envs.SUPERVISORD, "supervisor"),
                "circus": peer_version(envs.CIRCUS, "circus"),
            },
            "install_s": round(install_s, 1),
        },
    }
    aborted = None
    try:
        with open_session(log, keep=args.keep) as session:
            try:
                run_all(session, plan, results)
            except (RuntimeError, OSError, TimeoutError, ValueError, KeyError) as exc:
                aborted = f"run aborted: {type(exc).__name__}: {exc}"
                log(aborted)
    except KeyboardInterrupt:
        log("interrupted; every process the run started has been stopped")
        return EXIT_INTERRUPTED
    results["errors"] = session.errors + ([aborted] if aborted else [])
    results["leftovers"] = session.leftovers
    results["leaks_ours"] = ours_leaks(results, session)
    elapsed = time.monotonic() - started
    results["meta"]["elapsed_s"] = round(elapsed, 1)
    verdicts = targets.judge(results)
    results["targets"] = [v.to_json() for v in verdicts]
    print(report.render(results, verdicts))
    print(f"\nelapsed {elapsed:.1f} s (budget {plan.budget_s:.0f} s)"
          + ("" if elapsed <= plan.budget_s else "  OVER BUDGET"))
    path = args.json or RESULTS_DIR / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{plan.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
    if aborted:
        return 2
    return 0 if all(v.status == "PASS" for v in verdicts) and not results["errors"] else 1
