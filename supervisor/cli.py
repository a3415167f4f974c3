"""The `adapter-supervisor` command line (also `python -m supervisor`).

`serve` and `check-config` work on config files; every other command is a
client of a running daemon. Human output by default, `--json` for scripts.
Exit status: 0 on success, 78 for a bad config, 69 when the daemon cannot be
reached (or goes away, e.g. during `status --watch`), 1 (with the daemon's
message, error name and code) when it answers with an error, 130 on Ctrl-C
(except for `status --watch`, which Ctrl-C ends normally).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from supervisor import __version__
from supervisor.client import Client, ConnectionLost, DaemonError, default_socket
from supervisor.client.session import DEFAULT_TIMEOUT_S
from supervisor.client.session import acquire_params
from supervisor.core.config import bundled_config_path, load_config
from supervisor.core.errors import ConfigError

EX_OK = 0
EX_ERROR = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CONFIG = 78
# Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 128 + signal.SIGPIPE

# Default seconds between `status --watch` refreshes: often enough to follow a
# job, rarely enough that the tree scans cost the daemon nothing noticeable.
WATCH_INTERVAL_S = 2.0

# An upgrade checks the new code (a cold Python start) and waits for what is
# under way before it answers.
UPGRADE_TIMEOUT_S = 90.0

# Cursor home, then clear to the end of the screen: redraws a terminal in place.
CLEAR_SCREEN = "\x1b[H\x1b[J"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="adapter-supervisor",
        description="Owns adapter process trees: leases over a Unix socket, whole-tree reaping, orphan sweeps.",
        epilog="exit status: 0 ok, 1 the daemon answered with an error, 69 the daemon cannot be reached, "
        "78 bad config, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--socket", help="control socket (default: $ADAPTER_SUPERVISOR_SOCKET or the per-user default)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="config file (default: the bundled config/supervisor.toml)")
    serve.add_argument(
        "--check-upgrade", action="store_true",
        help="only load the config and print the formats this code reads (what `upgrade` runs first)",
    )

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path")

    status = commands.add_parser("status", help="show instances and leases")
    status.add_argument("--job")
    status.add_argument(
        "--watch", type=_positive_seconds, nargs="?", const=WATCH_INTERVAL_S, metavar="SECONDS",
        help=f"refresh every SECONDS (default {WATCH_INTERVAL_S:g}) until Ctrl-C; with --json, one JSON line per refresh",
    )

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

    commands.add_parser(
        "upgrade", help="re-execute the daemon in place with the code on disk (same pid; adapters and connections stay)"
    )

    logs = commands.add_parser("logs", help="tail of an instance's stderr")
    logs.add_argument("instance")
    logs.add_argument("--lines", type=int, default=100)
    return parser


def _positive_seconds(text: str) -> float:
    """argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit
    status of the module docstring: a bad config, the daemon's errors, a daemon
    that cannot be reached, Ctrl-C during a client command and a closed stdout
    become statuses, not exceptions. Raises SystemExit for --help and --version
    (status 0), usage errors (argparse's status 2) and a --param without "="
    (status 1)."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from supervisor.serve import serve

        return serve(args.config or str(bundled_config_path()), check_upgrade=args.check_upgrade)
    try:
        if args.command == "check-config":
            return _check_config(args)
        return _client_main(args)
    except BrokenPipeError:
        # Whoever reads the output stopped reading (`| head`): nothing more can
        # be printed, and it is no fault of the daemon's. stdout goes to
        # /dev/null so that the interpreter's own flush at exit does not fail
        # again; the status is a shell's for a command killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE


def _client_main(args: argparse.Namespace) -> int:
    try:
        return _run_client_command(args)
    except BrokenPipeError:
        # Our own output's: the client reports a daemon gone as ConnectionLost.
        raise
    except DaemonError as exc:
        _print_error(args, exc.code, f"{exc.message} ({type(exc).__name__}, error {exc.code})")
        return EX_ERROR
    except (ConnectionLost, OSError) as exc:
        _print_error(args, None, f"cannot talk to the daemon at {args.socket or default_socket()}: {exc}")
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return EX_INTERRUPTED


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
    timeout = UPGRADE_TIMEOUT_S if args.command == "upgrade" else DEFAULT_TIMEOUT_S
    with Client(args.socket, timeout=timeout) as client:
        if args.command == "status":
            if args.watch is not None:
                return _watch_status(client, args)
            _output(args, client.status(args.job), lambda r: render_status(r, time.time()))
        elif args.command == "acquire":
            params = dict(_split_param(p) for p in args.param)
            result = client.call("acquire", acquire_params(
                args.job, args.adapter, params=params, fds=False, detach=args.detach, ttl=args.ttl,
            ))
            _output(args, result, _render_acquire)
        elif args.command == "release":
            _output(args, client.release(args.lease),
                    lambda r: f"released; refcount now {r['refcount']}{' (stopping the tree)' if r['stopping'] else ''}")
        elif args.command == "renew":
            _output(args, {"expires_at": client.renew(args.lease, args.ttl)},
                    lambda r: f"renewed; expires at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['expires_at']))}")
        elif args.command == "release-job":
            _output(args, client.release_job(args.job),
                    lambda r: f"released {r['released']} leases on {len(r['instances'])} instances")
        elif args.command == "sweep":
            _output(args, client.sweep(deep=args.deep), _render_report)
        elif args.command == "reports":
            _output(args, {"reports": client.reports(args.limit)}, lambda r: render_reports(r["reports"]))
        elif args.command == "logs":
            _output(args, {"lines": client.logs(args.instance, lines=args.lines)}, lambda r: "\n".join(r["lines"]))
        elif args.command == "upgrade":
            _output(args, client.call("upgrade", {}),
                    lambda r: f"upgraded in place: pid {r['pid']}, version {r['version']}, generation {r['generation']}")
    return EX_OK


def _watch_status(client: Client, args: argparse.Namespace) -> int:
    """Print the status every `args.watch` seconds until Ctrl-C (exit 0). Raises
    ConnectionLost when the daemon goes away meanwhile."""
    in_place = sys.stdout.isatty() and not args.json
    try:
        while True:
            result = client.status(args.job)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                sys.stdout.write(watch_frame(render_status(result, time.time()), args.watch, time.time(), in_place=in_place))
                sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EX_OK


def watch_frame(text: str, interval: float, now: float, *, in_place: bool) -> str:
    """One refresh of `status --watch`: on a terminal it redraws the screen, in a
    pipe or file frames follow each other, separated by a blank line."""
    title = f"every {interval:g}s  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}"
    return f"{CLEAR_SCREEN}{title}\n\n{text}\n" if in_place else f"{title}\n{text}\n\n"


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
    lines += ["no instances"] if len(rows) == 1 else _render_table(rows)
    if len(leases) > 1:
        lines += ["", *_render_table(leases)]
    return "\n".join(lines)


def _render_state(inst: Mapping[str, Any]) -> str:
    """An instance's state; an exited one's says why and with what status
    ("exited (killed, rc -9)")."""
    if inst["state"] != "exited" or "reason" not in inst:
        return str(inst["state"])
    returncode = inst.get("returncode")
    return f"exited ({inst['reason']}, rc {'?' if returncode is None else returncode})"


def _render_table(rows: Sequence[Sequence[str]]) -> list[str]:
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
    return "\n".join(_render_table(rows))


def _render_report(report: dict[str, Any]) -> str:
    lines = [render_reports([report])]
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
