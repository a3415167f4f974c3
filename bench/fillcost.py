"""What an `acquire` costs as a daemon fills up (ours only).

One daemon per level, each filled with that many single-process instances of
the `idle` adapter (`sleep`; detached leases with a long ttl, acquired
pipelined on one connection, so every one of them is also a timer in the
registry). Then, in windows that visit every daemon in turn (the host's slow
and fast phases fall on all levels alike), `BATCH` more instances are acquired
pipelined and timed, released, and waited for until their processes are gone;
the daemon's level is back where it was before the next window. A level's
cost is the median over its windows of the mean time per acquire; the ratio
of two levels is the median over windows of each window's ratio (a window's
visits follow each other within a second or so, so a slow stretch of the
host falls on both sides of most ratios).

`python -m bench.fillcost [--levels 100 1000 10000] [--windows N] [--mode cgroup|process-table] [--old PATH]`
runs it alone; with `--old`, a checkout of older code (as for `bench.ab`) is
measured too, its daemons in the same windows as this checkout's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procwatch, stats, systems, wire
from bench.session import Session, open_session

# Acquires timed per window, and pipelined at once while filling: one
# connection with this many requests in flight, as an orchestrator's would be.
BATCH = 100

# Long enough for any run: the instances live until the daemon stops.
LEASE_TTL_S = 3600.0

# Released instances must be gone (their processes reaped) within this.
GONE_TIMEOUT_S = 30.0

# Whole `status` answers timed at each level once it is filled: enough for a
# median that one slow answer does not move.
STATUS_SAMPLES = 15

# Bytes a timed `status` answer is read by at a time.
STATUS_RECEIVE_BYTES = 1 << 20

# Let the daemon's allocator settle after a fill before its RSS is read.
SETTLE_S = 0.2

# The daemon's metric of the longest trio-thread task step since it was last scraped.
STALL_METRIC = "adapter_supervisor_longest_stall_since_scrape_seconds"


@dataclass(frozen=True)
class FillPlan:
    levels: tuple[int, ...]
    windows: int
    # Acquires timed per window.
    batch: int = BATCH
    # Whole statuses timed per level.
    status_samples: int = STATUS_SAMPLES


@dataclass
class Holder:
    """One connection to a daemon, and the next request id on it."""

    client: wire.OursClient
    next_id: int = 1

    def ids(self, count: int) -> range:
        first, self.next_id = self.next_id, self.next_id + count
        return range(first, first + count)


def acquire_batch(holder: Holder, jobs: list[str]) -> tuple[float, dict[str, tuple[str, int]]]:
    """Acquire one instance per job, pipelined; (seconds per acquire, job -> (lease, pid))."""
    client = holder.client
    by_id = dict(zip(holder.ids(len(jobs)), jobs))
    started = time.monotonic()
    client.stream.sock.sendall(b"".join(
        wire.ours_request(request_id, "acquire", {"job": job, "adapter": "idle", "detach": True, "ttl": LEASE_TTL_S})
        for request_id, job in by_id.items()
    ))
    got: dict[str, tuple[str, int]] = {}
    while len(got) < len(jobs):
        message = client.next_message()
        job = by_id.get(message.get("id"))  # type: ignore[arg-type]
        if job is None:
            continue
        if "error" in message:
            raise RuntimeError(f"acquire failed: {message['error']}")
        got[job] = (message["result"]["lease"], message["result"]["pid"])
    return (time.monotonic() - started) / max(1, len(jobs)), got


def release_and_wait(holder: Holder, got: dict[str, tuple[str, int]]) -> None:
    """Release the batch's leases (pipelined) and wait until their processes are gone."""
    ids = holder.ids(len(got))
    holder.client.stream.sock.sendall(b"".join(
        wire.ours_request(request_id, "release", {"lease": lease}) for request_id, (lease, _) in zip(ids, got.values())
    ))
    answered = 0
    while answered < len(got):
        message = holder.client.next_message()
        if message.get("id") in ids:
            if "error" in message:
                raise RuntimeError(f"release failed: {message['error']}")
            answered += 1
    deadline = time.monotonic() + GONE_TIMEOUT_S
    pids = [pid for _, pid in got.values()]
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError("released instances were not gone in time")
        time.sleep(0.01)


def fill(holder: Holder, level: int, prefix: str) -> None:
    for start in range(0, level, BATCH):
        acquire_batch(holder, [f"{prefix}-{n}" for n in range(start, min(level, start + BATCH))])


def longest_stall_s(client: wire.OursClient) -> float | None:
    """The daemon's longest trio-thread task step since the previous scrape
    (this call starts the next period); None from a daemon (older code)
    that does not report it."""
    for line in client.call("metrics")["text"].splitlines():
        if line.startswith(STALL_METRIC + " "):
            return float(line.split()[1])
    return None


def status_ms(client: wire.OursClient, samples: int = STATUS_SAMPLES) -> list[float]:
    """Milliseconds from sending a whole `status` to having its whole answer
    line (not parsed), `samples` times, one after the other. Read as a client
    that wants the answer whole would: STATUS_RECEIVE_BYTES at a time (the
    answer is megabytes at 10,000 instances), nothing framed or parsed until
    the newline that ends it. Call it with nothing else in flight on `client`."""
    sock = client.stream.sock
    times = []
    for request_id in range(samples):
        started = time.perf_counter()
        sock.sendall(wire.ours_request(10**9 + request_id, "status"))
        chunks = [sock.recv(STATUS_RECEIVE_BYTES)]
        while chunks[-1] and not chunks[-1].endswith(b"\n"):
            chunks.append(sock.recv(STATUS_RECEIVE_BYTES))
        times.append((time.perf_counter() - started) * 1000)
        if not chunks[-1]:
            raise RuntimeError("the daemon closed the connection during a status")
    return times


def trio_thread_times_ns(pid: int) -> tuple[int, int]:
    """The daemon's trio thread (its main thread): nanoseconds on a CPU and
    nanoseconds runnable but waiting for one (preempted, or woken and not yet
    run), from its schedstat; (0, 0) where the kernel has none."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except OSError:
        return 0, 0
    return int(fields[0]), int(fields[1])


def measure_filled(
    client: wire.OursClient, pid: int, samples: int = STATUS_SAMPLES, since: tuple[float, tuple[int, int]] | None = None
) -> dict[str, Any]:
    """At a filled level: `status` latency, the longest trio-thread stall
    since the previous `longest_stall_s` (the fill, then these statuses) and
    the daemon's RSS. `since`: the monotonic time and `trio_thread_times_ns`
    at that scrape, to tell how much of the period the trio thread spent
    waiting for a CPU (the host's share of the stalls' wall time)."""
    status = status_ms(client, samples)
    stall_s = longest_stall_s(client)
    trio: dict[str, float] = {}
    if since is not None:
        began, (ran_before, waited_before) = since
        ran, waited = trio_thread_times_ns(pid)
        trio = {"trio_period_s": round(time.monotonic() - began, 3), "trio_ran_s": round((ran - ran_before) / 1e9, 3),
                "trio_waited_s": round((waited - waited_before) / 1e9, 3)}
    time.sleep(SETTLE_S)
    return {"status_ms": stats.summarize(status, unit="ms"),
            "longest_stall_ms": None if stall_s is None else round(stall_s * 1000, 3),
            "rss_bytes": procwatch.rss_bytes(pid), **trio}


def run(
    session: Session, plan: FillPlan, *, cgroup: str = "auto", held: dict[int, systems.Ours] | None = None
) -> dict[str, Any]:
    """The workload on this checkout's daemon. `held`: daemons of another
    workload already holding a level's instances (idle, detached), used for
    that level instead of one filled here; they are left running."""
    return run_variants(session, plan, {"ours": session.env}, cgroup=cgroup, held=held)["ours"]


def run_variants(
    session: Session,
    plan: FillPlan,
    variants: dict[str, dict[str, str]],
    *,
    cgroup: str = "auto",
    held: dict[int, systems.Ours] | None = None,
) -> dict[str, dict[str, Any]]:
    """The workload on one daemon per level of each variant (name -> the
    daemons' environment), every window visiting every daemon in turn."""
    held = held or {}
    keys = [(name, level) for name in variants for level in plan.levels]
    started = {
        (name, level): systems.Ours(session.workdir / f"{name}-fill-{level}", variants[name], cgroup=cgroup,
                                    name=f"{name}-fill-{level}", sweep_interval=3600.0)
        for name, level in keys
        if level not in held
    }
    session.start_systems(*started.values())
    daemons = {**started, **{(name, level): held[level] for name, level in keys if level in held}}
    clients = {key: Holder(wire.OursClient(daemon.endpoint, timeout=300)) for key, daemon in daemons.items()}
    results: dict[str, dict[str, Any]] = {}
    filled: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        for (name, level), holder in clients.items():
            longest_stall_s(holder.client)  # the stall measured is the fill's and the statuses'
            pid = daemons[name, level].pid
            since = (time.monotonic(), trio_thread_times_ns(pid))
            if (name, level) in started:
                began = time.monotonic()
                fill(holder, level, "held")
                session.log(f"fill: {name}: {level} instances held ({time.monotonic() - began:.1f} s to fill)")
            filled[name, level] = measure_filled(holder.client, pid, plan.status_samples, since)
            entry = filled[name, level]
            session.log(f"fill: {name}: {level} instances: status {entry['status_ms']['median_ms']:.2f} ms"
                        f", longest stall {entry['longest_stall_ms']} ms"
                        f" (trio thread: {entry.get('trio_ran_s')} s on a CPU, {entry.get('trio_waited_s')} s"
                        f" waiting for one, in {entry.get('trio_period_s')} s)"
                        f", RSS {entry['rss_bytes'] / 1e6:.1f} MB")
        windows: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
        cpu: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
        order = list(keys)
        for window in range(plan.windows):
            for key in order:
                cpu_before = procwatch.cpu_seconds(daemons[key].pid)
                seconds, got = acquire_batch(clients[key], [f"window-{window}-{n}" for n in range(plan.batch)])
                cpu[key].append((procwatch.cpu_seconds(daemons[key].pid) - cpu_before) * 1000 / plan.batch)
                windows[key].append(seconds * 1000)
                release_and_wait(clients[key], got)
            order.reverse()
        low, high = min(plan.levels), max(plan.levels)
        for name in variants:
            result: dict[str, Any] = {"mode": daemons[name, low].mode(), "batch": plan.batch, "levels": {}}
            for level in plan.levels:
                result["levels"][str(level)] = {"acquire_ms": stats.summarize(windows[name, level], unit="ms"),
                                                "windows_ms": [round(w, 4) for w in windows[name, level]],
                                                "daemon_cpu_ms": stats.summarize(cpu[name, level], unit="ms"),
                                                **filled[name, level]}
            result["low"], result["high"] = low, high
            result["ratio"] = round(statistics.median(
                high_ms / low_ms for high_ms, low_ms in zip(windows[name, high], windows[name, low])
            ), 3)
            results[name] = result
    finally:
        for holder in clients.values():
            holder.client.close()
        for daemon in started.values():
            session.stop_system(daemon)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fillcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--mode", choices=("cgroup", "process-table"), default="cgroup")
    parser.add_argument("--old", type=Path, help="also measure this checkout of older code (with its .so built)")
    args = parser.parse_args(argv)
    plan = FillPlan(levels=tuple(sorted(args.levels)), windows=args.windows)
    with open_session(lambda message: print(f"fillcost: {message}", file=sys.stderr)) as session:
        variants = {"new": session.env}
        if args.old is not None:
            variants = {"old": {**session.env, "PYTHONPATH": str(args.old.resolve())}, **variants}
        results = run_variants(session, plan, variants, cgroup="auto" if args.mode == "cgroup" else "off")
    for name, result in results.items():
        for level, entry in result["levels"].items():
            print(f"{name}: {level:>6} instances: {entry['acquire_ms']['median_ms']:.3f} ms per acquire, daemon CPU "
                  f"{entry['daemon_cpu_ms']['median_ms']:.3f} ms (windows {entry['windows_ms']}); status "
                  f"{entry['status_ms']['median_ms']:.2f} ms, longest stall {entry['longest_stall_ms']} ms, "
                  f"RSS {entry['rss_bytes'] / 1e6:.1f} MB")
        print(f"{name}: {result['high']} vs {result['low']}: {result['ratio']:.2f}x ({result['mode']} mode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
