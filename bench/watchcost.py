"""What the limit watch costs a daemon holding many limited trees (ours only).

One daemon per (variant, mode), each filled with `--level` single-process
instances of `--adapter`: `limited` (`sleep`, with a memory_limit it never
reaches, and the default max_pids) or `idle` (`sleep` with the default
max_pids only), detached, sweep_interval an hour: an idle
daemon whose only periodic work is the limit watch. Then, in windows that visit
every daemon in turn, the daemon's CPU time over `WINDOW_S` of idleness is
read from /proc: the watch's cost as a share of one core. With `--old`, a
checkout of older code (no watch) is measured in the same windows: the
difference is the watch.

`python -m bench.watchcost [--level 1000] [--windows 5] [--adapter limited|idle] [--old PATH]`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import procwatch, systems, wire
from bench.session import Session, open_session

# Idle seconds per window: many looks of the watch (every 0.25 s) per window.
WINDOW_S = 2.0

# Long enough for any run: the instances live until the daemon stops.
LEASE_TTL_S = 3600.0

# Acquires in flight at once while filling (one connection).
BATCH = 100

MODES = {"cgroup": "auto", "process-table": "off"}


def fill(client: wire.OursClient, level: int, adapter: str = "limited") -> None:
    """Acquire `level` instances of `adapter`, pipelined BATCH at a time."""
    for start in range(0, level, BATCH):
        jobs = {n + 1: f"{adapter}-{n}" for n in range(start, min(level, start + BATCH))}
        client.stream.sock.sendall(b"".join(
            wire.ours_request(request_id, "acquire", {"job": job, "adapter": adapter, "detach": True,
                                                      "ttl": LEASE_TTL_S})
            for request_id, job in jobs.items()
        ))
        answered = 0
        while answered < len(jobs):
            message = client.next_message()
            if message.get("id") not in jobs:
                continue
            if "error" in message:
                raise RuntimeError(f"acquire failed: {message['error']}")
            answered += 1


def run(
    session: Session, variants: dict[str, dict[str, str]], *, level: int, windows: int, adapter: str = "limited"
) -> dict[str, Any]:
    """The workload; results by "variant/mode": the median share of one core
    an idle daemon used over its windows, and each window's share."""
    keys = [(name, mode) for name in variants for mode in MODES]
    daemons = {
        (name, mode): systems.Ours(session.workdir / f"{name}-watch-{mode}", variants[name], cgroup=MODES[mode],
                                   name=f"{name}-watch-{mode}", sweep_interval=3600.0)
        for name, mode in keys
    }
    session.start_systems(*daemons.values())
    clients = {key: wire.OursClient(daemon.endpoint, timeout=300) for key, daemon in daemons.items()}
    results: dict[str, Any] = {}
    try:
        for key, client in clients.items():
            began = time.monotonic()
            fill(client, level, adapter)
            session.log(f"watch: {key[0]} ({daemons[key].mode()}): {level} instances held "
                        f"({time.monotonic() - began:.1f} s to fill)")
        shares: dict[tuple[str, str], list[float]] = {key: [] for key in keys}
        order = list(keys)
        for _ in range(windows):
            for key in order:
                pid = daemons[key].pid
                before, started = procwatch.cpu_seconds(pid), time.monotonic()
                time.sleep(WINDOW_S)
                shares[key].append((procwatch.cpu_seconds(pid) - before) / (time.monotonic() - started))
            order.reverse()
        for (name, mode), values in shares.items():
            results[f"{name}/{mode}"] = {
                "mode": daemons[name, mode].mode(), "instances": level,
                "core_share_median": round(statistics.median(values), 4),
                "windows": [round(v, 4) for v in values],
            }
    finally:
        for client in clients.values():
            client.close()
        for daemon in daemons.values():
            session.stop_system(daemon)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watchcost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--adapter", choices=("limited", "idle"), default="limited",
                        help="limited: a memory_limit and the default max_pids; idle: the default max_pids only")
    parser.add_argument("--old", type=Path, help="also measure this checkout of older code (with its .so built)")
    args = parser.parse_args(argv)
    with open_session(lambda message: print(f"watchcost: {message}", file=sys.stderr)) as session:
        variants = {"new": session.env}
        if args.old is not None:
            variants = {"old": {**session.env, "PYTHONPATH": str(args.old.resolve())}, **variants}
        results = run(session, variants, level=args.level, windows=args.windows, adapter=args.adapter)
    print(f"{'daemon':<24}{'mode':<16}{'instances':>10}{'idle CPU, % of a core':>24}")
    for key, entry in results.items():
        print(f"{key.split('/')[0]:<24}{entry['mode']:<16}{entry['instances']:>10}"
              f"{entry['core_share_median'] * 100:>24.2f}   windows {entry['windows']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
