"""Ask the kernel to let the trio thread preempt the adapters it starts.

A cold acquire blocks the trio thread in clone3 until the new root has exec'd.
The root's exec wakes the thread, often onto the CPU the root is running on,
and the fair scheduler then lets the root finish its time slice first, so the
reply would wait up to a scheduler tick for an adapter's start-up code. Linux
6.12 and later let a SCHED_OTHER thread ask for a shorter slice
(`sched_attr.sched_runtime`); a woken thread with a shorter slice than the
running one preempts it at once (the PREEMPT_SHORT feature). The daemon's
thread is idle almost all the time, so a short slice costs it nothing and
takes nothing from the adapters' share of the CPU.

`SCHED_FLAG_RESET_ON_FORK` keeps the setting to this thread: every child,
worker thread and adapter root starts with the default slice (and with nice 0
if the daemon runs with a negative nice). Older kernels ignore the slice;
architectures whose syscall number is not known here are left alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# sched_setattr(2) by architecture; there is no libc wrapper.
SYSCALL_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}

SCHED_FLAG_RESET_ON_FORK = 0x01

# struct sched_attr up to sched_period (SCHED_ATTR_SIZE_VER0): size, policy,
# flags, nice, priority, runtime, deadline, period.
_SCHED_ATTR = struct.Struct("=IIQiIQQQ")

# The kernel's bounds on a custom slice.
MIN_SLICE_US = 100
MAX_SLICE_US = 100_000


def request_slice(slice_us: int) -> None:
    """Give the calling thread a `slice_us` time slice, keeping its policy
    (SCHED_OTHER or SCHED_BATCH) and nice, reset on fork. Raises OSError with
    the kernel's errno: EPERM in a container that forbids it, ENOSYS on an
    architecture (or a 32-bit Python) whose syscall number is not known here,
    EINVAL for a thread an operator put under another policy (idle, real
    time), which is left as it is."""
    number = SYSCALL_SCHED_SETATTR.get(platform.machine())
    if number is None or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise OSError(errno.ENOSYS, f"sched_setattr is not known on {platform.machine()} for this Python")
    policy = os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK
    if policy not in (os.SCHED_OTHER, os.SCHED_BATCH):
        raise OSError(errno.EINVAL, f"the thread runs under scheduling policy {policy}, left as it is")
    attr = _SCHED_ATTR.pack(
        _SCHED_ATTR.size, policy, SCHED_FLAG_RESET_ON_FORK, os.getpriority(os.PRIO_PROCESS, 0), 0,
        slice_us * 1000, 0, 0,
    )
    buffer = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(number), 0, buffer, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def thread_slice_ns() -> int | None:
    """The calling thread's time slice as the kernel reports it (None if the
    kernel does not show one)."""
    try:
        with open("/proc/thread-self/sched") as sched:
            for line in sched:
                if line.startswith("se.slice"):
                    return int(line.split(":")[1])
    except OSError:
        pass
    return None
