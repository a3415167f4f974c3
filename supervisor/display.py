"""What the command line shows a person: the daemon's answers as tables
and sentences, sizes and ages in human units. No I/O: each function takes
the JSON a method answered (and the time, where ages are shown) and returns
text."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

# Cursor home, then clear to the end of the screen: redraws a terminal in place.
CLEAR_SCREEN = "\x1b[H\x1b[J"


def watch_frame(text: str, interval: float, now: float, *, in_place: bool) -> str:
    """One refresh of `status --watch`: on a terminal it redraws the screen, in a
    pipe or file frames follow each other, separated by a blank line."""
    title = f"every {interval:g}s  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"
    return f"{CLEAR_SCREEN}{title}\n\n{text}\n" if in_place else f"{title}\n{text}\n\n"


def human_bytes(value: float) -> str:
    """`value` bytes in binary units: "512 B", "1.5 MiB", "2.0 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def human_age(seconds: float | None) -> str:
    """A duration as "42s", "3m07s" or "5h02m"; "-" for None."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render_status(result: Mapping[str, Any], now: float) -> str:
    """The status as a summary line and a table: one row per instance with its
    job, adapter, state (an exited one's reason and return code with it), root
    pid, process count, refcount, age and tree RSS; then, if any lease is
    held, one row per lease with its instance, whether it is bound or
    detached, when it expires and who holds it. Raises KeyError if `result`
    lacks a field the daemon's `status` sends."""
    daemon = result["daemon"]
    lines = [
        f"daemon pid {daemon['pid']}  up {human_age(daemon['uptime_s'])}  "
        f"{daemon['instances']} instances  {daemon['leases']} leases  {daemon['connections']} connections  "
        f"RSS {human_bytes(daemon.get('rss_bytes', 0))}"
        + (f" of {human_bytes(daemon['memory_budget'])} budget" if daemon.get("memory_budget") else "")
        + f"  mode {'cgroup' if daemon['cgroup_mode'] else 'process-table'}"
        + ("  SHUTTING DOWN" if daemon.get("shutting_down") else "")
    ]
    rows = [("INSTANCE", "JOB", "ADAPTER", "STATE", "PID", "PROCS", "REFCOUNT", "AGE", "RSS")]
    leases = [("LEASE", "INSTANCE", "KIND", "EXPIRES", "UID", "HOLDER PID")]
    for inst in result["instances"]:
        rows.append((
            inst["instance"], inst["job"], inst["adapter"], _render_state(inst), str(inst["pid"] or "-"),
            str(len(inst["pids"])), str(inst["refcount"]),
            human_age(now - inst["started_at"]) if inst["started_at"] else "-",
            human_bytes(inst["rss_bytes"]),
        ))
        for lease in inst.get("leases", ()):
            leases.append((
                lease["lease"], inst["instance"], "detached" if lease["detached"] else "bound",
                f"in {human_age(lease['expires_at'] - now)}" if lease["expires_at"] is not None else "-",
                str(lease["uid"]), str(lease["pid"]) if lease["pid"] is not None else "-",
            ))
    lines += ["no instances"] if len(rows) == 1 else render_table(rows)
    if len(leases) > 1:
        lines += ["", *render_table(leases)]
    return "\n".join(lines)


def _render_state(inst: Mapping[str, Any]) -> str:
    """An instance's state; an exited one's says why and with what status
    ("exited (killed, rc -9)")."""
    if inst["state"] != "exited" or "reason" not in inst:
        return str(inst["state"])
    returncode = inst.get("returncode")
    return f"exited ({inst['reason']}, rc {'?' if returncode is None else returncode})"


def render_table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def render_reports(items: list[dict[str, Any]]) -> str:
    """Sweep reports as a table, one row per sweep. Raises KeyError if a report
    lacks a field the daemon's reports carry."""
    if not items:
        return "no sweep reports yet"
    rows = [("WHEN", "KIND", "DURATION", "SCANNED", "ORPHANS", "EXPIRED", "OVER MEM", "RECLAIMED", "ERRORS")]
    for report in items:
        rows.append((
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["started_at"])),
            report["kind"],
            f"{report['duration_ms']:.1f} ms",
            str(report["scanned"]),
            str(len(report["orphans"])),
            str(len(report["expired_leases"])),
            str(len(report["over_memory"])),
            human_bytes(report["reclaimed_rss_bytes"]),
            str(len(report["errors"])),
        ))
    return "\n".join(render_table(rows))


def render_report(report: dict[str, Any]) -> str:
    lines = [render_reports([report])]
    if report["orphans"]:
        rows = [("PID", "PPID", "INSTANCE", "JOB", "ADAPTER", "AGE", "RSS", "ACTION", "RESULT", "COMMAND")]
        for orphan in report["orphans"]:
            rows.append((
                str(orphan["pid"]), str(orphan["ppid"]), orphan["instance"] or "-", orphan["job"] or "-",
                orphan["adapter"] or "-", human_age(orphan["age_s"]), human_bytes(orphan["rss_bytes"]),
                orphan["action"], orphan["result"], " ".join(orphan["cmdline"])[:60],
            ))
        lines += ["", *render_table(rows)]
    for label, key in (("expired leases", "expired_leases"), ("over memory_limit", "over_memory"), ("errors", "errors")):
        if report[key]:
            lines.append(f"{label}: {', '.join(report[key])}")
    return "\n".join(lines)


def render_adapters(items: list[dict[str, Any]]) -> str:
    """The configured adapters as a table, one row per adapter. Raises
    KeyError if an item lacks a field the daemon's `adapters` sends."""
    if not items:
        return "no adapters configured"
    rows = [("ADAPTER", "LIVE", "MAX", "STDIO", "MEMORY LIMIT", "USER", "PARAMS", "COMMAND")]
    for adapter in items:
        rows.append((
            adapter["name"], str(adapter["live"]), str(adapter["max_instances"]), adapter["stdio"],
            human_bytes(adapter["memory_limit"]) if adapter["memory_limit"] is not None else "-",
            adapter["user"] or "-", ",".join(adapter["params"]) or "-", " ".join(adapter["command"]),
        ))
    return "\n".join(render_table(rows))


def render_acquire(result: dict[str, Any]) -> str:
    verb = "spawned" if result["spawned"] else "joined"
    return (
        f"lease {result['lease']}\n"
        f"{verb} instance {result['instance']} (job {result['job']}, adapter {result['adapter']}, "
        f"pid {result['pid']}, refcount {result['refcount']})"
    )

