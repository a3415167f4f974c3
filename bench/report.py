"""The human-readable table of one run's results. Pure: results in, text out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.targets import Verdict

LABELS = {
    "echo": "trio echo (floor)",
    "raw": "raw posix_spawn",
    "ours": "ours",
    "ours-process-table": "ours (process table)",
    "supervisord": "supervisord",
    "circus": "circus",
}


def _table(headers: Sequence[str], rows: list[Sequence[object]]) -> list[str]:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return lines


def _ms(summary: dict[str, Any] | None, key: str = "median_ms") -> str:
    if not summary or summary.get("n", 0) == 0 or key not in summary:
        return "n/a"
    value = summary[key]
    if value < 1:
        return f"{value * 1000:.0f} us"
    return f"{value:.2f} ms"


def _x(value: float | None, suffix: str = "x") -> str:
    return "n/a" if value is None else f"{value:.2f}{suffix}"


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.1f} MB"


def _versus(name: str, ratio: float | None, peer_words: str, floor_words: str) -> str:
    if name == "ours":
        return ""
    if name == "echo":
        return f"ours {_x(ratio)} {floor_words}"
    return f"ours {_x(ratio)} {peer_words}"


def _single_client_rows(control: dict[str, Any], section: str, ratio_key: str) -> list[list[Any]]:
    """One row per system of a single-client round-trip table (`section`:
    "single" on the raw socket, "library" through the client libraries)."""
    rows = []
    for name, s in control[section].items():
        ratio = control["ratios"].get(name, {}).get(ratio_key)
        rows.append([LABELS[name], s["operation"], s["n"], _ms(s), _ms(s, "p99_ms"), f"{s['ops_per_s']:,.0f}",
                     _versus(name, ratio, "faster", "slower than the floor")])
    return rows


def render(results: dict[str, Any], verdicts: list[Verdict]) -> str:
    meta = results["meta"]
    out = [
        f"adapter-supervisor benchmark: {meta['mode']} run, {meta['started_at']}",
        (f"machine: {meta['machine']['cpu']} x {meta['machine']['cores']} cores, "
         f"{meta['machine']['memory_gib']} GiB, {meta['machine']['os']}, Linux {meta['machine']['kernel']}, "
         f"Python {meta['machine']['python']}"),
        (f"systems: ours {meta['versions']['ours']} ({meta.get('ours_mode', '?')} mode), "
         f"supervisord {meta['versions']['supervisord']}, circus {meta['versions']['circus']}"),
        "",
    ]
    control = results.get("control")
    if control:
        rounds = control.get("single_rounds", "?")
        out.append(f"Control round trip, 1 client (raw socket; the systems in turn, {rounds} rounds)")
        rows = _single_client_rows(control, "single", "single_latency_x")
        pair = control.get("warm_acquire_release")
        if pair:
            rows.append(["ours", "acquire+release (warm pair)", pair["n"], _ms(pair), _ms(pair, "p99_ms"),
                         f"{pair['ops_per_s']:,.0f} pairs", ""])
        out += _table(["system", "operation", "n", "median", "p99", "ops/s", "vs ours"], rows)
        out.append("")
        if control.get("library"):
            out.append(f"Control round trip, 1 client, through each system's own client library ({rounds} rounds)")
            rows = _single_client_rows(control, "library", "library_latency_x")
            out += _table(["system", "call", "n", "median", "p99", "ops/s", "vs ours"], rows)
            out.append("")
        out.append(f"Control round trip, 32 clients ({next(iter(control['concurrent'].values()))['processes']} "
                   "load processes, one request in flight per client)")
        rows = []
        for name, s in control["concurrent"].items():
            ratio = control["ratios"].get(name, {}).get("concurrent_throughput_x")
            rows.append([LABELS[name], s["operation"], s["n"], _ms(s), _ms(s, "p99_ms"), f"{s['ops_per_s']:,.0f}",
                         f"{s['daemon_cpu_cores']:.2f}", f"{s['load_generator_cpu_cores']:.2f}",
                         _versus(name, ratio, "the ops/s", "below the floor")])
        out += _table(["system", "operation", "n", "median", "p99", "ops/s", "daemon CPU", "clients CPU", "vs ours"],
                      rows)
        out.append("  (CPU in cores during the window; the box has "
                   f"{meta['machine']['cores']}: daemon near 1.0 means the daemon is the limit)")
        out.append("")
    lifecycle = results.get("lifecycle")
    if lifecycle:
        systems_run = [n for n in LABELS if n in lifecycle]
        out.append("Start of the 7-process tree (cold): request sent -> reply read at the socket, and -> last member up")
        rows = [[LABELS[n], lifecycle[n]["start_call"]["n"], _ms(lifecycle[n]["start_call"]),
                 _ms(lifecycle[n]["start_call"], "p99_ms"),
                 _ms(lifecycle[n]["start_client"]) if "start_client" in lifecycle[n] else "-",
                 _ms(lifecycle[n]["start_ready"]), _ms(lifecycle[n]["start_ready"], "p99_ms")] for n in systems_run]
        out += _table(["system", "n", "reply median", "reply p99", "with client codec", "tree up median",
                       "tree up p99"], rows)
        ratios = lifecycle.get("ratios", {}).get("ours", {})
        if ratios:
            out.append("  ours / raw floor: reply {} ({} with the benchmark client's own encode/decode), tree up {};  "
                       "ours / supervisord: reply {}, tree up {};  ours / circus: reply {}, tree up {}".format(
                           _x(ratios.get("start_call_vs_raw_x")), _x(ratios.get("start_client_vs_raw_x")),
                           _x(ratios.get("start_ready_vs_raw_x")),
                           _x(ratios.get("start_call_vs_supervisord_x")), _x(ratios.get("start_ready_vs_supervisord_x")),
                           _x(ratios.get("start_call_vs_circus_x")), _x(ratios.get("start_ready_vs_circus_x"))))
        out.append("")
        out.append("Stop (SIGTERM, 2 s grace): request -> reply, and request -> every member exited")
        rows = []
        for n in systems_run:
            r = lifecycle[n]
            rows.append([LABELS[n], r["trials"], _ms(r["stop_call"]), _ms(r["stop_call"], "p99_ms"),
                         _ms(r["stop_gone"]), _ms(r["stop_gone"], "p99_ms"), f"{r['trees_fully_gone']}/{r['trials']}",
                         _ms(r["stop_partial"])])
        out += _table(["system", "n", "reply median", "reply p99", "gone median", "gone p99", "trees gone",
                       "last exit median (of those that exit)"], rows)
        if ratios:
            out.append("  ours gone / peer gone: supervisord {}, circus {};  ours gone / peer last exit: "
                       "supervisord {}, circus {}".format(
                           _x(ratios.get("stop_gone_vs_supervisord_x")), _x(ratios.get("stop_gone_vs_circus_x")),
                           _x(ratios.get("stop_gone_vs_supervisord_last_exit_x")),
                           _x(ratios.get("stop_gone_vs_circus_last_exit_x"))))
        out.append("")
        out.append("Leaks: processes of the 7-process tree alive 2 s after the stop returned")
        rows = []
        for n in systems_run:
            r = lifecycle[n]
            roles = ", ".join(f"{role} x{count}" for role, count in sorted(r["leaked_roles"].items())) or "-"
            rows.append([LABELS[n], r["trials"], r["leaked_total"],
                         f"{r['leaked_total'] / r['trials']:.1f}", r["zombies_left"], roles])
        out += _table(["system", "trials", "leaked", "per trial", "zombies left", "which"], rows)
        out.append("")
    for mode, sweep in results.get("sweep", {}).items():
        out.append(f"Sweep cost, {mode} mode (daemon-reported duration of back-to-back sweeps; "
                   "periodic sweeps alongside)")
        rows = []
        for level, entry in sweep["levels"].items():
            rows.append([level, entry["unrelated_processes"], entry["duration"]["n"], _ms(entry["duration"]),
                         _ms(entry["duration"], "p99_ms"), entry["scanned"],
                         f"{_ms(entry['periodic_duration'])} (n={entry['periodic_duration']['n']})",
                         _mb(entry["rss_bytes"]), f"{entry['acquire_ms_each']:.1f} ms"])
        many = sweep["host"].get("many")
        for entry in (many, sweep["host"].get("base_again")):
            if entry:
                rows.append([str(sweep["host"]["tracked"]), entry["unrelated_processes"], entry["duration"]["n"],
                             _ms(entry["duration"]), _ms(entry["duration"], "p99_ms"), entry["scanned"],
                             f"{_ms(entry['periodic_duration'])} (n={entry['periodic_duration']['n']})", "", ""])
        out += _table(["instances", "unrelated procs", "n", "median", "p99", "scanned", "periodic median",
                       "daemon RSS", "acquire each"], rows)
        if many:
            out.append(f"  {many['unrelated_processes']} vs {sweep['host']['base']['unrelated_processes']} unrelated "
                       f"processes ({sweep['host']['tracked']} instances, the base measured before and after): "
                       f"{_x(sweep.get('host_ratio'))}")
        leaks = sweep.get("shutdown")
        if leaks:
            out.append(f"  daemon shutdown with {leaks['processes']} processes: {leaks['shutdown_s']:.2f} s, "
                       f"{leaks['alive_after_shutdown']} alive afterwards")
        out.append("")
    fill = results.get("fill")
    if fill:
        out.append(f"Acquire cost as the daemon fills, {fill['mode']} mode (pipelined batches of {fill['batch']} "
                   "on one connection, windows visiting every level in turn)")
        rows = [[level, entry["acquire_ms"]["n"], f"{entry['acquire_ms']['median_ms']:.3f} ms",
                 f"{entry['acquire_ms']['min_ms']:.3f} ms", f"{entry['acquire_ms']['max_ms']:.3f} ms",
                 f"{entry['status_ms']['median_ms']:.2f} ms" if "status_ms" in entry else "n/a",
                 f"{entry['longest_stall_ms']:.2f} ms" if entry.get("longest_stall_ms") is not None else "n/a",
                 _mb(entry.get("rss_bytes"))]
                for level, entry in fill["levels"].items()]
        out += _table(["live instances", "windows", "median per acquire", "min", "max", "status (median)",
                       "longest stall", "daemon RSS"], rows)
        out.append(f"  {fill['high']} vs {fill['low']} live instances: {_x(fill.get('ratio'))} (median of the windows' ratios)")
        for level, entry in fill["levels"].items():
            if entry.get("trio_period_s"):
                out.append(f"  while filling to {level} and answering status: the trio thread ran {entry['trio_ran_s']:.2f} s"
                           f" and waited {entry['trio_waited_s']:.2f} s for a CPU (other processes' turn)"
                           f" in {entry['trio_period_s']:.2f} s")
        out.append("")
    footprint = results.get("footprint")
    if footprint:
        sweep = results.get("sweep", {}).get("cgroup", {})
        with_instances = sweep.get("levels", {}).get("1000", {}).get("rss_bytes")
        out.append("Daemon footprint (VmRSS)")
        rows = [
            ["idle", _mb(footprint["idle_rss_bytes"])],
            ["1000 live instances", _mb(with_instances)],
            [f"{footprint['connections']} open connections", _mb(footprint["rss_with_connections_bytes"])
             + f"  ({footprint['per_connection_bytes'] / 1000:.1f} kB each)"],
        ]
        peers = results.get("peer_rss_bytes", {})
        rows += [[f"{name} (idle, one program running)",
                  f"{_mb(value)}  (ours idle is {footprint['idle_rss_bytes'] / value:.2f}x)"]
                 for name, value in peers.items() if value]
        out += _table(["state", "RSS"], rows)
        out.append("")
    out.append("Targets")
    width = max(len(v.name) for v in verdicts)
    for v in verdicts:
        out.append(f"  {v.status:<7} {v.name.ljust(width)}  {v.measured}  (target {v.limit})")
    problems = results.get("errors", []) + results.get("leftovers", [])
    if problems:
        out.append("")
        out.append("Problems during the run")
        out += [f"  {p}" for p in problems]
    return "\n".join(out)
