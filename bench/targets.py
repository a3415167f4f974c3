"""The issue's targets, judged against one run's results. Pure.

Each target yields PASS, FAIL, or MISSING (its workload did not run or produced
no sample: never counted as a pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Control round trip: ours at least this many times faster than each peer.
CONTROL_VS_SUPERVISORD_X = 5.0
CONTROL_VS_CIRCUS_X = 2.0
STATUS_OPS_32_CLIENTS = 15_000.0
# Cold acquire at most this many times the raw posix_spawn floor.
START_VS_FLOOR_X = 3.0
STOP_GONE_MS = 20.0
SWEEP_1000_MS = 10.0
SWEEP_HOST_RATIO = 1.5
# "80 MB", read as decimal megabytes (the stricter reading).
RSS_1000_INSTANCES_BYTES = 80_000_000
# Continuity: the longest wait of a request that overlapped an in-place
# upgrade, and a restart after kill -9 until it answers.
UPGRADE_MAX_LATENCY_MS = 250.0
RESTART_SERVING_S = 1.0
# An acquire at the largest level filled (10,000 in the full run) against one
# at 100 live instances.
FILL_RATIO = 1.3
# Process-table mode against cgroup mode, sweeping 1000 instances in one run.
PROCESS_TABLE_SWEEP_VS_CGROUP_X = 3.0
PROCESS_TABLE_SHUTDOWN_S = 2.0
# At 10,000 live instances (the full run's largest fill level): a whole
# `status` answered within this, no task step of the daemon's trio thread
# longer than this during the fill and those statuses, and the daemon's RSS
# ("150 MB", "120 MB": decimal megabytes, the stricter reading).
SCALE_LEVEL = 10_000
STATUS_AT_SCALE_MS = 20.0
TRIO_STALL_MS = 5.0
RSS_AT_SCALE_BYTES = 150_000_000
# 10,000 idle client connections held at once.
SCALE_CONNECTIONS = 10_000
RSS_CONNECTIONS_BYTES = 120_000_000


@dataclass(frozen=True)
class Verdict:
    name: str
    measured: str
    limit: str
    status: str  # PASS | FAIL | MISSING

    def to_json(self) -> dict[str, str]:
        return {"target": self.name, "measured": self.measured, "limit": self.limit, "status": self.status}


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _at_least(name: str, value: float | None, limit: float, unit: str) -> Verdict:
    if value is None:
        return Verdict(name, "n/a", f">= {limit:g}{unit}", "MISSING")
    return Verdict(name, f"{value:,.2f}{unit}", f">= {limit:g}{unit}", "PASS" if value >= limit else "FAIL")


def _at_most(name: str, value: float | None, limit: float, unit: str) -> Verdict:
    if value is None:
        return Verdict(name, "n/a", f"<= {limit:g}{unit}", "MISSING")
    return Verdict(name, f"{value:,.2f}{unit}", f"<= {limit:g}{unit}", "PASS" if value <= limit else "FAIL")


def judge(results: dict[str, Any]) -> list[Verdict]:
    verdicts = []
    control = results.get("control", {})
    for peer, limit in (("supervisord", CONTROL_VS_SUPERVISORD_X), ("circus", CONTROL_VS_CIRCUS_X)):
        # One client as users call it: through each system's own client library
        # (the issue's orientation figures are of that kind; see bench/control.py).
        verdicts.append(_at_least(
            f"control round trip, 1 client, client libraries: ours status vs {peer} (median latency ratio)",
            _get(control, "ratios", peer, "library_latency_x"), limit, "x",
        ))
        verdicts.append(_at_least(
            f"control round trip, 32 clients: ours status vs {peer} (throughput ratio)",
            _get(control, "ratios", peer, "concurrent_throughput_x"), limit, "x",
        ))
    verdicts.append(_at_least(
        "status ops/s with 32 clients", _get(control, "concurrent", "ours", "ops_per_s"), STATUS_OPS_32_CLIENTS, " ops/s",
    ))

    lifecycle = results.get("lifecycle", {})
    for metric, label in (("start_call", "until the reply"), ("start_ready", "until the tree is up")):
        verdicts.append(_at_most(
            f"cold acquire vs raw posix_spawn floor, {label} (median ratio)",
            _get(lifecycle, "ratios", "ours", f"{metric}_vs_raw_x"), START_VS_FLOOR_X, "x",
        ))
        for peer in ("supervisord", "circus"):
            ours = _get(lifecycle, "ours", metric, "median_ms")
            theirs = _get(lifecycle, peer, metric, "median_ms")
            name = f"cold acquire faster than {peer} start, {label} (median ms, ours vs theirs)"
            if ours is None or theirs is None:
                verdicts.append(Verdict(name, "n/a", "ours < theirs", "MISSING"))
            else:
                verdicts.append(Verdict(name, f"{ours:.2f} vs {theirs:.2f} ms", "ours < theirs",
                                        "PASS" if ours < theirs else "FAIL"))
    verdicts.append(_at_most(
        "last release -> whole tree gone (median)", _get(lifecycle, "ours", "stop_gone", "median_ms"), STOP_GONE_MS, " ms",
    ))
    gone_trials = _get(lifecycle, "ours", "trees_fully_gone")
    trials = _get(lifecycle, "ours", "trials")
    if trials is not None and gone_trials is not None and gone_trials < trials:
        verdicts[-1] = Verdict(verdicts[-1].name, f"tree gone in only {gone_trials}/{trials} trials",
                               verdicts[-1].limit, "FAIL")

    leaks = results.get("leaks_ours")
    if leaks is None:
        verdicts.append(Verdict("zero leaked processes (ours, every run)", "n/a", "0", "MISSING"))
    else:
        total = sum(leaks.values())
        detail = ", ".join(f"{k}: {v}" for k, v in leaks.items())
        verdicts.append(Verdict("zero leaked processes (ours, every run)", f"{total} ({detail})", "0",
                                "PASS" if total == 0 else "FAIL"))

    sweep = _get(results, "sweep", "cgroup")
    verdicts.append(_at_most(
        "periodic sweep, 1000 tracked instances, cgroup mode (median duration)",
        _get(sweep or {}, "levels", "1000", "duration", "median_ms"), SWEEP_1000_MS, " ms",
    ))
    verdicts.append(_at_most(
        "sweep with 2000 vs 100 unrelated host processes, cgroup mode (median ratio)",
        _get(sweep or {}, "host_ratio"), SWEEP_HOST_RATIO, "x",
    ))
    rss = _get(sweep or {}, "levels", "1000", "rss_bytes")
    verdicts.append(_at_most(
        "daemon RSS with 1000 live instances", None if rss is None else rss / 1e6, RSS_1000_INSTANCES_BYTES / 1e6, " MB",
    ))

    table = _get(results, "sweep", "process-table") or {}
    cgroup_1000 = _get(sweep or {}, "levels", "1000", "duration", "median_ms")
    table_1000 = _get(table, "levels", "1000", "duration", "median_ms")
    verdicts.append(_at_most(
        "periodic sweep, 1000 tracked instances, process-table vs cgroup mode (median ratio)",
        None if cgroup_1000 is None or table_1000 is None else table_1000 / cgroup_1000,
        PROCESS_TABLE_SWEEP_VS_CGROUP_X, "x",
    ))
    verdicts.append(_at_most(
        "sweep with 2000 vs 100 unrelated host processes, process-table mode (median ratio)",
        _get(table, "host_ratio"), SWEEP_HOST_RATIO, "x",
    ))
    shutdown = _get(table, "shutdown")
    verdicts.append(_at_most(
        "daemon shutdown with 1000 instances, process-table mode",
        shutdown["shutdown_s"] if shutdown and shutdown.get("processes", 0) >= 1000 else None,
        PROCESS_TABLE_SHUTDOWN_S, " s",
    ))

    fill = results.get("fill") or {}
    verdicts.append(_at_most(
        f"acquire at {fill.get('high', 'the largest level of')} vs {fill.get('low', 100)} live instances "
        "(median ratio)", fill.get("ratio"), FILL_RATIO, "x",
    ))
    verdicts += judge_scale(results)
    verdicts += judge_continuity(results.get("continuity"))
    return verdicts


def judge_scale(results: dict[str, Any]) -> list[Verdict]:
    """The 10,000-instance and 10,000-connection targets: judged only in a
    run that has those workloads (the full run), never MISSING from a quick one."""
    verdicts = []
    at_scale = _get(results, "fill", "levels", str(SCALE_LEVEL))
    if at_scale is not None or _get(results, "meta", "mode") == "full":
        at_scale = at_scale or {}
        verdicts.append(_at_most(
            f"status with {SCALE_LEVEL:,} live instances (median of whole answers)",
            _get(at_scale, "status_ms", "median_ms"), STATUS_AT_SCALE_MS, " ms",
        ))
        verdicts.append(_at_most(
            f"longest trio-thread task step while filling to {SCALE_LEVEL:,} instances and answering status",
            at_scale.get("longest_stall_ms"), TRIO_STALL_MS, " ms",
        ))
        rss = at_scale.get("rss_bytes")
        verdicts.append(_at_most(
            f"daemon RSS with {SCALE_LEVEL:,} live instances", None if rss is None else rss / 1e6,
            RSS_AT_SCALE_BYTES / 1e6, " MB",
        ))
    footprint = results.get("footprint") or {}
    if footprint.get("connections", 0) >= SCALE_CONNECTIONS or _get(results, "meta", "mode") == "full":
        held = footprint.get("connections_seen_by_daemon", 0)
        rss = footprint.get("rss_with_connections_bytes") if held >= SCALE_CONNECTIONS else None
        verdicts.append(_at_most(
            f"daemon RSS with {SCALE_CONNECTIONS:,} idle connections (held: {held:,})",
            None if rss is None else rss / 1e6, RSS_CONNECTIONS_BYTES / 1e6, " MB",
        ))
    return verdicts


def judge_continuity(continuity: dict[str, Any] | None) -> list[Verdict]:
    """The targets of bench/continuity.py's two workloads."""
    upgrades = _get(continuity or {}, "upgrades")
    restarts = _get(continuity or {}, "restarts")
    verdicts = []
    if upgrades is None:
        verdicts.append(Verdict("in-place upgrades under load", "n/a", "all in place", "MISSING"))
    else:
        n = upgrades["upgrades"]
        in_place = not upgrades["upgrades_refused"] and upgrades["generation"] == n + 1 and upgrades["same_pid"]
        refused = len(upgrades["upgrades_refused"])
        verdicts.append(Verdict(f"in-place upgrades under load, same pid ({n})",
                                f"{n - refused} in place, generation {upgrades['generation']}", f"all {n}",
                                "PASS" if in_place else "FAIL"))
        for label, value, total in (
            ("requests failed or unanswered across upgrades", upgrades["failed"] + upgrades["unanswered"],
             f" of {upgrades['requests']:,}"),
            ("connections closed by upgrades", upgrades["closed"], ""),
            ("adapter pids changed by upgrades", upgrades["pids_changed"], ""),
            ("bytes lost through an fd-passed adapter across upgrades", upgrades["echo_bytes_lost"],
             f" of {upgrades['echo_bytes']:,}"),
        ):
            verdicts.append(Verdict(label, f"{value}{total}", "0", "PASS" if value == 0 else "FAIL"))
        overlap = upgrades["overlapping"]
        verdicts.append(_at_most(
            f"latency of requests overlapping an upgrade, max (p99 {overlap.get('p99_ms')} ms, n={overlap.get('n')})",
            overlap.get("max_ms"), UPGRADE_MAX_LATENCY_MS, " ms",
        ))
    if restarts is None:
        verdicts.append(Verdict("kill -9 and restart: instances adopted", "n/a", "all", "MISSING"))
        return verdicts
    instances, cycles = restarts["instances"], restarts["cycles"]
    adopted_all = all(a == instances for a in restarts["adopted"]) and restarts["same_pids"]
    verdicts.append(Verdict(f"kill -9 and restart: instances adopted per cycle ({cycles} cycles)",
                            f"{restarts['adopted']} of {instances}", "all, same pids", "PASS" if adopted_all else "FAIL"))
    half = instances // 2
    verdicts.append(Verdict("kill -9 and restart: bound leases resumed per cycle", f"{restarts['resumed']} of {half}",
                            "all", "PASS" if all(r == half for r in restarts["resumed"]) else "FAIL"))
    verdicts.append(Verdict("kill -9 and restart: processes left after releasing every adopted lease",
                            str(restarts["leaked"]), "0", "PASS" if restarts["leaked"] == 0 else "FAIL"))
    verdicts.append(_at_most("kill -9 and restart: start to serving (max)", max(restarts["serving_s"], default=None),
                             RESTART_SERVING_S, " s"))
    return verdicts
