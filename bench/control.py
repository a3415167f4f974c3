"""Control round trips: one client in a loop, and 32 concurrent clients.

Every system has one running tree while this runs (ours: one instance held by a
lease; supervisord: program `tree` RUNNING; circus: watcher `tree` active), and
the request asks for its state: our `status`, supervisord's
`getProcessInfo("tree")`, circus's `status` of watcher `tree`. Ours also does
warm `acquire` + `release` pairs on that running instance (refcount 1 -> 2 -> 1).

The single client is one bench/agent.py process per system, looping twice:
on a raw socket (the server's cost, next to the trio echo floor), and through
the system's own client library, as its users call it (ours: the blocking
`supervisor.client.Client`; supervisord: `xmlrpc.client` over its Unix-socket
transport, as supervisorctl does; circus: `circus.client.CircusClient`, as
circusctl does). The issue's orientation figures (supervisord about 0.5 ms,
a trio echo about 80 us) are of the second kind, so the 1-client targets are
judged on it; the raw-socket figures are reported beside them. The 32
clients are `LOAD_PROCESSES` bench/loadgen.py processes with 32 connections in
all, one request in flight on each; the daemon's CPU use during the window is
reported, so a reader can see whether the daemon (one core) or the load
generator was the limit.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from bench import procwatch, stats, systems
from bench.session import Session

OPERATION = {"ours": "status", "supervisord": "getProcessInfo", "circus": "status", "echo": "echo"}

# The call each system's client library makes for that request.
LIBRARY_CALL = {
    "ours": "Client.status()",
    "supervisord": "ServerProxy...getProcessInfo",
    "circus": "CircusClient.call(status)",
}

# Systems compared with ours; "echo" is the floor, not a peer.
PEERS = ("supervisord", "circus")

CONCURRENT_CLIENTS = 32


# Before measuring, wait (at most QUIET_TIMEOUT_S) until the host's CPUs are
# busy less than this fraction of the time: the daemons just started, and
# the trees just brought up, settle first.
QUIET_BUSY_FRACTION = 0.1
QUIET_TIMEOUT_S = 5.0

# Load generator processes: several, so that the client side is not one GIL;
# not many more than cores, so that they do not starve the daemon.
LOAD_PROCESSES = 4


@dataclass(frozen=True)
class ControlPlan:
    warmup: int
    single: int
    # The single-client round trips are taken in this many rounds, every
    # system in turn (see run_single_interleaved).
    rounds: int
    pairs: int
    load_warmup_s: float
    load_duration_s: float
    # Time for the load generator processes to start and connect before the
    # synchronized start.
    load_start_slack_s: float


def start_control_tree(system: systems.System, agent: systems.Agent) -> None:
    """Bring the system's one tree up for the duration of the control workload."""
    if system.pidfile.exists():
        system.pidfile.unlink()
    agent.request("start", job="control")
    procwatch.wait_for_members(str(system.pidfile), 7, timeout=15)


def run_single(agent: systems.Agent, kind: str, plan: ControlPlan, n: int, job: str | None = None) -> dict[str, Any]:
    agent.request("loop", kind=kind, n=plan.warmup, job=job)
    return summarize_single(agent.request("loop", kind=kind, n=n, job=job)["samples"])


def summarize_single(samples: list[int]) -> dict[str, Any]:
    summary = stats.summarize_ms(samples)
    summary["ops_per_s"] = round(len(samples) / (sum(samples) / 1e9), 1)
    return summary


def run_single_interleaved(agents: dict[str, systems.Agent], plan: ControlPlan, kind: str = "status") -> dict[str, dict[str, Any]]:
    """One client per system, `plan.single` round trips each, taken in
    `plan.rounds` rounds that visit every system in turn: a stretch of a noisy
    host (another process starting, a slow period of the VM) then falls on
    every system alike instead of on whichever ran at that moment."""
    for agent in agents.values():
        agent.request("loop", kind=kind, n=plan.warmup)
    samples: dict[str, list[int]] = {name: [] for name in agents}
    per_round = max(1, plan.single // plan.rounds)
    for _ in range(plan.rounds):
        for name, agent in agents.items():
            samples[name] += agent.request("loop", kind=kind, n=per_round)["samples"]
    return {name: summarize_single(values) for name, values in samples.items()}


def run_concurrent(session: Session, system: systems.System, plan: ControlPlan) -> dict[str, Any]:
    per_process = [CONCURRENT_CLIENTS // LOAD_PROCESSES] * LOAD_PROCESSES
    for i in range(CONCURRENT_CLIENTS % LOAD_PROCESSES):
        per_process[i] += 1
    start_ns = time.monotonic_ns() + int(plan.load_start_slack_s * 1e9)
    begin_ns = start_ns + int(plan.load_warmup_s * 1e9)
    end_ns = begin_ns + int(plan.load_duration_s * 1e9)
    generators = []
    for connections in per_process:
        popen = subprocess.Popen(
            [*systems.client_python(system.protocol), str(systems.LOADGEN_SCRIPT), system.protocol, system.endpoint,
             str(connections), str(start_ns), str(plan.load_warmup_s), str(plan.load_duration_s)],
            stdout=subprocess.PIPE, env=session.env,
        )
        session.helpers.append(popen)
        generators.append(popen)
    _sleep_until(begin_ns)
    cpu_begin = procwatch.cpu_seconds(system.pid)
    _sleep_until(end_ns)
    cpu_end = procwatch.cpu_seconds(system.pid)
    latencies: list[int] = []
    generator_cpu = 0.0
    failures = []
    for popen in generators:
        out, _ = popen.communicate(timeout=60)
        session.helpers.remove(popen)
        if popen.returncode != 0:
            failures.append(f"load generator exited with {popen.returncode}")
            continue
        report = json.loads(out)
        latencies += report["latencies_ns"]
        generator_cpu += report["cpu_s"]
    if failures:
        session.errors.extend(f"{system.name} concurrent: {f}" for f in failures)
    summary = stats.summarize_ms(latencies)
    summary.update(
        clients=CONCURRENT_CLIENTS,
        processes=LOAD_PROCESSES,
        ops_per_s=round(len(latencies) / plan.load_duration_s, 1),
        daemon_cpu_cores=round((cpu_end - cpu_begin) / plan.load_duration_s, 3),
        load_generator_cpu_cores=round(generator_cpu / plan.load_duration_s, 3),
    )
    return summary


def run(session: Session, plan: ControlPlan, targets: dict[str, systems.System],
        agents: dict[str, systems.Agent]) -> dict[str, Any]:
    """`targets` and `agents`: by system name, each system with its tree running
    (the echo floor has none)."""
    result: dict[str, Any] = {"single": {}, "library": {}, "concurrent": {}, "warm_acquire_release": None,
                              "single_rounds": plan.rounds}
    session.log(f"control: 1 client each ({', '.join(targets)}), raw socket, {plan.rounds} interleaved rounds")
    procwatch.wait_for_quiet_host(QUIET_BUSY_FRACTION, QUIET_TIMEOUT_S)
    single = run_single_interleaved({name: agents[name] for name in targets}, plan)
    for name, system in targets.items():
        result["single"][name] = {"operation": OPERATION[name], **single[name]}
        result["single"][name]["daemon_rss_bytes"] = procwatch.rss_bytes(system.pid)
    with_library = [name for name in targets if name in LIBRARY_CALL]
    session.log(f"control: 1 client each ({', '.join(with_library)}), client libraries, {plan.rounds} interleaved rounds")
    procwatch.wait_for_quiet_host(QUIET_BUSY_FRACTION, QUIET_TIMEOUT_S)
    library = run_single_interleaved({name: agents[name] for name in with_library}, plan, kind="library")
    for name in with_library:
        result["library"][name] = {"operation": LIBRARY_CALL[name], **library[name]}
    if "ours" in targets:
        session.log("control: ours warm acquire + release, 1 client")
        result["warm_acquire_release"] = run_single(agents["ours"], "acquire_release", plan, plan.pairs, job="control")
    for name, system in targets.items():
        session.log(f"control: {name} {OPERATION[name]}, {CONCURRENT_CLIENTS} clients")
        result["concurrent"][name] = {"operation": OPERATION[name], **run_concurrent(session, system, plan)}
    ours_single = result["single"].get("ours", {})
    ours_library = result["library"].get("ours", {})
    ours_concurrent = result["concurrent"].get("ours", {})
    result["ratios"] = {
        peer: {
            "single_latency_x": stats.ratio(result["single"][peer].get("median_ms"), ours_single.get("median_ms")),
            "library_latency_x": stats.ratio(result["library"].get(peer, {}).get("median_ms"), ours_library.get("median_ms")),
            "concurrent_throughput_x": stats.ratio(ours_concurrent.get("ops_per_s"), result["concurrent"][peer].get("ops_per_s")),
        }
        for peer in targets
        if peer in PEERS
    }
    if "echo" in targets:
        # How far ours is above the floor (1.0 would be no cost at all).
        result["ratios"]["echo"] = {
            "single_latency_x": stats.ratio(ours_single.get("median_ms"), result["single"]["echo"].get("median_ms")),
            "concurrent_throughput_x": stats.ratio(result["concurrent"]["echo"].get("ops_per_s"), ours_concurrent.get("ops_per_s")),
        }
    return result


def _sleep_until(deadline_ns: int) -> None:
    left = (deadline_ns - time.monotonic_ns()) / 1e9
    if left > 0:
        time.sleep(left)
