"""The `adapter-supervisor` command line (also `python -m supervisor`).

`serve` and `check-config` work on config files, `completion` prints a shell
completion script, `install-units` prints or writes the systemd units; every
other command is a client of a running daemon.
Human output by default, `--json` for scripts. The global options (`--socket`,
`--json`) go before or after the command. Arguments the daemon would refuse
are refused here first, in the command line's own terms. Exit statuses: see
EXIT_STATUSES.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supervisor import __version__, completion, display, units
from supervisor.client import Client, ConnectionLost, DaemonError, InvalidParams, UnknownLease, default_socket
from supervisor.client.session import DEFAULT_TIMEOUT_S
from supervisor.client.session import acquire_params
from supervisor.core.config import bundled_config_path, check_config_file
from supervisor.core.protocol import (
    MAX_JOB_CHARS,
    MAX_LEASE_CHARS,
    MAX_LOG_LINES,
    MAX_REPORTS_LIMIT,
    MAX_TTL_SECONDS,
)

EX_OK = 0
EX_ERROR = 1
# argparse's status for a command line it cannot parse; ours for arguments
# the daemon would refuse.
EX_USAGE = 2
EX_UNAVAILABLE = 69
# sysexits' "cannot create (user) output file".
EX_CANTCREAT = 73
EX_CONFIG = 78
# Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 128 + signal.SIGPIPE

# Every status the command line exits with, for --help.
EXIT_STATUSES = f"""\
exit status:
  {EX_OK:<4}success (also: `status --watch` ended with Ctrl-C, `logs --follow` of a target that went away)
  {EX_ERROR:<4}the daemon answered with an error (its message, error name and code are printed)
  {EX_USAGE:<4}bad command line: an unknown option, a missing or out-of-range argument
  {EX_UNAVAILABLE:<4}the daemon cannot be reached or went away; for `serve`, another daemon holds its socket or state_dir
  {EX_CANTCREAT:<4}install-units could not read a shipped unit or write one
  {EX_CONFIG:<4}the config is bad (check-config, serve)
  {EX_INTERRUPTED:<4}interrupted by Ctrl-C
  {EX_BROKEN_PIPE:<4}whoever read the output stopped reading (e.g. `| head`)
"""

# Default seconds between `status --watch` refreshes: often enough to follow a
# job, rarely enough that the tree scans cost the daemon nothing noticeable.
WATCH_INTERVAL_S = 2.0

# Seconds between the polls of `logs --follow`: the protocol offers a tail,
# not a stream, and a person reading a log notices no half-second delay.
FOLLOW_INTERVAL_S = 0.5

# An upgrade checks the new code (a cold Python start) and waits for what is
# under way before it answers.
UPGRADE_TIMEOUT_S = 90.0

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="adapter-supervisor",
        description="Owns adapter process trees: leases over a Unix socket, whole-tree reaping, orphan sweeps.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND --help: its own options)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        subparser = commands.add_parser(
            name, help=help, description=help, epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_global_options(subparser)
        return subparser

    serve = command("serve", "run the daemon")
    serve.add_argument("--config", metavar="PATH", help="config file (default: the bundled config/supervisor.toml)")
    serve.add_argument(
        "--check-upgrade", action="store_true",
        help="only load the config and print the formats this code reads (what `upgrade` runs first)",
    )

    check = command("check-config", "validate a config file: every error with its key path, and warnings")
    check.add_argument("path", metavar="PATH", help="the config file to check")

    status = command("status", "show instances and their leases")
    status.add_argument("--job", help="only the instances of this job")
    status.add_argument("--adapter", help="only the instances of this adapter")
    status.add_argument("--state", choices=("starting", "running", "lingering", "stopping", "exited"),
                        help="only the instances in this state")
    status.add_argument("--uid", type=_non_negative_int, metavar="UID", help="only the instances this uid owns")
    status.add_argument(
        "--watch", type=_positive_seconds, nargs="?", const=WATCH_INTERVAL_S, metavar="SECONDS",
        help=f"refresh every SECONDS (default {WATCH_INTERVAL_S:g}) until Ctrl-C; with --json, one JSON line per refresh",
    )

    command("adapters", "list the configured adapters and their live instances")

    acquire = command("acquire", "acquire a lease (detached leases outlive this command)")
    acquire.add_argument("job", metavar="JOB", help="the job the instance is for (1 to 256 characters)")
    acquire.add_argument("adapter", metavar="ADAPTER", help="the adapter's name in the config (see `adapters`)")
    acquire.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="fill in a param the adapter declares; repeat for several",
    )
    acquire.add_argument("--detach", action="store_true", help="keep the lease after this command exits (needs --ttl)")
    acquire.add_argument("--ttl", type=float, metavar="SECONDS", help="seconds a detached lease lives unless renewed")

    release = command("release", "release a lease")
    release.add_argument("lease", metavar="LEASE", help="the lease token `acquire` printed")

    renew = command("renew", "extend a detached lease")
    renew.add_argument("lease", metavar="LEASE", help="the detached lease's token")
    renew.add_argument("--ttl", type=float, metavar="SECONDS", help="seconds from now (default: the lease's own ttl)")

    release_job = command("release-job", "release every lease of a job")
    release_job.add_argument("job", metavar="JOB", help="the job whose leases to release, whoever holds them")

    sweep = command("sweep", "run an orphan sweep now and show its report")
    sweep.add_argument("--deep", action="store_true", help="also scan the whole process table for our tag")

    reports = command("reports", "recent sweep reports, newest first")
    reports.add_argument("--limit", type=int, default=10, metavar="N", help=f"at most N reports (1 to {MAX_REPORTS_LIMIT}, default 10)")

    command("upgrade", "re-execute the daemon in place with the code on disk (same pid; adapters and connections stay)")

    logs = command("logs", "tail of an instance's stderr, by instance or lease; --follow for what comes next")
    logs.add_argument("target", metavar="INSTANCE|LEASE", help="an instance id (see `status`) or a lease token")
    logs.add_argument("--lines", type=int, default=100, metavar="N", help=f"the last N lines (1 to {MAX_LOG_LINES}, default 100)")
    logs.add_argument(
        "-f", "--follow", action="store_true",
        help=f"then print new lines as they come (polls every {FOLLOW_INTERVAL_S:g} s) until Ctrl-C",
    )

    command("metrics", "print the daemon's metrics in the Prometheus text format")

    install = command(
        "install-units", "write the systemd units, with ExecStart= running this installation's adapter-supervisor",
    )
    install.add_argument(
        "--user", action="store_true",
        help="the user units, for `systemctl --user` (default: the system units, run as root)",
    )
    where = install.add_mutually_exclusive_group()
    where.add_argument(
        "--print", action="store_true",
        help="print them, each after a `# PATH` line as `systemctl cat` shows units, instead of writing them",
    )
    where.add_argument(
        "--dir", metavar="DIR",
        help=f"write them into DIR (default: {units.SYSTEM_UNIT_DIR}, with --user ~/.config/systemd/user)",
    )

    shell = command("completion", "print a shell completion script")
    shell.add_argument(
        "shell", choices=completion.SHELLS, metavar="SHELL",
        help="bash (source it, e.g. from ~/.bashrc) or zsh (put it on $fpath as _adapter-supervisor)",
    )
    return parser


# The global options and their defaults.
GLOBAL_DEFAULTS: dict[str, Any] = {"socket": None, "json": False}


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    """The global options, added to the main parser and to each command's, so
    that they go before the command or after it. Their default there is
    SUPPRESS, so that a command's parser never overwrites what was given
    before the command; `parse_arguments` fills in GLOBAL_DEFAULTS."""
    parser.add_argument(
        "--socket", default=argparse.SUPPRESS, metavar="PATH",
        help="the daemon's control socket (default: $ADAPTER_SUPERVISOR_SOCKET, else the per-user default)",
    )
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print machine-readable JSON")


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)` with the global options' defaults filled in,
    and arguments the daemon would refuse refused (`usage_problem`). Raises
    SystemExit as argparse does (status 2 for a usage error)."""
    args = parser.parse_args(argv)
    for name, default in GLOBAL_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    problem = usage_problem(args)
    if problem is not None:
        _command_parser(parser, args.command).error(problem)
    return args


def _positive_seconds(text: str) -> float:
    """argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: a whole number, 0 or more (a uid)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with parsed arguments that the daemon would refuse, said
    in the command line's terms (`--ttl needs --detach`, not the wire's
    `params.ttl`), or None."""
    command = args.command
    for name in ("job", "lease"):
        problem = _text_problem(name.upper(), getattr(args, name, None), MAX_JOB_CHARS if name == "job" else MAX_LEASE_CHARS)
        if problem:
            return problem
    if command == "acquire":
        if args.ttl is not None and not args.detach:
            return "--ttl needs --detach (only a detached lease expires)"
        if args.detach and args.ttl is None:
            return "--detach needs --ttl SECONDS (a detached lease must expire unless renewed)"
        for param in args.param:
            if "=" not in param:
                return f"--param needs NAME=VALUE, got {param!r}"
    if command in ("acquire", "renew") and args.ttl is not None and not 0 < args.ttl <= MAX_TTL_SECONDS:
        return f"--ttl must be above 0 and at most {MAX_TTL_SECONDS:.0f} seconds (30 days), got {args.ttl:g}"
    if command == "logs":
        return _range_problem("--lines", args.lines, MAX_LOG_LINES)
    if command == "reports":
        return _range_problem("--limit", args.limit, MAX_REPORTS_LIMIT)
    return None


def _text_problem(name: str, value: str | None, longest: int) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= longest:
        return f"{name} must be 1 to {longest} characters, got {len(value)}"
    control = next((c for c in value if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F), None)
    if control is not None:
        return f"{name} must not contain control characters (found U+{ord(control):04X})"
    return None


def _range_problem(option: str, value: int, highest: int) -> str | None:
    if value < 1:
        return f"{option} must be >= 1, got {value}"
    if value > highest:
        return f"{option} must be <= {highest}, got {value}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit
    status of EXIT_STATUSES: a bad config, the daemon's errors, a daemon that
    cannot be reached, Ctrl-C during a client command and a closed stdout
    become statuses, not exceptions. Raises SystemExit for --help and
    --version (status 0) and for usage errors (status 2)."""
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if args.command == "serve":
        from supervisor.serve import serve

        return serve(args.config or str(bundled_config_path()), check_upgrade=args.check_upgrade)
    try:
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "completion":
            script = completion.bash_script(parser) if args.shell == "bash" else completion.zsh_script(parser)
            sys.stdout.write(script)
            sys.stdout.flush()
            return EX_OK
        if args.command == "install-units":
            return _install_units(args)
        return _client_main(args)
    except BrokenPipeError:
        # Whoever reads the output stopped reading (`| head`): nothing more can
        # be printed, and it is no fault of the daemon's. stdout goes to
        # /dev/null so that the interpreter's own flush at exit does not fail
        # again; the status is a shell's for a command killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of command `name`, so that its errors show its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    return parser


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


def _install_units(args: argparse.Namespace) -> int:
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
        time.sleep(FOLLOW_INTERVAL_S)
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


if __name__ == "__main__":
    sys.exit(main())
