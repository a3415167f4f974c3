"""The benchmark's adapter: a 7-process tree with the shapes that leak.

Run as `python -I -S tree.py PIDFILE` by every system under test and by the raw
floor, so that all of them start exactly the same thing. Standard library only,
and nothing imported that the interpreter does not load anyway, so it starts as
fast as Python can.

The tree, all members idle until signalled:

    root
    +-- child
    |   +-- grandchild
    +-- session          setsid(): out of the root's session and process group
    |   +-- session-member
    +-- (middle, exits)  setsid(); fork  ->  setsid-escapee (re-parented)
    +-- (middle, exits)  fork            ->  fork-escapee   (re-parented, same
                                                              process group)

Every member appends "ROLE PID STARTTIME MONOTONIC_NS" to PIDFILE once it is
set up: STARTTIME is field 22 of /proc/self/stat (so the benchmark can tell the
process from a later holder of its pid) and MONOTONIC_NS is CLOCK_MONOTONIC,
which every process on the host shares, so "tree ready" is the latest of them.
Every member keeps the default SIGTERM action: the tree exits on SIGTERM.
"""

import os
import signal
import sys
import time

ROLES = ("root", "child", "grandchild", "session", "session-member", "setsid-escapee", "fork-escapee")


def start_time() -> int:
    with open("/proc/self/stat", "rb") as stat:
        data = stat.read()
    return int(data[data.rfind(b")") + 2 :].split()[19])


def record(pidfile: str, role: str) -> None:
    line = f"{role} {os.getpid()} {start_time()} {time.monotonic_ns()}\n".encode()
    fd = os.open(pidfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def member(pidfile: str, role: str) -> None:
    """Record `role` and idle forever (until a signal ends the process)."""
    record(pidfile, role)
    while True:
        signal.pause()


def escape(pidfile: str, role: str, *, new_session: bool) -> None:
    """Fork a middle process that forks `role` and exits at once, so that the
    escapee is re-parented (to the nearest subreaper, or PID 1)."""
    middle = os.fork()
    if middle == 0:
        if new_session:
            os.setsid()
        if os.fork() == 0:
            member(pidfile, role)
        os._exit(0)
    os.waitpid(middle, 0)


def main() -> None:
    pidfile = sys.argv[1]
    if os.fork() == 0:
        if os.fork() == 0:
            member(pidfile, "grandchild")
        member(pidfile, "child")
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            member(pidfile, "session-member")
        member(pidfile, "session")
    escape(pidfile, "setsid-escapee", new_session=True)
    escape(pidfile, "fork-escapee", new_session=False)
    member(pidfile, "root")


if __name__ == "__main__":
    main()
