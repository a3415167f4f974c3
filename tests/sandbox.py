"""The shipped service unit's sandbox, rebuilt without systemd, so that the
daemon can be tested inside it on a host where systemd is not PID 1.

`unit_sandbox_prefix(unit)` reads the unit's [Service] settings and returns a
command prefix that runs the rest of a command line the way systemd would
start it, as far as the kernel lets a test do so:

* CapabilityBoundingSet= and AmbientCapabilities=: `setpriv` sets the
  bounding set (a root process's capabilities after exec are exactly it) and
  clears the inheritable set;
* NoNewPrivileges=: `setpriv --nnp`;
* SystemCallFilter=, SystemCallErrorNumber=, SystemCallArchitectures=native:
  a seccomp allow list of the expanded groups (`systemd-analyze
  syscall-filter` knows their contents), refused calls failing with the
  unit's errno, loaded through libseccomp;
* UMask=.

What it does not rebuild (mount namespaces, RestrictAddressFamilies=,
RestrictNamespaces=) only ever takes things away from adapters, not from the
daemon, which uses AF_UNIX sockets and no namespaces.
"""

from __future__ import annotations

import errno
import functools
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

from tests.conftest import PYTHON

UNIT = Path(__file__).parent.parent / "systemd" / "adapter-supervisor.service"

# Runs as `python -c LOAD_FILTER NAMES_JSON ERRNO UMASK -- ARGV...`: allows the
# named system calls only (others fail with ERRNO), sets the umask, and execs
# ARGV. libseccomp's actions: SCMP_ACT_ERRNO(n) is 0x00050000 | n,
# SCMP_ACT_ALLOW is 0x7fff0000.
LOAD_FILTER = textwrap.dedent(
    """
    import ctypes, json, os, sys
    names, refusal, umask = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3], 8)
    seccomp = ctypes.CDLL("libseccomp.so.2")
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    context = seccomp.seccomp_init(0x00050000 | refusal)
    for name in names:
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:
            seccomp.seccomp_rule_add(context, 0x7FFF0000, number, 0)
    if seccomp.seccomp_load(context) != 0:
        sys.exit("could not load the seccomp filter")
    os.umask(umask)
    argv = sys.argv[sys.argv.index("--") + 1:]
    os.execv(argv[0], argv)
    """
)


def service_settings(unit: Path = UNIT) -> dict[str, str]:
    """The [Service] section's settings; a setting given twice keeps its last
    value, except SystemCallFilter=, whose lines add up as systemd's do."""
    settings: dict[str, str] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if key == "SystemCallFilter" and key in settings:
            value = f"{settings[key]} {value}"
        settings[key] = value
    return settings


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """The system calls of a systemd group such as @system-service, nested
    groups expanded."""
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        calls |= syscall_group(entry) if entry.startswith("@") else {entry}
    return frozenset(calls)


def allowed_syscalls(filter_setting: str) -> set[str]:
    """An allow-list SystemCallFilter= value, expanded to system call names."""
    assert not filter_setting.startswith("~"), "the tests rebuild allow lists only"
    calls: set[str] = set()
    for entry in filter_setting.split():
        calls |= syscall_group(entry) if entry.startswith("@") else {entry}
    return calls


def capability_names(setting: str) -> list[str]:
    """`CAP_KILL CAP_SETUID` -> ["kill", "setuid"] (setpriv's spelling)."""
    return [name.removeprefix("CAP_").lower() for name in setting.split()]


def unit_sandbox_prefix(unit: Path = UNIT) -> list[str]:
    """A command prefix that execs the rest inside the unit's sandbox (see the
    module docstring for what is rebuilt)."""
    settings = service_settings(unit)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) rebuilds the unit's capabilities"
    assert settings.get("SystemCallArchitectures") == "native"
    assert settings.get("NoNewPrivileges") == "yes"
    assert not settings.get("AmbientCapabilities")
    capabilities = ",".join(["-all", *(f"+{name}" for name in capability_names(settings["CapabilityBoundingSet"]))])
    refusal = getattr(errno, settings.get("SystemCallErrorNumber", "EPERM"))
    return [
        setpriv, "--nnp", "--inh-caps=-all", f"--bounding-set={capabilities}", "--",
        PYTHON, "-c", LOAD_FILTER,
        json.dumps(sorted(allowed_syscalls(settings["SystemCallFilter"]))),
        str(refusal), settings.get("UMask", "0022"), "--",
    ]
