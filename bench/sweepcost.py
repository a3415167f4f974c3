"""Sweep cost against tracked instances and unrelated host processes (ours only).

A dedicated daemon holds N instances of the `idle` adapter (`sleep`, one process
each; acquired with distinct jobs, pipelined on one connection) while the host
is topped up with `sleep` fillers (children of the driver, in no system) to
`BASE_UNRELATED` unrelated processes. At each N the driver asks for sweeps one
after another and takes the daemon's own `duration_ms` from each report: the
`sweep` method runs the same code as the periodic sweep (`Supervisor.sweep`,
not deep) and only the report's kind differs. The periodic sweeps that ran
meanwhile (the daemon sweeps every `PERIODIC_INTERVAL_S`) are reported next to
them as a cross-check. At `HOST_TRACKED` instances the host is also filled to
`MANY_UNRELATED` processes and the sweep measured again.

"Unrelated" counts every entry of /proc (kernel threads included) that is not
the daemon or one of its descendants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bench import procwatch, stats, systems, wire
from bench.session import Session

# The daemon's own periodic sweep interval while this workload runs: short
# enough for a few periodic reports per level, long enough that periodic
# sweeps (hundreds of ms at 1000 instances) do not slow the fill much.
PERIODIC_INTERVAL_S = 5.0

BASE_UNRELATED = 100
MANY_UNRELATED = 2000
HOST_TRACKED = 100

# Leases are detached so that the instances live on without the connection
# (until the daemon is stopped); the ttl outlasts any run.
LEASE_TTL_S = 3600.0

# Acquires in flight at once while filling the daemon (one connection).
ACQUIRE_BATCH = 100


@dataclass(frozen=True)
class SweepPlan:
    levels: tuple[int, ...]
    samples: int


def unrelated_processes(daemon_pid: int) -> int:
    ours = procwatch.descendants(daemon_pid) | {daemon_pid}
    return sum(1 for pid in procwatch.list_pids() if pid not in ours)


def fill_host(session: Session, daemon_pid: int, target: int) -> int:
    """Start fillers until `target` unrelated processes exist (never kills any
    to get down to it); returns the count reached."""
    missing = target - unrelated_processes(daemon_pid)
    if missing > 0:
        session.spawn_fillers(missing)
    return unrelated_processes(daemon_pid)


@dataclass
class Fill:
    """The instances the workload holds: job -> lease."""

    leases: dict[str, str]
    next_job: int = 0
    # Instances that were no longer running right after being acquired.
    lost: int = 0


def acquire_idle(client: wire.OursClient, fill: Fill, count: int) -> float:
    """Acquire `count` more instances (fresh jobs idle-<i>); seconds per acquire."""
    started = time.monotonic()
    numbers = range(fill.next_job, fill.next_job + count)
    fill.next_job += count
    for batch_start in range(0, count, ACQUIRE_BATCH):
        # Request ids are the job numbers: unique on this connection.
        by_id = {n: f"idle-{n}" for n in numbers[batch_start : batch_start + ACQUIRE_BATCH]}
        batch = list(by_id.values())
        client.stream.sock.sendall(b"".join(
            wire.ours_request(request_id, "acquire", {"job": job, "adapter": "idle", "detach": True, "ttl": LEASE_TTL_S})
            for request_id, job in by_id.items()
        ))
        answered = 0
        while answered < len(batch):
            message = client.next_message()
            if message.get("id") not in by_id:
                continue
            if "error" in message:
                raise RuntimeError(f"acquire failed: {message['error']}")
            fill.leases[by_id[message["id"]]] = message["result"]["lease"]
            answered += 1
    return (time.monotonic() - started) / max(1, count)


def fill_to(client: wire.OursClient, fill: Fill, level: int) -> float:
    """Hold `level` running instances. Instances found not running after their
    acquire (a sweep that ran meanwhile must never end a live instance) are
    counted in `fill.lost`, released and replaced. Returns seconds per acquire."""
    per_acquire = 0.0
    for _ in range(5):
        instances = client.call("status")["instances"]
        running = {i["job"] for i in instances if i["state"] == "running"}
        for job in [j for j in fill.leases if j not in running]:
            fill.lost += 1
            client.call("release", {"lease": fill.leases.pop(job)})
        missing = level - len(fill.leases)
        if missing <= 0:
            return per_acquire
        seconds = acquire_idle(client, fill, missing)
        # The first batch is the one measured; replacements are few.
        per_acquire = per_acquire or seconds
    raise RuntimeError(f"could not hold {level} running instances")


def measure(client: wire.OursClient, samples: int) -> dict[str, Any]:
    since = time.time()
    durations, round_trips, scanned = [], [], []
    for _ in range(samples):
        t0 = time.monotonic_ns()
        report = client.call("sweep")
        round_trips.append(time.monotonic_ns() - t0)
        durations.append(report["duration_ms"])
        scanned.append(report["scanned"])
        if report["orphans"] or report["errors"]:
            raise RuntimeError(f"a sweep found orphans or errors in a quiet daemon: {report}")
    periodic = [
        r["duration_ms"] for r in client.call("reports", {"limit": 1000})["reports"]
        if r["kind"] == "periodic" and r["started_at"] >= since
    ]
    return {
        "duration": stats.summarize(durations, unit="ms"),
        "durations_ms": durations,
        "round_trip": stats.summarize_ms(round_trips),
        "scanned": max(scanned),
        "periodic_duration": stats.summarize(periodic, unit="ms"),
    }


def run(session: Session, system: systems.Ours, plan: SweepPlan) -> dict[str, Any]:
    result: dict[str, Any] = {"mode": system.mode(), "levels": {}, "host": {}}
    client = wire.OursClient(system.endpoint, timeout=120)
    try:
        result["idle_rss_bytes"] = procwatch.rss_bytes(system.pid)
        fill = Fill(leases={})
        for level in sorted(plan.levels):
            per_acquire = fill_to(client, fill, level)
            unrelated = fill_host(session, system.pid, BASE_UNRELATED)
            session.log(f"sweep ({result['mode']}): {level} instances, {unrelated} unrelated processes")
            entry = measure(client, plan.samples)
            entry.update(
                unrelated_processes=unrelated,
                rss_bytes=procwatch.rss_bytes(system.pid),
                acquire_ms_each=round(per_acquire * 1000, 3),
            )
            result["levels"][str(level)] = entry
            if level == HOST_TRACKED:
                many = fill_host(session, system.pid, MANY_UNRELATED)
                session.log(f"sweep ({result['mode']}): {level} instances, {many} unrelated processes")
                crowded = {**measure(client, plan.samples), "unrelated_processes": many}
                session.kill_fillers()
                # The base once more, with the host back to it: the crowded
                # sweeps are compared with base sweeps from both sides of
                # them, so a slow or a fast stretch of the host does not fall
                # on one side only (sweeps of a millisecond; quick runs swung
                # 0.6-1.8x measuring the base only before).
                base_again = fill_host(session, system.pid, BASE_UNRELATED)
                again = {**measure(client, plan.samples), "unrelated_processes": base_again}
                result["host"] = {"tracked": level, "base": entry, "many": crowded, "base_again": again}
                result["host_ratio"] = stats.ratio(
                    crowded["duration"].get("median_ms"),
                    stats.median(sorted(entry["durations_ms"] + again["durations_ms"])),
                )
        result["instance_count_max"] = len(fill.leases)
        result["instances_lost"] = fill.lost
        if fill.lost:
            session.errors.append(
                f"{system.name}: {fill.lost} freshly acquired instance(s) were not running moments later "
                "(ended by a sweep that ran while they were acquired?)"
            )
    finally:
        client.close()
    return result


def stop_and_count_leaks(session: Session, system: systems.Ours) -> dict[str, Any]:
    """Stop the daemon (which stops every tree) and count its descendants still
    alive afterwards."""
    members = []
    for pid in procwatch.descendants(system.pid):
        stat = procwatch.read_stat(pid)
        if stat is not None:
            members.append(procwatch.Member("instance", pid, stat[2], 0))
    started = time.monotonic()
    session.stop_system(system)
    stop_s = time.monotonic() - started
    time.sleep(0.2)
    alive = [m for m in members if procwatch.is_alive(m)]
    for member in alive:
        watch = session.watch([member])
        watch.kill_alive()
    return {"processes": len(members), "shutdown_s": round(stop_s, 3), "alive_after_shutdown": len(alive)}
