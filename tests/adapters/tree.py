"""A test adapter whose tree has the shapes that leak in the wild.

Root -> child -> grandchild, plus an escapee that calls setsid() and
double-forks (so it is re-parented away from its parent). Every process writes
"<role> <pid>" to the pid file once it is set up, then sleeps (or echoes stdin
for the root with --echo).

Options: --ignore-term (every process ignores SIGTERM), --exit-after S (the
root exits on its own after S seconds, leaving the others), --echo (root copies
stdin to stdout line by line), --no-escapee, --untagged-escapee (the escapee
also execs `sleep` with an empty environment, so no tag betrays it),
--allocate MIB (the root holds that much resident memory).
"""

import argparse
import os
import signal
import sys
import time


def record(pidfile: str, role: str) -> None:
    fd = os.open(pidfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{role} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def idle() -> None:
    while True:
        time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--no-escapee", action="store_true")
    parser.add_argument("--untagged-escapee", action="store_true")
    parser.add_argument("--allocate", type=int, default=0)
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    if os.fork() == 0:  # child
        if os.fork() == 0:  # grandchild
            record(args.pidfile, "grandchild")
            idle()
        record(args.pidfile, "child")
        idle()

    if not args.no_escapee and os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # the escapee: its parent exits, it is re-parented
            record(args.pidfile, "escapee")
            if args.untagged_escapee:
                os.execve("/bin/sleep", ["sleep", "3600"], {})
            idle()
        os._exit(0)

    ballast = bytearray(args.allocate * 2**20)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1  # touch every page so it is resident
    record(args.pidfile, "root")
    print("root ready", file=sys.stderr, flush=True)
    if args.exit_after is not None:
        time.sleep(args.exit_after)
        sys.exit(3)
    if args.echo:
        for line in sys.stdin:
            sys.stdout.write(line)
            sys.stdout.flush()
        return
    idle()


if __name__ == "__main__":
    main()
