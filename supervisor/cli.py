"""The `adapter-supervisor` command line (also `python -m supervisor`).

`serve` and `check-config` work on config files; every other command is a
client of a running daemon. Human output by default, `--json` for scripts.
Exit status: 0 on success, 78 for a bad config, 69 when the daemon cannot be
reached, and 1 (with the daemon's message) when it answers with an error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from supervisor import __version__
from supervisor.client import Client, ConnectionLost, DaemonError, default_socket
from supervisor.config import bundled_config_path, load_config
from supervisor.errors import ConfigError

EX_OK = 0
EX_ERROR = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CONFIG = 78


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapter-supervisor",
        description="Owns adapter process trees: leases over a Unix socket, whole-tree reaping, orphan sweeps.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--socket", help="control socket (default: $ADAPTER_SUPERVISOR_SOCKET or the per-user default)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="config file (default: the bundled config/supervisor.toml)")

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path")

    status = commands.add_parser("status", help="show instances and leases")
    status.add_argument("--job")

    acquire = commands.add_parser("acquire", help="acquire a lease (detached leases outlive this command)")
    acquire.add_argument("job")
    acquire.add_argument("adapter")
    acquire.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    acquire.add_argument("--detach", action="store_true", help="keep the lease after this command exits")
    acquire.add_argument("--ttl", type=float, help="seconds a detached lease lives unless renewed")

    release = commands.add_parser("release", help="release a lease")
    release.add_argument("lease")

    renew = commands.add_parser("renew", help="extend a detached lease")
    renew.add_argument("lease")
    renew.add_argument("--ttl", type=float)

    release_job = commands.add_parser("release-job", help="release every lease of a job")
    release_job.add_argument("job")

    sweep = commands.add_parser("sweep", help="run an orphan sweep now and show its report")
    sweep.add_argument("--deep", action="store_true", help="also scan the whole process table for our tag")

    reports = commands.add_parser("reports", help="recent sweep reports, newest first")
    reports.add_argument("--limit", type=int, default=10)

    logs = commands.add_parser("logs", help="tail of an instance's stderr")
    logs.add_argument("instance")
    logs.add_argument("--lines", type=int, default=100)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from supervisor.service import serve

        return serve(args.config or str(bundled_config_path()))
    if args.command == "check-config":
        return _check_config(args)
    try:
        return _run_client_command(args)
    except DaemonError as exc:
        _print_error(args, exc.code, exc.message)
        return EX_ERROR
    except (ConnectionLost, OSError) as exc:
        _print_error(args, None, f"cannot talk to the daemon at {args.socket or default_socket()}: {exc}")
        return EX_UNAVAILABLE


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        _print_error(args, None, str(exc))
        return EX_CONFIG
    if args.json:
        print(json.dumps({"ok": True, "path": config.path, "adapters": sorted(config.adapters)}))
    else:
        print(f"{config.path}: OK ({len(config.adapters)} adapters: {', '.join(sorted(config.adapters)) or 'none'})")
    return EX_OK


def _run_client_command(args: argparse.Namespace) -> int:
    with Client(args.socket) as client:
        if args.command == "status":
            result = client.call("status", {"job": args.job} if args.job else {})
            _output(args, result, _render_status)
        elif args.command == "acquire":
            params: dict[str, Any] = {"job": args.job, "adapter": args.adapter}
            if args.param:
                params["params"] = dict(_split_param(p) for p in args.param)
            if args.detach:
                params["detach"] = True
            if args.ttl is not None:
                params["ttl"] = args.ttl
            result = client.call("acquire", params)
            _output(args, result, _render_acquire)
        elif args.command == "release":
            _output(args, client.call("release", {"lease": args.lease}),
                    lambda r: f"released; refcount now {r['refcount']}{' (stopping the tree)' if r['stopping'] else ''}")
        elif args.command == "renew":
            params = {"lease": args.lease} | ({"ttl": args.ttl} if args.ttl is not None else {})
            _output(args, client.call("renew", params),
                    lambda r: f"renewed; expires at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['expires_at']))}")
        elif args.command == "release-job":
            _output(args, client.call("release_job", {"job": args.job}),
                    lambda r: f"released {r['released']} leases on {len(r['instances'])} instances")
        elif args.command == "sweep":
            _output(args, client.call("sweep", {"deep": True} if args.deep else {}), _render_report)
        elif args.command == "reports":
            _output(args, client.call("reports", {"limit": args.limit}),
                    lambda r: _render_reports(r["reports"]))
        elif args.command == "logs":
            _output(args, client.call("logs", {"instance": args.instance, "lines": args.lines}),
                    lambda r: "\n".join(r["lines"]))
    return EX_OK


def _split_param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"adapter-supervisor: --param needs NAME=VALUE, got {text!r}")
    return name, value


def _output(args: argparse.Namespace, result: Any, render: Any) -> None:
    print(json.dumps(result, indent=2) if args.json else render(result))


def _print_error(args: argparse.Namespace, code: int | None, message: str) -> None:
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    else:
        print(f"adapter-supervisor: {message}", file=sys.stderr)


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _render_status(result: dict[str, Any]) -> str:
    daemon = result["daemon"]
    lines = [
        f"daemon pid {daemon['pid']}  up {human_age(daemon['uptime_s'])}  "
        f"{daemon['instances']} instances  {daemon['leases']} leases  {daemon['connections']} connections  "
        f"mode {'cgroup' if daemon['cgroup_mode'] else 'process-table'}"
    ]
    rows = [("INSTANCE", "JOB", "ADAPTER", "STATE", "PID", "PROCS", "LEASES", "AGE", "RSS")]
    now = time.time()
    for inst in result["instances"]:
        rows.append((
            inst["instance"], inst["job"], inst["adapter"], inst["state"], str(inst["pid"] or "-"),
            str(len(inst["pids"])), str(inst["refcount"]),
            human_age(now - inst["started_at"]) if inst["started_at"] else "-",
            human_bytes(inst["rss_bytes"]),
        ))
    lines += ["no instances"] if len(rows) == 1 else _render_table(rows)
    return "\n".join(lines)


def _render_table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _render_reports(items: list[dict[str, Any]]) -> str:
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
    return "\n".join(_render_table(rows))


def _render_report(report: dict[str, Any]) -> str:
    lines = [_render_reports([report])]
    if report["orphans"]:
        rows = [("PID", "PPID", "INSTANCE", "JOB", "ADAPTER", "AGE", "RSS", "ACTION", "RESULT", "COMMAND")]
        for orphan in report["orphans"]:
            rows.append((
                str(orphan["pid"]), str(orphan["ppid"]), orphan["instance"] or "-", orphan["job"] or "-",
                orphan["adapter"] or "-", human_age(orphan["age_s"]), human_bytes(orphan["rss_bytes"]),
                orphan["action"], orphan["result"], " ".join(orphan["cmdline"])[:60],
            ))
        lines += ["", *_render_table(rows)]
    for label, key in (("expired leases", "expired_leases"), ("over memory_limit", "over_memory"), ("errors", "errors")):
        if report[key]:
            lines.append(f"{label}: {', '.join(report[key])}")
    return "\n".join(lines)


def _render_acquire(result: dict[str, Any]) -> str:
    verb = "spawned" if result["spawned"] else "joined"
    return (
        f"lease {result['lease']}\n"
        f"{verb} instance {result['instance']} (job {result['job']}, adapter {result['adapter']}, "
        f"pid {result['pid']}, refcount {result['refcount']})"
    )


if __name__ == "__main__":
    sys.exit(main())
