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
import gc
import os
import sys
from collections.abc import Sequence
from typing import Any

from supervisor import __version__, units
from supervisor.exitstatus import EX_BROKEN_PIPE, EX_OK, EXIT_STATUSES
from supervisor.core.config import bundled_config_path
from supervisor.core.protocol import (
    MAX_JOB_CHARS,
    MAX_LEASE_CHARS,
    MAX_LOG_LINES,
    MAX_REPORTS_LIMIT,
    MAX_TTL_SECONDS,
)

# Default seconds between `status --watch` refreshes: often enough to follow a
# job, rarely enough that the tree scans cost the daemon nothing noticeable.
WATCH_INTERVAL_S = 2.0

# Seconds between the polls of `logs --follow`: the protocol offers a tail,
# not a stream, and a person reading a log notices no half-second delay.
FOLLOW_INTERVAL_S = 0.5

# The shells `completion` writes a script for (supervisor/completion.py).
COMPLETION_SHELLS = ("bash", "zsh")


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
    logs.set_defaults(follow_interval=FOLLOW_INTERVAL_S)

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
        "shell", choices=COMPLETION_SHELLS, metavar="SHELL",
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
    # Each command imports what it needs: `serve` (also the new image of an
    # in-place upgrade, whose start is a pause for every client) never loads
    # the client library.
    if args.command == "serve":
        # What start-up makes lives as long as the daemon and is frozen once
        # it serves (serve.freeze_startup_objects, which turns the collector
        # back on): collections on the way would only lengthen every start,
        # and every upgrade's pause.
        gc.disable()
        try:
            from supervisor.serve import serve

            return serve(args.config or str(bundled_config_path()), check_upgrade=args.check_upgrade)
        finally:
            gc.enable()
    from supervisor import commands

    try:
        if args.command == "check-config":
            return commands.check_config(args)
        if args.command == "completion":
            from supervisor import completion

            script = completion.bash_script(parser) if args.shell == "bash" else completion.zsh_script(parser)
            sys.stdout.write(script)
            sys.stdout.flush()
            return EX_OK
        if args.command == "install-units":
            return commands.install_units(args)
        return commands.client_main(args)
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


