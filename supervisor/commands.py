"""What the command line's commands do once parsed (`supervisor.cli` parses
and dispatches): the client commands, which talk to a running daemon and
print its answers, `check-config` and `install-units`. Imported only for
those commands, so that `serve` starts without the client library."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supervisor import display, units
from supervisor.client import Client, ConnectionLost, DaemonError, InvalidParams, UnknownLease, default_socket
from supervisor.client.messages import acquire_params
from supervisor.client.session import DEFAULT_TIMEOUT_S
from supervisor.core.config import check_config_file
from supervisor.core.protocol import MAX_LOG_LINES
from supervisor.exitstatus import EX_CANTCREAT, EX_CONFIG, EX_ERROR, EX_INTERRUPTED, EX_OK, EX_UNAVAILABLE


# An upgrade checks the new code (a cold Python start) and waits for what is
# under way before it answers.
UPGRADE_TIMEOUT_S = 90.0


def client_main(args: argparse.Namespace) -> int:
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


def check_config(args: argparse.Namespace) -> int:
    """`check-config`: every error of the file (status 78 if any), else OK
    with warnings about what a spawn would trip over."""
    from supervisor.procs.spawner import command_warnings

    checked = check_config_file(args.path)
    warnings = command_warnings(checked.config) if checked.config is not None else []
    if args.json:
        print(json.dumps({
            "ok": checked.config is not None,
            "path": checked.path,
            "errors": [{"key": error.key, "message": error.expected} for error in checked.errors],
            "warnings": [{"key": warning.key, "message": warning.message} for warning in warnings],
            "adapters": sorted(checked.config.adapters) if checked.config is not None else [],
        }))
    else:
        for error in checked.errors:
            print(f"adapter-supervisor: {error}", file=sys.stderr)
        for warning in warnings:
            print(f"adapter-supervisor: warning: {warning}", file=sys.stderr)
    if checked.config is None:
        if not args.json:
            print(f"{checked.path}: {len(checked.errors)} error{'s' if len(checked.errors) != 1 else ''}", file=sys.stderr)
        return EX_CONFIG
    if not args.json:
        adapters = sorted(checked.config.adapters)
        warned = f"; {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
        print(f"{checked.path}: OK ({len(adapters)} adapters: {', '.join(adapters) or 'none'}{warned})")
    return EX_OK


def install_units(args: argparse.Namespace) -> int:
    """`install-units`: the shipped units, their ExecStart= running this
    installation's command, printed or written (status 73 if that fails)."""
    directory = Path(args.dir) if args.dir else units.default_unit_dir(args.user)
    try:
        rendered = units.render_units(args.user)
        if args.print:
            if args.json:
                print(json.dumps({"units": {str(directory / name): text for name, text in rendered.items()}}))
            else:
                print("\n".join(f"# {directory / name}\n{text}" for name, text in rendered.items()), end="")
            return EX_OK
        written = units.install_units(rendered, directory)
    except units.UnitsError as exc:
        _print_error(args, None, str(exc))
        return EX_CANTCREAT
    if args.json:
        print(json.dumps({"units": [{"path": str(w.path), "action": w.action} for w in written]}))
        return EX_OK
    for unit in written:
        print(f"{unit.action}: {unit.path}")
    exec_start = next(line for line in rendered[units.SERVICE].splitlines() if line.startswith("ExecStart="))
    systemctl = "systemctl --user" if args.user else "systemctl"
    print(f"the service runs {exec_start.removeprefix('ExecStart=')}")
    print(f"once that config exists: {systemctl} daemon-reload && {systemctl} enable --now {units.SOCKET} {units.SERVICE}")
    return EX_OK


def _run_client_command(args: argparse.Namespace) -> int:
    timeout = UPGRADE_TIMEOUT_S if args.command == "upgrade" else DEFAULT_TIMEOUT_S
    with Client(args.socket, timeout=timeout) as client:
        if args.command == "status":
            if args.watch is not None:
                return _watch_status(client, args)
            _output(args, client.status(args.job, adapter=args.adapter, state=args.state, uid=args.uid),
                    lambda r: display.render_status(r, time.time()))
        elif args.command == "adapters":
            _output(args, client.call("adapters", {}), lambda r: display.render_adapters(r["adapters"]))
        elif args.command == "acquire":
            params = dict(p.partition("=")[::2] for p in args.param)
            result = client.call("acquire", acquire_params(
                args.job, args.adapter, params=params, fds=False, detach=args.detach, ttl=args.ttl,
            ))
            _output(args, result, display.render_acquire)
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
            _output(args, client.sweep(deep=args.deep), display.render_report)
        elif args.command == "reports":
            _output(args, {"reports": client.reports(args.limit)}, lambda r: display.render_reports(r["reports"]))
        elif args.command == "logs":
            return _logs(client, args)
        elif args.command == "metrics":
            _output(args, client.call("metrics", {}), lambda r: r["text"].rstrip("\n"))
        elif args.command == "upgrade":
            _output(args, client.call("upgrade", {}),
                    lambda r: f"upgraded in place: pid {r['pid']}, version {r['version']}, generation {r['generation']}")
    return EX_OK


def _logs(client: Client, args: argparse.Namespace) -> int:
    """`logs`: the tail of the target's stderr, then with --follow the lines
    that come after it, until Ctrl-C (KeyboardInterrupt propagates) or until
    the daemon no longer knows the target (status 0, said on stderr). Raises
    DaemonError if the target is neither an instance nor a lease."""
    # Each poll of --follow asks for as much as the daemon keeps, so that
    # the new lines can be told from those already printed (see `new_lines`).
    window = MAX_LOG_LINES if args.follow else args.lines
    kind, lines = _first_logs(client, args.target, window)
    shown = lines[-args.lines:]
    if args.json:
        print(json.dumps({"lines": shown}), flush=True)
    elif shown:
        print("\n".join(shown), flush=True)
    while args.follow:
        time.sleep(args.follow_interval)
        try:
            latest = client.logs(**{kind: args.target}, lines=window)
        except (InvalidParams, UnknownLease) as exc:
            print(f"adapter-supervisor: no longer following {args.target}: {exc.message}", file=sys.stderr)
            return EX_OK
        fresh = new_lines(lines, latest)
        lines = latest
        if fresh:
            print(json.dumps({"lines": fresh}) if args.json else "\n".join(fresh), flush=True)
    return EX_OK


def _first_logs(client: Client, target: str, lines: int) -> tuple[str, list[str]]:
    """The target's tail, asked for as an instance and, if the daemon knows
    no such instance, as a lease; returns which it was and the lines.
    Raises DaemonError, saying that it is neither."""
    try:
        return "instance", client.logs(target, lines=lines)
    except InvalidParams as as_instance:
        try:
            return "lease", client.logs(lease=target, lines=lines)
        except UnknownLease:
            raise InvalidParams(
                as_instance.code,
                f"no instance or lease {target!r} is known to the daemon: not running, not finished lately, "
                "and no lease of that token is held",
                as_instance.data,
            ) from None


def new_lines(previous: Sequence[str], latest: Sequence[str]) -> list[str]:
    """The lines of `latest` (a later tail of the same log) that come after
    `previous`: what follows the longest end of `previous` that `latest`
    begins with. When more lines came than a tail holds, or the log repeats
    one line over and over, the overlap is ambiguous and lines can be
    missed: a tail is all the protocol offers."""
    for overlap in range(min(len(previous), len(latest)), 0, -1):
        if previous[len(previous) - overlap:] == latest[:overlap]:
            return list(latest[overlap:])
    return list(latest)


def _watch_status(client: Client, args: argparse.Namespace) -> int:
    """Print the status every `args.watch` seconds until Ctrl-C (exit 0). Raises
    ConnectionLost when the daemon goes away meanwhile."""
    in_place = sys.stdout.isatty() and not args.json
    try:
        while True:
            result = client.status(args.job, adapter=args.adapter, state=args.state, uid=args.uid)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                sys.stdout.write(display.watch_frame(display.render_status(result, time.time()), args.watch, time.time(), in_place=in_place))
                sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EX_OK


def _output(args: argparse.Namespace, result: Any, render: Any) -> None:
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        page(render(result))


def page(text: str) -> None:
    """Print `text`; through a pager ($PAGER, else `less -FRX`) when stdout
    is a terminal it would not fit on. PAGER=cat turns paging off; a pager
    that cannot be started prints it plainly."""
    if not sys.stdout.isatty() or text.count("\n") + 1 < shutil.get_terminal_size().lines:
        print(text)
        return
    configured = os.environ.get("PAGER")
    command = shlex.split(configured) if configured else ["less", "-FRX"]
    try:
        subprocess.run(command, input=text + "\n", text=True, check=False)
    except OSError:
        print(text)


def _print_error(args: argparse.Namespace, code: int | None, message: str) -> None:
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    else:
        print(f"adapter-supervisor: {message}", file=sys.stderr)

